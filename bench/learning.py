"""Does ranking teach? A scripted run, scored by what the model believes.

    python -m bench.learning [--model smollm2-135m] [--updates 30] [--algorithm dpo] [--lora | --full]
                             [--steps N] [--lr X] [--json-out F] [--png F] [--no-run | --no-readme]

Rewrites README's block between the "learning results" markers (not with
``--no-readme``: an experiment off the app's defaults, e.g. ``--steps 1 --lr 1e-4``).
A replicate (``--seed 1 --eval-samples 0 --png '' --no-readme --json-out
bench/learning_seed1.json``) is summarised under the table while its settings match.

Runs ``simulate``'s loop (training split of the library, the app's defaults)
with the engine's probe set on, and reports, per taught case and for every
held-out case, the probability the model gives the correct diagnosis
(``belief.belief``: teacher-forced, normalised over the candidates) before and
after the run, with paired tests (Wilcoxon signed-rank; sign test), plus the
held-out sampled acceptance of the reference and the final policy
(``evaluate.heldout_comparison``). ``--png`` draws the probe curves (taught vs
held-out P(correct) and KL against policy version) with headless Chromium.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_core.belief import ProbeSet, belief
from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.engine import Engine
from rlhf_core.evaluate import heldout_comparison, split_cases
from rlhf_core.simulate import SimulationSettings, run_simulation
from rlhf_core.training.update import default_lr

from .common import adapter_label, load_json, machine, republish, save_json, write_readme_block


def _paired(before: list[float], after: list[float]) -> dict:
    from scipy import stats

    diffs = [a - b for a, b in zip(after, before)]
    up = sum(d > 0 for d in diffs)
    nonzero = sum(d != 0 for d in diffs)
    out = {"n": len(diffs), "improved": up, "share_improved": up / len(diffs) if diffs else None,
           "mean_before": statistics.fmean(before), "mean_after": statistics.fmean(after),
           "mean_change": statistics.fmean(diffs),
           "sign_test_p": float(stats.binomtest(up, nonzero).pvalue) if nonzero else None}
    out["wilcoxon_p"] = float(stats.wilcoxon(diffs).pvalue) if nonzero >= 1 else None
    return out


def draw(history: list[dict], png: str) -> None:
    """The probe curves as a picture (plotly rendered by headless Chromium)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from playwright.sync_api import sync_playwright

    xs = [h["version"] for h in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("P(correct diagnosis) on the probe set", "KL from the reference (probe set)"))
    for key, name, color, dash in (("probe/taught_p_correct", "taught cases", "#0f766e", None),
                                   ("probe/heldout_p_correct", "held-out cases", "#b45309", "dash")):
        fig.add_trace(go.Scatter(x=xs, y=[h.get(key) for h in history], name=name, mode="lines+markers",
                                 line={"color": color, "dash": dash}), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[h.get("probe/kl") for h in history], name="KL (nats/token)", mode="lines+markers",
                             line={"color": "#1d4ed8"}), row=1, col=2)
    fig.update_layout(template="plotly_white", width=1000, height=360, margin={"l": 50, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(title_text="policy version")
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1000, "height": 360})
        page.set_content(html)
        page.wait_for_selector(".js-plotly-plot")
        page.screenshot(path=png)
        browser.close()


