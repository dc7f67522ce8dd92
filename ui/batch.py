"""A session's batch of traces (plain dicts in ``gr.State``) and the views of it
shared by the trace cards and the ranking control."""
from __future__ import annotations

import gradio as gr

from rlhf_core.rollout.sampler import changed_mind

from .ranking import can_rank_first, initial_order, letter
from .views import below_the_line_html, esc, live_header, rejected_html, status_html, trace_header

MAX_CARDS = 8  # trace-card slots on the page (the most traces one can rank at once)
SLIM_KEYS = ("trace_id", "text", "verdict", "safety", "rationalised", "policy_version", "completion_ids")


def slim(trace: dict) -> dict:
    """What the page needs of a rejected trace (no log-probs)."""
    return {k: trace.get(k) for k in SLIM_KEYS}


def new_batch(case_id: str, accepted: list[dict], rejected: list[dict], model_key: str, report: dict, version: int,
              generation_id: str | None = None, second_opinions: bool = False, negatives: list[dict] | None = None) -> dict:
    """A session's batch. ``second_opinions``: rankings can be recorded without an update
    (the app has a database), also after the batch was submitted for an update.
    ``negatives``: rejected traces (whole, they are trained on) offered below the line."""
    negatives = list(negatives or [])
    below = {t["trace_id"] for t in negatives}
    return {
        "case_id": case_id, "traces": accepted, "negatives": negatives,
        "rejected": [slim(t) for t in rejected if t["trace_id"] not in below],
        "order": initial_order(accepted), "model_key": model_key, "report": report,
        "acceptance_rate": report.get("acceptance_rate"), "version": version, "submitted": False,
        "generation_id": generation_id, "second_opinions": bool(second_opinions), "recorded": [],
    }


def trainable(batch: dict) -> list[dict]:
    """Every trace an update of the batch can train on: the rankable ones, then those below the line."""
    return [*batch["traces"], *(batch.get("negatives") or [])]


def with_suggestion(batch: dict, suggestion: dict | None) -> dict:
    """The batch pre-sorted by the reward model's suggestion (traces that may not be first
    still go to the bottom); the suggestion records the order as shown."""
    by_id = {t["trace_id"]: t for t in batch["traces"]}
    if not suggestion or sorted(suggestion["order"]) != sorted(by_id):
        return batch
    order = initial_order([by_id[t] for t in suggestion["order"]])
    return {**batch, "order": order, "suggestion": {**suggestion, "order": order}}


def suggestion_note(batch: dict) -> str:
    """Says where the starting order came from, and how far to trust it."""
    suggestion = batch.get("suggestion")
    if not suggestion:
        return ""
    rm = suggestion["reward_model"]
    accuracy = rm.get("pairwise_accuracy")
    trust = f"{accuracy:.0%} of held-out pairs ordered as clinicians did" if accuracy == accuracy else "accuracy not known yet"
    return (f" Starting order suggested by the reward model (v{rm['version']}, fitted on {rm['version']} rankings; "
            f"{trust}). It is only a suggestion: check it and reorder before you submit.")


def can_reorder(batch: dict | None) -> bool:
    """Whether the ranking control may change: before the update, or for a second opinion after it."""
    return bool(batch) and (not batch.get("submitted") or bool(batch.get("second_opinions")))


def recorded_note(batch: dict) -> str:
    """Who has ranked these traces so far (stored rankings of this session's batch)."""
    who = [r["annotator"] + (" (update)" if r.get("update") else "") for r in batch.get("recorded") or []]
    return f" Stored rankings of these traces: {', '.join(who)}." if who else ""


def positions(batch: dict | None) -> dict[str, int]:
    return {tid: i + 1 for i, tid in enumerate((batch or {}).get("order") or [])}


def shown(batch: dict | None) -> list[tuple[int, dict]]:
    """(index in the batch, trace) of each card slot: the rankable traces in ranking order,
    so moving a trace up or down moves its card (its letter stays with it)."""
    traces = (batch or {}).get("traces") or []
    by_id = {t["trace_id"]: (i, t) for i, t in enumerate(traces)}
    order = (batch or {}).get("order") or []
    if sorted(order) != sorted(by_id):  # no ranking yet (or a stale one): batch order
        return list(enumerate(traces))
    return [by_id[tid] for tid in order]


