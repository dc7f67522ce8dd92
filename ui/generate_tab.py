"""Generating: rejection-sample K verified traces for the picked case, streamed into trace cards."""
from __future__ import annotations

import gradio as gr

from rlhf_core.rollout.generation import SamplingConfig
from rlhf_core.rollout.sampler import RejectionConfig
from rlhf_core.training.bounds import help_text

from .charts import CHARTS
from .batch import (CARD_OUTPUTS, MAX_CARDS, cards_view, live_cards_view, new_batch, ranking_view, traces_title,
                    trainable, with_suggestion)
from .metrics_panel import metrics_view
from .ranking import letter
from .views import progress_html, status_html
from .updates import ALGORITHMS
from .wiring import engine_event

CHART_OUTPUTS = [f"chart_{name}" for name in CHARTS]
OUTPUTS = ["session", "gen_progress", "traces_title", "ranking", "rank_message",
           *CARD_OUTPUTS, "header", "table", *CHART_OUTPUTS]
DEFAULTS = SamplingConfig()
REJECTION = RejectionConfig()
CONCLUSION_LABELS = {
    "constrained": "Chosen by the model among the case's candidates",
    "free": "Written freely by the model",
}


def _event_progress(ev, k: int) -> str:
    report = ev.report
    what = "Rationalising (answer given as a hint)" if ev.phase == "rationalising" else "Sampling"
    detail = (f"{ev.samples_done} of at most {ev.samples_planned} samples drawn · "
              f"{len(ev.accepted)}/{k} accepted · {report.rejected} rejected")
    return progress_html(what, len(ev.accepted) / k if k else 0, detail)


def generate(room, session: dict, case_id: str | None, k: int, max_new_tokens: int, temperature: float,
             budget: int, rationalise: bool, conclusion: str | None = None, negatives: int = REJECTION.negatives):
    """Stream a rejection-sampling run into the cards; the last yield holds the rankable batch."""
    if not case_id or case_id not in room.cases:
        yield {"gen_progress": status_html("Pick a case first.", "warn"), "_warning": "Pick a case first."}
        return
    try:
        k = int(k)
        mode = {label: key for key, label in CONCLUSION_LABELS.items()}.get(conclusion, conclusion)
        sampling = SamplingConfig(k=k, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  conclusion=room.conclusion_mode(mode))
        rejection = RejectionConfig(k=k, budget=max(int(budget), k), rationalise=bool(rationalise),
                                    negatives=int(negatives))
    except (TypeError, ValueError) as err:
        yield {"gen_progress": status_html(f"Invalid sampling settings: {err}", "error"), "_warning": str(err)}
        return
    if k > MAX_CARDS:
        yield {"gen_progress": status_html(f"At most {MAX_CARDS} traces can be ranked at once.", "error")}
        return
    case = room.case(case_id)
    model_key, version = room.model_key(), room.version
    cleared = {**session, "batch": None}
    yield {"session": cleared, "gen_progress": progress_html("Waiting for the model…", 0, "queued behind other work, if any"),
           "traces_title": traces_title(None), **cards_view(None, reset_comments=True), **ranking_view(None)}
    last = None
    try:
        for last in room.runner.sample(case, sampling, rejection):
            accepted = [t.to_dict() for t in last.accepted]
            yield {"gen_progress": _event_progress(last, k), **live_cards_view(accepted, last.partial_texts, last.phase, k)}
    except Exception as err:  # noqa: BLE001 - shown to the clinician; the engine is left as it was
        yield {"gen_progress": progress_html("Generation failed", 1, str(err), "error"), "_warning": f"Generation failed: {err}"}
        return
    accepted_ids = {t.trace_id for t in last.accepted}
    batch = new_batch(case.id, [t.to_dict() for t in last.accepted],
                      [t.to_dict() for t in last.traces if t.trace_id not in accepted_ids],
                      model_key, last.report.to_dict(), version,
                      generation_id=getattr(last, "generation_id", None), second_opinions=True,
                      negatives=[t.to_dict() for t in last.negatives])
    batch = with_suggestion(batch, room.suggest_order(batch["traces"]))
    report = last.report
    below = f" · {len(batch['negatives'])} rejected below the line" if batch["negatives"] else ""
    done = progress_html(
        "Done", 1,
        f"{len(batch['traces'])} rankable of {report.sampled} sampled (acceptance {report.acceptance_rate:.0%})"
        + (f" + {report.rationalised_sampled} rationalised attempts" if report.rationalised_sampled else "") + below
        + (f" · stopped once K were in hand: {report.cut_short} sample(s) still reasoning were dropped"
           if report.cut_short else ""),
        "done")
    yield {"session": {**cleared, "batch": batch}, "gen_progress": done, "traces_title": traces_title(batch),
           **cards_view(batch), **ranking_view(batch), **metrics_view(room)}


