"""The Evaluate tab: an A/B comparison of the reference and the current policy on
the held-out split of the case library (``rlhf_core.evaluate.heldout_comparison``,
the same comparison as ``python -m rlhf_core evaluate``).

Each held-out case gets the same number of free samples (no hint, no
rejection) from both arms with the same seeds; the verifier and the safety
checker judge them. The table gives each arm's acceptance with a Wilson 95%
interval and its mean safety score with a t interval, and the difference with
Newcombe's interval, Fisher's exact test and Welch's t-test on safety. The run
holds the weights, so it waits for (and blocks) generation and updates.
"""
from __future__ import annotations

import gradio as gr

from rlhf_core.evaluate import format_table

from .views import progress_html, status_html
from .wiring import engine_event, light_event

EVAL_COLUMNS = ["arm", "accepted / n", "acceptance", "95% CI", "mean safety", "safety 95% CI", "p-value"]
HELDOUT_FRACTION = 0.2
OUTPUTS = ["eval_progress", "eval_summary", "eval_table", "eval_text"]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _interval(ci, pct: bool = True) -> str:
    if not ci or ci[0] is None:
        return "n/a"
    f = _pct if pct else _num
    return f"[{f(ci[0])}, {f(ci[1])}]"


def eval_rows(result: dict) -> list[list[str]]:
    """Reference, policy and their difference, as table rows of text."""
    rows = []
    for arm in ("reference", "policy"):
        a = result[arm]
        rows.append([arm, f"{a['accepted']}/{a['n']}", _pct(a["rate"]), _interval(a["ci"]) + " Wilson",
                     _num(a["safety_mean"]), _interval(a["safety_ci"], pct=False), ""])
    d, t = result["difference"], result["tests"]
    rate = "n/a" if d["rate"] is None else f"{100 * d['rate']:+.1f} points"
    ci = f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] Newcombe"
    p = f"Fisher {t['fisher_p']:.3g}; safety Welch {_num(t['safety_welch_p'], '{:.3g}')}"
    rows.append(["policy − reference", "", rate, ci, _num(d["safety"], "{:+.3f}"), "", p])
    like = result.get("likelihood")
    if like:  # the paired, teacher-forced comparison: no sampling noise
        lp, top = like["p_correct"], like["top1"]
        rows.append(["P(correct diagnosis), paired", f"higher in {lp['improved']}/{lp['n']} cases",
                     f"{_num(lp['mean_before'])} → {_num(lp['mean_after'])}",
                     f"top-1 {top['reference']:g} → {top['policy']:g} of {top['n']}", "", "",
                     f"Wilcoxon {_num(lp['wilcoxon_p'], '{:.3g}')}; sign test {_num(lp['sign_test_p'], '{:.3g}')}"])
    return rows


def eval_summary_html(result: dict) -> str:
    split, ref, pol, t = result.get("split") or {}, result["reference"], result["policy"], result["tests"]
    significant = t["fisher_p"] < 0.05
    verdict = ("a significant difference in acceptance (Fisher p < 0.05)" if significant
               else "no significant difference in acceptance (Fisher p ≥ 0.05)")
    where = f" in workspace {result['workspace']}" if result.get("workspace") else ""
    like = (result.get("likelihood") or {}).get("p_correct")
    paired = ("" if not like else
              f" · what the model believes (teacher-forced, paired over the same cases, no sampling noise): "
              f"P(correct) {_num(like['mean_before'])} → {_num(like['mean_after'])}, higher in "
              f"{like['improved']}/{like['n']} cases, Wilcoxon p {_num(like['wilcoxon_p'], '{:.3g}')}")
    return status_html(
        f"{split.get('heldout', len(result['cases']))} held-out case(s) of {split.get('total', '?')} × "
        f"{result['samples_per_case']} sample(s) per arm · {result['model']} policy v{result['policy_version']}{where}: "
        f"reference {_pct(ref['rate'])} → policy {_pct(pol['rate'])} accepted, {verdict}; "
        f"mean safety {_num(ref['safety_mean'])} → {_num(pol['safety_mean'])}{paired} · {result['seconds']:.1f}s",
        "ok" if significant and (result["difference"]["rate"] or 0) > 0 else "info")