def card_view(i: int, trace: dict | None = None, live_text: str | None = None, phase: str = "sampling",
              position: int | None = None, reset_comment: bool = False, change: dict | None = None,
              index: int | None = None, comment: str | None = None) -> dict:
    """Outputs of card slot ``i``: a finished trace (``index``: its place in the batch, which
    names it; ``comment``: the text its comment box gets), a trace being decoded, or hidden."""
    value = {"value": comment} if comment is not None else ({"value": ""} if reset_comment else {})
    comment_box = {"visible": trace is not None, **value}
    if trace is not None:
        head, text, visible = trace_header(trace, i if index is None else index, position, change), trace["text"], True
    elif live_text is not None:
        head, text, visible = live_header(i, phase), live_text, True
    else:
        head, text, visible = "", "", False
    return {f"card{i}": gr.update(visible=visible), f"card{i}_head": head, f"card{i}_text": text,
            f"card{i}_comment": gr.update(**comment_box)}


# everything cards_view returns: the card slots, the below-the-line panel, the other rejected traces
CARD_OUTPUTS = [f"card{i}{part}" for i in range(MAX_CARDS) for part in ("", "_head", "_text", "_comment")] + [
    "below_html", "rejected_acc", "rejected_html"]


CLEARED_OUTPUTS = ["traces_title", *CARD_OUTPUTS, "ranking", "rank_message"]  # what cleared_view returns


def cleared_view() -> dict:
    """No batch: empty cards, title and ranking (e.g. once another case is picked)."""
    return {"traces_title": traces_title(None), **cards_view(None, reset_comments=True), **ranking_view(None)}


def cards_view(batch: dict | None, reset_comments: bool = False, comments: dict[str, str] | None = None) -> dict:
    """Every card slot for a finished batch: its rankable traces in ranking order, with their
    rank (``comments``: each trace's comment, by trace id, to carry along when cards move)."""
    slots = shown(batch)
    pos = positions(batch)
    changes = (batch or {}).get("changes") or {}  # what the update did to each trace, once submitted
    out = {}
    for i in range(MAX_CARDS):
        index, trace = slots[i] if i < len(slots) else (None, None)
        tid = trace["trace_id"] if trace else None
        out.update(card_view(i, trace, position=pos.get(tid), reset_comment=reset_comments, change=changes.get(tid),
                             index=index, comment=None if comments is None or tid is None else comments.get(tid, "")))
    rejected = (batch or {}).get("rejected") or []
    out["rejected_acc"] = gr.update(label=f"Other rejected traces ({len(rejected)}) — shown for context, not trained on")
    out["rejected_html"] = rejected_html(rejected)
    out["below_html"] = below_the_line_html((batch or {}).get("negatives") or [])
    return out


def live_cards_view(accepted: list[dict], partial: list[str], phase: str, k: int) -> dict:
    """While sampling: accepted traces first, then the batch being decoded."""
    out = {}
    free = max(0, k - len(accepted))
    live = partial[:free]
    for i in range(MAX_CARDS):
        if i < len(accepted):
            out.update(card_view(i, accepted[i]))
            # no comment box yet: the finished batch may show its cards in another (the ranking's) order
            out[f"card{i}_comment"] = gr.update(visible=False)
        elif i - len(accepted) < len(live):
            out.update(card_view(i, live_text=live[i - len(accepted)], phase=phase))
        else:
            out.update(card_view(i))
    return out


def ranking_label(trace: dict, index: int, position: int, reward: float | None = None) -> str:
    """What tells the traces apart (they all reach the same diagnosis): the first words
    of the reasoning, its length, the safety score, the reward model's score and any warning."""
    words = (trace.get("text") or "").split()
    opening = " ".join(words[:6]) + ("…" if len(words) > 6 else "")
    label = f"{position}. Trace {letter(index)} — “{opening}” · {len(words)} words"
    score = (trace.get("safety") or {}).get("score")
    if isinstance(score, (int, float)):
        label += f" · safety {score:.2f}"
    if reward is not None:
        label += f" · reward model {reward:+.2f}"
    if not can_rank_first(trace):
        label += " · ⚠ hard safety violation"
    if changed_mind(trace.get("verdict")):
        label += " · ⚠ first concluded another diagnosis"
    if trace.get("rationalised"):
        label += " · rationalised"
    return label


