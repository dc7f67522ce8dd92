"""Ranking and updating: order the accepted traces best to worst, then run DPO or GRPO.

The ranking control is a list of the batch's accepted traces (a radio group,
top = best) with "move up" / "move down" buttons: it only ever permutes a
complete list, so duplicates and gaps cannot occur, and a move that would put
a trace with a hard safety violation first is refused. The trace cards follow
the ranking: a move moves the card, its comment with it. The server validates
the submitted order again (``validate_order``).
"""
from __future__ import annotations

from dataclasses import fields

import gradio as gr

from rlhf_core.training.losses import DPO_LOSS_TYPES, GRPO_LOSS_TYPES
from rlhf_core.training.bounds import effective, help_text
from rlhf_core.training.update import DPOConfig, GRPOConfig, OptimConfig, make_config

from .batch import MAX_CARDS, can_reorder, comments_by_trace, heads_view, moved_cards_view, ranking_view
from .case_panel import belief_view
from .generate_tab import CHART_OUTPUTS
from .metrics_panel import metrics_view
from .ranking import HeldOutCase, RankingError, move
from .updates import ALGORITHMS, likelihood_changes
from .views import progress_html, status_html
from .wiring import engine_event, light_event

DEFAULTS = {"dpo": DPOConfig(), "grpo": GRPOConfig()}
LOSS_TYPES = {"dpo": DPO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}
SUBMIT_OUTPUTS = ["session", "update_progress", "update_status", "ranking", "rank_message", "header", "table", *CHART_OUTPUTS,
                  *[f"card{i}_head" for i in range(MAX_CARDS)]]
COMMENTS = [f"card{i}_comment" for i in range(MAX_CARDS)]
MOVE_OUTPUTS = ["session", "ranking", "rank_message",
                *[f"card{i}{part}" for i in range(MAX_CARDS) for part in ("_head", "_text", "_comment")]]


def move_trace(room, session: dict, selected: str | None, delta: int, *comments) -> dict:
    """Move the selected trace one place; its card moves with it, carrying its comment
    (``comments``: the comment boxes as shown, one per card slot)."""
    batch = session.get("batch")
    if not can_reorder(batch):
        return {"_warning": "Nothing to rank: generate traces first."}
    order, refusal = move(batch["order"], selected, delta, batch["traces"])
    if refusal:
        return {"_warning": refusal, "rank_message": status_html(refusal, "warn")}
    written = comments_by_trace(batch, comments)
    batch = {**batch, "order": order}
    return {"session": {**session, "batch": batch}, **ranking_view(batch, selected), **moved_cards_view(batch, written)}


def move_up(room, session: dict, selected: str | None, *comments) -> dict:
    return move_trace(room, session, selected, -1, *comments)


def move_down(room, session: dict, selected: str | None, *comments) -> dict:
    return move_trace(room, session, selected, +1, *comments)


def algorithm_changed(room, label: str, session: dict | None = None) -> dict:
    """The advanced panel's defaults follow the algorithm (the engine's own defaults); the
    first step of the shown batch's update is prepared again for it."""
    algo = ALGORITHMS.get(label, "dpo")
    batch = (session or {}).get("batch")
    if batch and not batch.get("submitted"):
        room.runner.prepare_shown(batch, algo, chosen=True)
    d = DEFAULTS[algo]
    return {"beta": d.beta, "loss_type": gr.update(choices=list(LOSS_TYPES[algo]), value=d.loss_type)}


def update_config(algorithm_label: str, beta, lr, steps, loss_type):
    algo = ALGORITHMS.get(algorithm_label)
    if algo is None:
        raise ValueError(f"choose DPO or GRPO, got {algorithm_label!r}")
    kwargs = {"beta": beta, "steps": steps, "lr": lr if lr else None}
    if loss_type:
        kwargs["loss_type"] = loss_type
    return make_config(algo, **kwargs)