def result_view(result: dict | None) -> dict:
    if not result:
        return {"eval_summary": status_html("No evaluation yet: choose the samples per case and press Run.", "info"),
                "eval_table": [], "eval_text": ""}
    return {"eval_summary": eval_summary_html(result), "eval_table": eval_rows(result), "eval_text": format_table(result)}


def run_eval(room, samples, max_new_tokens):
    """Stream the comparison's progress, then show the result table and the text report."""
    try:
        samples, max_new_tokens = int(samples), int(max_new_tokens)
        events = room.runner.evaluate(samples=samples, max_new_tokens=max_new_tokens, heldout_fraction=HELDOUT_FRACTION)
    except (TypeError, ValueError) as err:
        yield {"eval_progress": progress_html("Not started", 0, str(err), "error"), "_warning": str(err)}
        return
    yield {"eval_progress": progress_html("Waiting for the model…", 0, "queued behind other work, if any")}
    result = None
    try:
        for event in events:
            if event["kind"] == "progress":
                yield {"eval_progress": progress_html(
                    f"Sampling {event['arm']} · {event['case_id']}", event["done"] / event["total"],
                    f"{event['done']} of {event['total']} case × arm runs")}
            else:
                result = event["result"]
    except Exception as err:  # noqa: BLE001 - shown to the clinician; the policy is untouched
        yield {"eval_progress": progress_html("Evaluation failed", 1, str(err), "error"),
               "_warning": f"Evaluation failed: {err}"}
        return
    if result is None:
        yield {"eval_progress": progress_html("Stopped", 0, "", "idle")}
        return
    yield {"eval_progress": progress_html("Done", 1, f"{result['seconds']:.1f}s", "done"), **result_view(result)}


def show_last(room) -> dict:
    """When the tab opens: the last result of this app (any session's)."""
    return result_view(room.last_eval)


def build_eval_tab(room, ui: dict) -> None:
    gr.HTML('<div class="cr-muted">Reference (the frozen starting model) vs the current policy on the held-out '
            f'{int(HELDOUT_FRACTION * 100)}% of the case library (chosen by a hash of each case id, so a case stays on '
            'its side as cases are added). Free sampling, judged by the verifier and the safety checker. Traces of '
            'one case are not independent: with few cases the p-values are optimistic. Beside it, the paired likelihood '
            'comparison: the probability each model gives the correct diagnosis when asked to conclude, case by case '
            '(scored, not sampled), which detects changes far smaller than acceptance can.</div>')
    with gr.Row():
        ui["eval_samples"] = gr.Slider(1, 32, value=4, step=1, label="Samples per case and arm", elem_id="eval-samples")
        ui["eval_max_tokens"] = gr.Slider(16, 512, value=128, step=16, label="Max new tokens", elem_id="eval-max-tokens")
        ui["eval_run"] = gr.Button("Run A/B comparison", variant="primary", elem_id="eval-run", scale=0, min_width=200)
    ui["eval_progress"] = gr.HTML(progress_html("Idle", 0, "", "idle"), elem_id="eval-progress")
    view = result_view(room.last_eval)
    ui["eval_summary"] = gr.HTML(view["eval_summary"], elem_id="eval-summary")
    ui["eval_table"] = gr.Dataframe(view["eval_table"], headers=EVAL_COLUMNS, interactive=False, elem_id="eval-table",
                                    wrap=True)
    ui["eval_text"] = gr.Textbox(view["eval_text"], label="Report (with the per-case table)", lines=8, max_lines=30,
                                 interactive=False, elem_id="eval-text", elem_classes=["cr-mono"])


def bind_eval_tab(room, ui: dict) -> None:
    light_event(ui["tab_eval"].select, show_last, room, ui, [], ["eval_summary", "eval_table", "eval_text"])
    engine_event(ui["eval_run"].click, run_eval, room, ui, ["eval_samples", "eval_max_tokens"], OUTPUTS,
                 show_progress="minimal", show_progress_on=[ui["eval_progress"]])