def prepare_reference(room, session: dict, algorithm_label: str = "DPO") -> dict:
    """Once the cards are shown: the reference pass their update will need (every trace
    that can be trained on), run while the clinician reads, so *Submit* starts training at
    once; then, outside the engine queue, the first step of the update chosen on the
    radio (``algorithm_label``; stopped by *Submit*)."""
    batch = (session or {}).get("batch")
    if batch and not batch.get("submitted"):
        room.runner.prepare_reference(trainable(batch), batch["model_key"])
        room.runner.prepare_shown(batch, ALGORITHMS.get(algorithm_label, "dpo"))
    return {}


def conclusion_setting(room) -> dict:
    """The conclusion radio showing the active workspace's setting."""
    return gr.update(value=CONCLUSION_LABELS[room.conclusion_mode()])


def build_generate_controls(ui: dict) -> None:
    with gr.Row():
        ui["generate_button"] = gr.Button("Generate traces", variant="primary", elem_id="generate-button", scale=2)
    with gr.Accordion("Sampling settings", open=False, elem_id="sampling-settings"):
        with gr.Row():
            ui["k"] = gr.Slider(2, MAX_CARDS, value=DEFAULTS.k, step=1, label="Traces to rank (K)", elem_id="k",
                                info=help_text(RejectionConfig, "k"))
            ui["max_new_tokens"] = gr.Slider(16, 512, value=DEFAULTS.max_new_tokens, step=16, label="Max new tokens",
                                             info=help_text(SamplingConfig, "max_new_tokens"))
        with gr.Row():
            ui["temperature"] = gr.Slider(0.0, 1.5, value=DEFAULTS.temperature, step=0.05, label="Temperature",
                                          info=help_text(SamplingConfig, "temperature"))
            ui["budget"] = gr.Slider(2, 48, value=RejectionConfig().budget, step=1, label="Sample budget",
                                     info=help_text(RejectionConfig, "budget"))
        with gr.Row():
            ui["conclusion"] = gr.Radio(
                list(CONCLUSION_LABELS.values()), value=CONCLUSION_LABELS[DEFAULTS.conclusion], label="Conclusion",
                elem_id="conclusion-mode",
                info=help_text(SamplingConfig, "conclusion"),
            )
            ui["negatives"] = gr.Slider(0, MAX_CARDS, value=REJECTION.negatives, step=1, label="Rejected traces below the line",
                                        elem_id="negatives",
                                        info=help_text(RejectionConfig, "negatives"))
        ui["rationalise"] = gr.Checkbox(value=True, label="Fill a shortfall with rationalised traces (answer given as a hint; labelled)")
    ui["gen_progress"] = gr.HTML(progress_html("Idle", 0, "pick a case and generate", "idle"), elem_id="generate-progress")


def build_trace_cards(ui: dict) -> None:
    ui["traces_title"] = gr.HTML(traces_title(None), elem_id="traces-title")
    for row in range(0, MAX_CARDS, 2):
        with gr.Row(equal_height=False):
            for i in (row, row + 1):
                with gr.Column(visible=False, elem_id=f"trace-card-{i}", elem_classes=["cr-card"], variant="panel") as card:
                    ui[f"card{i}"] = card
                    ui[f"card{i}_head"] = gr.HTML("", elem_id=f"trace-head-{i}", padding=True)
                    ui[f"card{i}_text"] = gr.Textbox(label=f"Trace {letter(i)} reasoning", show_label=False, lines=5, max_lines=14, interactive=False,
                                                     elem_id=f"trace-text-{i}", container=False)
                    ui[f"card{i}_comment"] = gr.Textbox(label=f"Comment on trace {letter(i)}", show_label=False, placeholder="Comment on this trace (optional; saved with the ranking)",
                                                        max_length=500, elem_id=f"trace-comment-{i}", container=False)
    ui["below_html"] = gr.HTML("", elem_id="below-the-line")
    ui["use_negatives"] = gr.Checkbox(value=True, label="Train on the traces below the line as negatives",
                                      elem_id="use-negatives")
    with gr.Accordion("Other rejected traces (0)", open=False, elem_id="rejected-traces") as acc:
        ui["rejected_acc"] = acc
        ui["rejected_html"] = gr.HTML("", elem_id="rejected-html")


def bind_generate(room, ui: dict) -> None:
    generated = engine_event(ui["generate_button"].click, generate, room, ui,
                             ["session", "case_picker", "k", "max_new_tokens", "temperature", "budget", "rationalise",
                              "conclusion", "negatives"], OUTPUTS,
                             show_progress="minimal", show_progress_on=[ui["gen_progress"]])
    engine_event(generated.then, prepare_reference, room, ui, ["session", "algorithm"], [], show_progress="hidden")
