"""Autopilot against clinicians: does training on cases nobody ranked move the held-out line?

    python -m bench.autopilot [--model smollm2-135m] [--updates 30] [--algorithm grpo] [--json-out F] [--png F] [--no-run]

Rewrites README's block between the "autopilot results" markers.

Two arms from the same reference policy, the same probe set (held-out cases of
``evaluate``'s split) and the same settings:

1. **clinician**: ``--updates`` rounds of ``simulate``'s loop on the training split,
   ranked by the scripted clinician;
2. **autopilot**: the workspace's reward model is fitted on the clinician arm's
   rankings (``simulate.clinicians_reward_model``), the policy goes back to the
   reference (a fresh workspace), and ``--updates`` rounds run on training cases the
   clinician arm never ranked, ranked by the reward model behind the verifier's gate
   (``simulate.model_ranking``; stored as source "autopilot").

Reported per arm: the probe curve (held-out P(correct) and KL after every update)
and every held-out case's P(correct) before and after (``belief``), with paired
tests; and the two arms' final held-out beliefs against each other (Wilcoxon on
the per-case difference). An honest null is a result.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from rlhf_core.belief import ProbeSet, belief
from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.engine import Engine
from rlhf_core.evaluate import split_cases
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.simulate import SimulationSettings, clinicians_reward_model, play_round, run_simulation

from .common import load_json, machine, save_json, write_readme_block
from .learning import _p, _paired

BEGIN, END = "<!-- BEGIN autopilot results -->", "<!-- END autopilot results -->"
KEYS = ("update", "case_id", "version", "loss", "acceptance_rate", "probe/heldout_p_correct", "probe/kl", "seconds")


def _compare_arms(clinician_after: list[float], autopilot_after: list[float]) -> dict:
    from scipy import stats

    diffs = [a - c for a, c in zip(autopilot_after, clinician_after)]
    nonzero = [d for d in diffs if d != 0]
    return {"n": len(diffs), "mean_autopilot_minus_clinician": statistics.fmean(diffs),
            "autopilot_higher": sum(d > 0 for d in diffs),
            "wilcoxon_p": float(stats.wilcoxon(diffs).pvalue) if nonzero else None}


def _arm_summary(history: list[dict], results: list[dict], before: list[float], after: list[float],
                 seconds: float) -> dict:
    return {"seconds": seconds, "updates": len(results), "heldout": _paired(before, after),
            "cases": [m["case_id"] for m in results],
            "acceptance_mean": statistics.fmean(m["acceptance_rate"] for m in results),
            "history": history}


def _probe_history(baseline: dict, results: list[dict]) -> list[dict]:
    return [{"version": 0, **baseline}] + [
        {"version": m["version"], **{k: v for k, v in m.items() if k.startswith("probe/")}} for m in results]


def draw(arms: dict[str, list[dict]], png: str) -> None:
    """Both arms' probe curves (plotly rendered by headless Chromium)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from playwright.sync_api import sync_playwright

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Held-out P(correct diagnosis)", "KL from the reference (probe set)"))
    for (name, history), color in zip(arms.items(), ("#0f766e", "#b45309")):
        xs = [h["version"] for h in history]
        fig.add_trace(go.Scatter(x=xs, y=[h.get("probe/heldout_p_correct") for h in history], name=name,
                                 mode="lines+markers", line={"color": color}, legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[h.get("probe/kl") for h in history], name=name, mode="lines+markers",
                                 line={"color": color, "dash": "dot"}, legendgroup=name, showlegend=False), row=1, col=2)
    fig.update_layout(template="plotly_white", width=1000, height=360, margin={"l": 50, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(title_text="policy version (updates)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1000, "height": 360})
        page.set_content(fig.to_html(include_plotlyjs=True, full_html=True))
        page.wait_for_selector(".js-plotly-plot")
        page.screenshot(path=png)
        browser.close()


def readme_block(result: dict, png: str | None) -> str:
    """README's summary of a run, from its stored result."""
    s, c, a = result["settings"], result["clinician"], result["autopilot"]
    rm = result["reward_model"]
    lines = [f"Model `{result['model']}` ({result['mode']} fine-tuning), {result['machine']}: {c['updates']} "
             f"{s['algorithm'].upper()} updates per arm ({s['traces']} traces per group), {result['seconds'] / 60:.0f} min. "
             f"The autopilot's reward model was fitted on the clinician arm's {rm['rankings']} rankings "
             f"(cross-validated pairwise accuracy {rm['accuracy']:.0%}) and trained on {len(a['cases'])} cases "
             f"nobody ranked.", "",
             "| arm | held-out P(correct) before | after | change | cases improved | Wilcoxon p |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, arm in (("clinician-ranked", c), ("autopilot (reward model)", a)):
        h = arm["heldout"]
        lines.append(f"| {name} | {h['mean_before']:.4f} | {h['mean_after']:.4f} | {h['mean_change']:+.4f} | "
                     f"{h['improved']}/{h['n']} | {_p(h['wilcoxon_p'])} |")
    vs = result["autopilot_vs_clinician"]
    lines += ["", f"Autopilot minus clinician, final held-out P(correct): {vs['mean_autopilot_minus_clinician']:+.4f} "
                  f"({vs['autopilot_higher']}/{vs['n']} cases higher), Wilcoxon p = {_p(vs['wilcoxon_p'])}."]
    ends = {name: (arm["history"][0].get("probe/heldout_p_correct"), arm["history"][-1].get("probe/heldout_p_correct"))
            for name, arm in (("clinician", c), ("autopilot", a))}
    lines += ["", f"The probe line in the picture (the first {s['probe_heldout']} held-out cases, scored after every "
                  f"update): clinician {ends['clinician'][0]:.4f} → {ends['clinician'][1]:.4f}, autopilot "
                  f"{ends['autopilot'][0]:.4f} → {ends['autopilot'][1]:.4f}; KL from the reference after the last "
                  f"update {c['history'][-1].get('probe/kl', float('nan')):.4f} and "
                  f"{a['history'][-1].get('probe/kl', float('nan')):.4f} nats/token."]
    if png:
        lines += ["", f"![autopilot vs clinician probe curves]({png})"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--algorithm", default="grpo")
    parser.add_argument("--probe-heldout", type=int, default=4, help="held-out cases scored after every update")
    parser.add_argument("--json-out", default="bench/autopilot.json")
    parser.add_argument("--png", default="bench/autopilot.png")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    if args.no_run:
        result = load_json(args.json_out)
        write_readme_block(readme_block(result, args.png), BEGIN, END)
        return result
    folder = Path(tempfile.mkdtemp(prefix="autopilot-bench-"))
    # checkpoints only when switching arms: the run measures beliefs, not persistence
    engine = Engine(args.model, device="cpu", dtype="float32", store=folder / "bench.sqlite",
                    workspace="clinician", checkpoint_every=10_000, keep_checkpoints=1)
    library = load_library(default_cases_dir())
    train, heldout = split_cases(library)
    before = [belief(engine.lm, c)["p_correct"] for c in heldout]
    settings = SimulationSettings(algorithm=args.algorithm, updates=args.updates)
    log = lambda m: print(json.dumps({k: m.get(k) for k in KEYS}), flush=True)  # noqa: E731
    started = time.perf_counter()

    # the KL is measured on fixed completions sampled once from the reference on the probe's
    # held-out cases, the same for both arms (each arm's taught cases differ)
    probe_cases = heldout[: args.probe_heldout]
    fixed = {c.id: sample_traces(engine.lm, c, SamplingConfig(k=2, max_new_tokens=settings.max_new_tokens, seed=7),
                                 reference_is_policy=True) for c in probe_cases}

    def fresh_probe() -> ProbeSet:
        return ProbeSet(heldout=probe_cases, max_taught=0, completions=dict(fixed))

    engine.probe = fresh_probe()
    baseline = engine.probe.score(engine.lm)
    arm_started = time.perf_counter()
    clinician = run_simulation(engine, settings, cases=train, on_update=log)
    clinician_seconds = time.perf_counter() - arm_started
    clinician_after = [belief(engine.lm, c)["p_correct"] for c in heldout]

    reward_model = clinicians_reward_model(engine)
    ranked = set(m["case_id"] for m in clinician)
    unranked = [c for c in train if c.id not in ranked]
    random.Random(settings.seed).shuffle(unranked)
    engine.create_workspace("autopilot")  # a fresh workspace: the policy is the reference again
    assert engine.is_reference, "the autopilot arm must start from the reference"
    engine.probe = fresh_probe()
    autopilot_settings = SimulationSettings(algorithm=args.algorithm, updates=args.updates, autopilot=True)
    arm_started = time.perf_counter()
    autopilot = []
    for n in range(args.updates):
        autopilot.append(play_round(engine, unranked[n % len(unranked)], autopilot_settings, n, reward_model))
        log(autopilot[-1])
    autopilot_seconds = time.perf_counter() - arm_started
    autopilot_after = [belief(engine.lm, c)["p_correct"] for c in heldout]

    cv = reward_model.info.get("cross_validated") or {}
    result = {
        "machine": machine(), "model": args.model, "mode": engine.mode,
        "settings": {"algorithm": args.algorithm, "traces": settings.traces, "updates": args.updates,
                     "probe_heldout": args.probe_heldout, "seed": settings.seed},
        "seconds": time.perf_counter() - started,
        "reward_model": {"rankings": reward_model.info["version"],
                         "accuracy": cv.get("pairwise_accuracy", cv.get("accuracy")), "info": reward_model.info},
        "clinician": _arm_summary(_probe_history(baseline, clinician), clinician, before, clinician_after, clinician_seconds),
        "autopilot": _arm_summary(_probe_history(baseline, autopilot), autopilot, before, autopilot_after, autopilot_seconds),
        "autopilot_vs_clinician": _compare_arms(clinician_after, autopilot_after),
    }
    save_json(result, args.json_out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("clinician", "autopilot")}, indent=2, default=str))
    if args.png:
        draw({"clinician-ranked": result["clinician"]["history"], "autopilot": result["autopilot"]["history"]}, args.png)
    write_readme_block(readme_block(result, args.png), BEGIN, END)
    return result


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()
    main()