def ranking_view(batch: dict | None, selected: str | None = None) -> dict:
    """The ranking control (a best-to-worst list) and its message."""
    traces = (batch or {}).get("traces") or []
    if not batch:
        return {"ranking": gr.update(choices=[], value=None, interactive=False),
                "rank_message": status_html("Generate traces for a case, then order them here, best first.", "info")}
    index = {t["trace_id"]: i for i, t in enumerate(traces)}
    by_id = {t["trace_id"]: t for t in traces}
    rewards = (batch.get("suggestion") or {}).get("scores") or {}
    choices = [(ranking_label(by_id[tid], index[tid], p + 1, rewards.get(tid)), tid) for p, tid in enumerate(batch["order"])]
    if batch.get("submitted"):
        done = f"Ranking submitted (policy v{batch.get('version_after', '?')})."
        if batch.get("second_opinions"):
            message = status_html(f"{done} Another clinician may reorder these traces and press “Record ranking only” "
                                  f"(a second opinion, for the agreement view); generate new traces to update again."
                                  f"{recorded_note(batch)}", "ok")
            return {"ranking": gr.update(choices=choices, value=selected if selected in index else None, interactive=True),
                    "rank_message": message}
        message = status_html(f"{done} Generate new traces to rank again.", "ok")
        return {"ranking": gr.update(choices=choices, value=None, interactive=False), "rank_message": message}
    below = len(batch.get("negatives") or [])
    if not traces or len(traces) + below < 2:
        message = status_html(f"Only {len(traces)} trace(s) passed the verifier and none is below the line; ranking "
                              "needs at least 2. Generate again (a larger sample budget helps).", "warn")
        return {"ranking": gr.update(choices=choices, value=None, interactive=False), "rank_message": message}
    if len(traces) == 1:
        message = status_html(f"One trace passed the verifier: submitting trains it above the {below} rejected "
                              "trace(s) below the line." + recorded_note(batch), "info")
        return {"ranking": gr.update(choices=choices, value=None, interactive=False), "rank_message": message}
    if not any(can_rank_first(t) for t in traces):
        message = status_html("Every accepted trace has a hard safety violation, so none can be ranked first. Generate again.", "error")
        return {"ranking": gr.update(choices=choices, value=None, interactive=False), "rank_message": message}
    message = status_html("Select a trace, then move it up or down. Top = best. "
                          "Traces with a hard safety violation cannot be placed first." + suggestion_note(batch)
                          + recorded_note(batch), "info")
    return {"ranking": gr.update(choices=choices, value=selected if selected in index else None, interactive=True),
            "rank_message": message}


def heads_view(batch: dict | None) -> dict:
    """Card headers only (what the update did to each trace shows in them)."""
    pos = positions(batch)
    changes = (batch or {}).get("changes") or {}  # what the update did to each trace, once submitted
    return {f"card{i}_head": trace_header(t, index, pos.get(t["trace_id"]), changes.get(t["trace_id"]))
            for i, (index, t) in enumerate(shown(batch)[:MAX_CARDS])}


def moved_cards_view(batch: dict, comments: dict[str, str]) -> dict:
    """The card slots after a move: header, text and comment of each trace in its new place."""
    view = cards_view(batch, comments=comments)
    return {key: view[key] for i in range(MAX_CARDS) for key in (f"card{i}_head", f"card{i}_text", f"card{i}_comment")}


def comments_by_trace(batch: dict, comments) -> dict[str, str]:
    """The comment boxes (one per card slot, in the order the cards are shown) keyed by trace id."""
    return {t["trace_id"]: (comments[i] if i < len(comments) else "") or "" for i, (_, t) in enumerate(shown(batch))}


def traces_title(batch: dict | None) -> str:
    if not batch:
        return '<div class="cr-section-title">Traces</div>'
    return (f'<div class="cr-section-title">Traces for {esc(batch["case_id"])} '
            f'<span class="cr-muted">sampled at policy v{esc(batch["version"])} · '
            f'{len(batch["traces"])} rankable · {len(batch.get("negatives") or [])} below the line · '
            f'{len(batch["rejected"])} other rejected</span></div>')