def _what_it_did(result: dict) -> str:
    """"your first choice is now 2.1x as likely, your last 0.4x, the traces below the line 0.2-0.3x"
    (ratios over the whole trace, best to worst; ``ranked`` of them above the line)."""
    ratios = result.get("ranked_likelihood_ratios") or []
    if result.get("skipped") or len(ratios) < 2:
        return ""
    ranked = result.get("ranked") or len(ratios)
    above = [r for r in ratios[:ranked] if r is not None]
    below = [r for r in ratios[ranked:] if r is not None]
    parts = [f"your first choice is now {above[0]:.3g}× as likely"] if above else []
    if len(above) > 1:
        parts.append(f"your last {above[-1]:.3g}×")
    if below:
        parts.append(f"the traces below the line {min(below):.3g}×" if len(below) == 1 else
                     f"the traces below the line {min(below):.3g}–{max(below):.3g}×")
    return " · " + ", ".join(parts) if parts else ""


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def record_only(room, session: dict, annotator: str, use_negatives=True, *comments) -> dict:
    """Store the current order as a ranking without updating the policy: a second
    opinion on the same traces, so the agreement view can compare annotators."""
    batch = session.get("batch")
    annotator = (annotator or "").strip()

    def refuse(message: str) -> dict:
        return {"update_status": status_html(message, "error"), "_warning": message}

    if not batch:
        return refuse("Nothing to rank: generate traces first.")
    try:
        ranking_id = room.runner.record_ranking(batch["traces"], batch["order"], annotator=annotator,
                                         model_key=batch["model_key"], comments=comments_by_trace(batch, comments),
                                         negatives=(batch.get("negatives") or []) if use_negatives else [],
                                         suggestion=batch.get("suggestion"))
    except (RankingError, ValueError) as err:
        return refuse(str(err))
    recorded = [*(batch.get("recorded") or []), {"annotator": annotator, "ranking_id": ranking_id}]
    batch = {**batch, "recorded": recorded}
    again = sum(r["annotator"] == annotator for r in recorded) > 1
    message = (f"Ranking by {annotator} recorded (no update; policy stays v{room.version})."
               + (" It replaces your earlier ranking of these traces in the agreement view." if again else "")
               + " Another clinician can now reorder and record theirs.")
    return {"session": {**session, "batch": batch, "annotator": annotator}, "update_status": status_html(message, "ok"),
            **ranking_view(batch, None), "_info": f"Ranking by {annotator} recorded"}


def submit(room, session: dict, annotator: str, algorithm: str, beta, lr, steps, loss_type, use_negatives=True, *comments):
    """Validate the ranking, run the update streaming per-step metrics, then show the result.
    ``use_negatives``: the batch's rejected traces below the line join the update."""
    batch = session.get("batch")
    annotator = (annotator or session.get("annotator") or "").strip()

    def refuse(message: str):
        return {"update_status": status_html(message, "error"), "_warning": message,
                "update_progress": progress_html("Not submitted", 0, "", "idle")}

    if not batch:
        yield refuse("Nothing to rank: generate traces first.")
        return
    if batch.get("submitted"):
        extra = " (“Record ranking only” stores a second opinion without an update)" if batch.get("second_opinions") else ""
        yield refuse(f"This ranking was already submitted. Generate new traces to update again{extra}.")
        return
    try:
        config = update_config(algorithm, beta, lr, steps, loss_type)
    except (TypeError, ValueError) as err:
        yield refuse(f"Invalid update settings: {err}")
        return
    by_position = comments_by_trace(batch, comments)
    steps_total = config.steps
    yield {"update_progress": progress_html("Waiting for the model…", 0, "queued behind other work, if any"),
           "update_status": ""}
    result = record = None
    try:
        negatives = (batch.get("negatives") or []) if use_negatives else []
        confirmed = session.get("confirm_heldout") == batch.get("case_id")  # the second press on a held-out case
        for event in room.runner.update(batch["traces"], batch["order"], config, annotator=annotator,
                                        model_key=batch["model_key"], comments=by_position,
                                        acceptance_rate=batch.get("acceptance_rate"),
                                        generation_id=batch.get("generation_id"), negatives=negatives,
                                        suggestion=batch.get("suggestion"), train_heldout=confirmed):
            if event["kind"] == "step":
                n = event["step"] + 1
                yield {"update_progress": progress_html(f"{config.algorithm.upper()} step {n}/{steps_total}", n / steps_total,
                                                        f"loss {_num(event['loss'])}"), **metrics_view(room)}
            else:
                result, record = event["result"], event["ranking"]
    except HeldOutCase as err:
        yield {**refuse(str(err)), "session": {**session, "confirm_heldout": err.case_id}}
        return
    except RankingError as err:
        yield refuse(str(err))
        return
    except Exception as err:  # noqa: BLE001 - shown to the clinician
        kept = " The ranking itself is stored (marked failed)."
        yield {"update_progress": progress_html("Update failed", 1, str(err), "error"),
               "update_status": status_html(f"Update failed: {err}.{kept}", "error"), "_warning": f"Update failed: {err}"}
        return
    changes = {} if result.get("skipped") else likelihood_changes(batch["traces"], result.get("trace_logratio") or [])
    done_batch = {**batch, "submitted": True, "version_after": result["version"], "ranking_id": record["ranking_id"],
                  "changes": changes,
                  "recorded": [*(batch.get("recorded") or []),
                               {"annotator": annotator, "ranking_id": record["ranking_id"], "update": True}]}
    skipped = f" ({result.get('skip_reason') or 'no step applied'}; weights unchanged)" if result.get("skipped") else ""
    below = f" · {len(negatives)} rejected trace(s) trained below the line" if negatives else ""
    verb = "NOT applied" if result.get("skipped") else "applied"
    summary = (f"{config.algorithm.upper()} update {verb} by {annotator}{below}: policy v{record['version_before']} → "
               f"v{result['version']} · loss {_num(result['loss'])} · KL {_num(result['kl'])} · "
               f"{result['seconds']:.1f}s{_prepared(result, len(batch['traces']) + len(negatives))}{skipped}")
    summary += _what_it_did(result)
    summary += f" · stored as ranking #{record['ranking_id']} in workspace {room.workspace}"
    yield {"session": {**session, "batch": done_batch, "annotator": annotator},
           "update_progress": progress_html("Update done", 1, f"policy v{result['version']}", "done"),
           "update_status": status_html(summary, "warn" if skipped else "ok"), **ranking_view(done_batch),
           **heads_view(done_batch),
           **metrics_view(room), "_info": f"Policy updated to v{result['version']}"}