BEGIN, END = "<!-- BEGIN learning results -->", "<!-- END learning results -->"


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def replicate_lines(result: dict, replicates: list[dict]) -> list[str]:
    """README lines for replicate runs (another ``--seed``) of the same model, mode and
    optimisation as ``result``; replicates of other settings are stale and left out."""
    same = [r for r in replicates if (r.get("model"), r.get("mode"), r.get("optimisation"), r["settings"].get("updates"))
            == (result.get("model"), result.get("mode"), result.get("optimisation"), result["settings"].get("updates"))
            and r["settings"].get("seed") != result["settings"].get("seed")]
    lines = []
    for r in sorted(same, key=lambda r: r["settings"]["seed"]):
        t, u, h = r["taught"], r["untaught_train"], r["heldout"]
        lines.append(f"Replicate with seed {r['settings']['seed']} (another case order and sampling seeds): taught "
                     f"{t['mean_before']:.3f} → {t['mean_after']:.3f}, improved on {t['improved']}/{t['n']} "
                     f"({t['share_improved']:.0%}, Wilcoxon p {_p(t['wilcoxon_p'])}); training split not ranked "
                     f"{u['mean_before']:.3f} → {u['mean_after']:.3f}, {u['improved']}/{u['n']} improved (Wilcoxon p "
                     f"{_p(u['wilcoxon_p'])}); held out {h['mean_before']:.3f} → "
                     f"{h['mean_after']:.3f}, {h['improved']}/{h['n']} improved (Wilcoxon p {_p(h['wilcoxon_p'])}).")
    if lines:
        runs = [result, *same]
        improved, n = sum(r["taught"]["improved"] for r in runs), sum(r["taught"]["n"] for r in runs)
        change = sum(r["taught"]["mean_change"] * r["taught"]["n"] for r in runs) / n
        lines.append(f"The {len(runs)} runs together: the taught cases improved on {improved}/{n} ({improved / n:.0%}), "
                     f"mean change {change:+.3f}.")
    return ["", *lines] if lines else []


def mode_label(result: dict) -> str:
    """How a stored run trained (``common.adapter_label``)."""
    return adapter_label(result["mode"], result.get("adapted_layers"))


def readme_block(result: dict, png: str | None, replicates: list[dict] | None = None) -> str:
    """README's summary of a run, from its stored result, with any ``replicate_lines``."""
    s = result["settings"]
    # runs before these were recorded: probe 3 + 3, optimisation not stored
    o, probe = result.get("optimisation"), result.get("probe", {"taught": 3, "heldout": 3})
    step = f", {o['steps']} optimisation step{'s' if o['steps'] > 1 else ''} at lr {o['lr']:g}" if o else ""
    lines = [f"Model `{result['model']}` ({mode_label(result)}{', the CPU default' if result['mode'] == 'lora' else ''}), {result['machine']}: {result['updates']} scripted "
             f"{s['algorithm'].upper()} updates on the training split ({s['traces']} traces ranked each{step}, below-the-line "
             f"negatives on), {result['seconds'] / 60:.0f} min; median update {result['update_seconds_median']:.1f} s, "
             f"probe scoring ({probe['taught']} + {probe['heldout']} cases) {result['probe_seconds_median']:.1f} s.", "",
             "| cases | n | mean P(correct) before | after | improved | Wilcoxon p | sign test p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, name in (("taught", "taught (ranked once each)"), ("untaught_train", "training split, not ranked"),
                      ("heldout", "held out")):
        r = result[key]
        lines.append(f"| {name} | {r['n']} | {r['mean_before']:.3f} | {r['mean_after']:.3f} | "
                     f"{r['improved']}/{r['n']} ({r['share_improved']:.0%}) | {_p(r['wilcoxon_p'])} | {_p(r['sign_test_p'])} |")
    ab = result.get("heldout_sampled")
    if ab:
        lines += ["", f"Held-out sampled acceptance (`evaluate`): reference {ab['reference']['accepted']}/{ab['reference']['n']}, "
                      f"policy {ab['policy']['accepted']}/{ab['policy']['n']}, Fisher p = {_p(ab['fisher_p'])}."]
    lines += replicate_lines(result, replicates or [])
    if png:
        taught_probe = probe["taught"]
        lines += ["", f"![probe curves]({png})", "",
                  f"The chart's taught line is the app's probe: the first {taught_probe} cases taught (one, two, then "
                  f"{taught_probe} of them over the first versions, hence its first jumps); the table above scores every "
                  "taught case before and after."]
    return "\n".join(lines)