def _prepared(result: dict, trained: int) -> str:
    """How much of the first step was computed while the clinician read (training/prepared.py)."""
    n = result.get("prepared_traces") or 0
    return f" (first step prepared while you read, {n} of {trained} traces)" if n else ""


def build_rank_panel(room, ui: dict) -> None:
    ui["annotator"] = gr.Textbox(label="Your name", placeholder="stored with every ranking you submit",
                                 elem_id="annotator", max_length=80)
    with gr.Column(elem_id="ranking-control", variant="panel"):
        ui["ranking"] = gr.Radio([], label="Ranking — best at the top", elem_id="ranking-list", interactive=False)
        with gr.Row():
            ui["rank_up"] = gr.Button("▲ Move up", size="sm", elem_id="rank-up")
            ui["rank_down"] = gr.Button("▼ Move down", size="sm", elem_id="rank-down")
    ui["rank_message"] = gr.HTML(ranking_view(None)["rank_message"], elem_id="rank-message")
    ui["algorithm"] = gr.Radio(list(ALGORITHMS), value="DPO", label="Update", elem_id="algorithm")
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        d = DEFAULTS["dpo"]
        ui["beta"] = gr.Number(d.beta, label="beta", minimum=0, elem_id="beta",
                               info=help_text(DPOConfig, "beta") + " " + help_text(GRPOConfig, "beta"))
        ui["lr"] = gr.Number(room.default_lr(), label="Learning rate", minimum=0, elem_id="lr",
                             info=help_text(OptimConfig, "lr"))
        steps = effective("steps", next(f for f in fields(OptimConfig) if f.name == "steps").metadata["range"])
        ui["steps"] = gr.Slider(int(steps.low), int(steps.high), value=OptimConfig().steps, step=1,
                                label="Optimisation steps", elem_id="steps", info=help_text(OptimConfig, "steps"))
        gr.HTML(f'<div class="cr-muted">{help_text(OptimConfig, "max_kl")}</div>', elem_id="kl-ceiling-note")
        ui["loss_type"] = gr.Dropdown(list(DPO_LOSS_TYPES), value=d.loss_type, label="Loss variant", elem_id="loss-type")
    with gr.Row():
        ui["update_button"] = gr.Button("Submit ranking & update policy", variant="primary", elem_id="update-button", scale=3)
        ui["record_button"] = gr.Button("Record ranking only", elem_id="record-button", scale=2)
    gr.HTML('<div class="cr-muted">“Record ranking only” stores your order without training (a second opinion): '
            'where two or more clinicians rank the same traces, the Data tab shows their agreement.</div>')
    ui["update_progress"] = gr.HTML(progress_html("Idle", 0, "", "idle"), elem_id="update-progress")
    ui["update_status"] = gr.HTML("", elem_id="update-status")


def bind_rank(room, ui: dict) -> None:
    light_event(ui["rank_up"].click, move_up, room, ui, ["session", "ranking", *COMMENTS], MOVE_OUTPUTS)
    light_event(ui["rank_down"].click, move_down, room, ui, ["session", "ranking", *COMMENTS], MOVE_OUTPUTS)
    light_event(ui["algorithm"].input, algorithm_changed, room, ui, ["algorithm", "session"], ["beta", "loss_type"])
    light_event(ui["record_button"].click, record_only, room, ui, ["session", "annotator", "use_negatives", *COMMENTS],
                ["session", "update_status", "ranking", "rank_message"], show_progress="minimal")
    updated = engine_event(ui["update_button"].click, submit, room, ui,
                           ["session", "annotator", "algorithm", "beta", "lr", "steps", "loss_type", "use_negatives",
                            *COMMENTS],
                           SUBMIT_OUTPUTS,
                           show_progress="minimal", show_progress_on=[ui["update_progress"]])
    # the belief chart refreshes after every update
    engine_event(updated.then, belief_view, room, ui, ["session"], ["belief"], show_progress="hidden")