def stored_replicates() -> list[dict]:
    """The stored replicate runs (``--seed N --json-out bench/learning_seedN.json --no-readme``)."""
    return [load_json(str(p)) for p in sorted(Path(__file__).parent.glob("learning_seed*.json"))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--algorithm", default="dpo")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_const", const=True, default="auto",
                      help="train a LoRA adapter (default: the app's rule, LoRA on CPU for 100M+ parameters)")
    mode.add_argument("--full", dest="lora", action="store_const", const=False, help="train every weight")
    parser.add_argument("--steps", type=int, default=SimulationSettings.steps, help="optimisation steps per ranking")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the engine's for the mode)")
    parser.add_argument("--probe-taught", type=int, default=3)
    parser.add_argument("--probe-heldout", type=int, default=3)
    parser.add_argument("--seed", type=int, default=SimulationSettings.seed,
                        help="the run's case order and sampling seeds (another seed: a replicate)")
    parser.add_argument("--eval-samples", type=int, default=2, help="held-out sampled A/B, per case and arm (0: skip)")
    parser.add_argument("--json-out", default="bench/learning.json")
    parser.add_argument("--png", default="bench/learning.png")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    parser.add_argument("--no-readme", action="store_true", help="leave README as it is")
    args = parser.parse_args(argv)
    if args.no_run:
        return republish(args.json_out, lambda result: readme_block(result, args.png, stored_replicates()), BEGIN, END)
    engine = Engine(args.model, lora=args.lora, device="cpu", dtype="float32")
    library = load_library(default_cases_dir())
    train, heldout = split_cases(library)
    engine.probe = ProbeSet(heldout=heldout[: args.probe_heldout], max_taught=args.probe_taught)
    before_heldout = [belief(engine.lm, c)["p_correct"] for c in heldout]
    before_train = {c.id: belief(engine.lm, c)["p_correct"] for c in train}
    baseline = engine.probe.score(engine.lm)
    settings = SimulationSettings(algorithm=args.algorithm, updates=args.updates, steps=args.steps, lr=args.lr,
                                  seed=args.seed)
    started = time.perf_counter()
    history = [{"version": 0, **baseline}]
    results = run_simulation(engine, settings, cases=train, on_update=lambda m: print(json.dumps(
        {k: m.get(k) for k in ("update", "case_id", "version", "loss", "kl", "probe/taught_p_correct",
                               "probe/heldout_p_correct", "probe/kl", "probe/seconds", "seconds")}), flush=True))
    seconds = time.perf_counter() - started
    history += [{"version": m["version"], **{k: v for k, v in m.items() if k.startswith("probe/")}} for m in results]
    taught = list(dict.fromkeys(m["case_id"] for m in results))
    by_id = {c.id: c for c in train}
    after_train = {cid: belief(engine.lm, by_id[cid])["p_correct"] for cid in taught}
    after_heldout = [belief(engine.lm, c)["p_correct"] for c in heldout]
    result = {
        "machine": machine(), "model": args.model, "mode": engine.mode, "settings": asdict(settings),
        "adapted_layers": engine.lm.lora.adapted_layers if engine.lm.lora is not None else None,
        "probe": {"taught": args.probe_taught, "heldout": args.probe_heldout},
        "optimisation": {"steps": args.steps, "lr": args.lr or default_lr(engine.lm)},
        "seconds": seconds, "updates": len(results), "final_version": engine.version,
        "taught": _paired([before_train[c] for c in taught], [after_train[c] for c in taught]),
        "untaught_train": _paired([before_train[c.id] for c in train if c.id not in after_train],
                                  [belief(engine.lm, c)["p_correct"] for c in train if c.id not in after_train]),
        "heldout": _paired(before_heldout, after_heldout),
        "taught_cases": {c: {"before": before_train[c], "after": after_train[c]} for c in taught},
        # updates whose accepted traces included one that first concluded another diagnosis
        "updates_with_changed_mind": sum(bool(m.get("ranked_changing_mind")) for m in results),
        "probe_seconds_median": statistics.median(m["probe/seconds"] for m in results if "probe/seconds" in m),
        "update_seconds_median": statistics.median(m["seconds"] for m in results),
        "history": history,
    }
    if args.eval_samples:
        ab = heldout_comparison(engine, library, samples=args.eval_samples)
        result["heldout_sampled"] = {arm: {k: ab[arm][k] for k in ("accepted", "n", "rate")} for arm in ("reference", "policy")}
        result["heldout_sampled"]["fisher_p"] = ab["tests"]["fisher_p"]
    save_json(result, args.json_out)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    if args.png:
        draw(history, args.png)
    if not args.no_readme:
        write_readme_block(readme_block(result, args.png, stored_replicates()), BEGIN, END)
    return result


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()
    main()
