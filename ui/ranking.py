"""Ranking rules, as pure functions of trace dicts (``Trace.to_dict()``).

A ranking is a best-to-worst list of trace ids. The UI's control only ever
reorders a complete list (so it cannot produce duplicates or gaps) and
``validate_order`` checks every submitted ranking again on the server.
Rejected traces may join the group *below the line*: tied under every ranked
trace, never rankable above one (``validate_negatives``).
"""
from __future__ import annotations

import string

from rlhf_core.rollout.sampler import changed_mind


class RankingError(ValueError):
    """A ranking that cannot be submitted; the message says why, for the clinician."""


class HeldOutCase(RankingError):
    """An update asked for on a case held out for evaluation, without the clinician's confirmation."""

    def __init__(self, case_id: str):
        self.case_id = case_id
        super().__init__(
            f"Case {case_id} is held out for evaluation: the Evaluate tab's A/B and the probe's held-out line "
            "score it, and training on it makes them less honest. Submit again to train on it anyway "
            "(“Record ranking only” stores the ranking without training).")


def _safety_module():
    try:
        from rlhf_core.clinical import safety
    except ImportError:  # pragma: no cover - the safety checker ships with the engine
        return None
    return safety


def safety_result(safety: dict | None):
    """A trace's safety dict back as ``rlhf_core.clinical.safety.SafetyResult`` (None without the module)."""
    module = _safety_module()
    if module is None or safety is None:
        return None
    fields = ("kind", "severity", "drug", "reason", "evidence", "rule")
    violations = tuple(module.Violation(**{f: v.get(f) for f in fields}) for v in safety.get("violations") or [])
    return module.SafetyResult(score=safety.get("score", 1.0), violations=violations)


def hard_violations(trace: dict) -> list[dict]:
    """The trace's safety violations of severity "hard"."""
    safety = trace.get("safety") or {}
    return [v for v in safety.get("violations") or [] if v.get("severity") == "hard"]


def first_place_refusal(trace: dict) -> str | None:
    """Why a trace may not be placed first (a hard safety violation), or None."""
    result = safety_result(trace.get("safety"))
    if result is not None:
        ok, why = _safety_module().can_rank_first(result)
        return None if ok else why
    hard = hard_violations(trace)
    return "a trace with a hard safety violation cannot be ranked best" if hard else None


def can_rank_first(trace: dict) -> bool:
    return first_place_refusal(trace) is None


def letter(index: int) -> str:
    """Display name of the index-th rankable trace: A, B, ..., Z, then 27, 28, ..."""
    return string.ascii_uppercase[index] if index < 26 else str(index + 1)


def initial_order(traces: list[dict]) -> list[str]:
    """Generation order, with traces whose reasoning first concluded another diagnosis
    moved below the others, and traces that may not be first to the bottom."""

    def place(t: dict) -> tuple[bool, bool]:
        return not can_rank_first(t), changed_mind(t.get("verdict"))

    return [t["trace_id"] for t in sorted(traces, key=place)]


def move(order: list[str], trace_id: str, delta: int, traces: list[dict]) -> tuple[list[str], str | None]:
    """Move one trace up (delta -1) or down (+1). Returns (new order, refusal or None)."""
    if trace_id not in order:
        return order, "Select a trace in the ranking first."
    i = order.index(trace_id)
    j = i + delta
    if not 0 <= j < len(order):
        return order, None
    new = list(order)
    new[i], new[j] = new[j], new[i]
    by_id = {t["trace_id"]: t for t in traces}
    why = first_place_refusal(by_id[new[0]])
    if why:
        return order, f"Trace {letter(order_index(traces, new[0]))} cannot be placed first: {why}."
    return new, None


def order_index(traces: list[dict], trace_id: str) -> int:
    for i, t in enumerate(traces):
        if t["trace_id"] == trace_id:
            return i
    raise KeyError(trace_id)


def validate_order(order: list[str], traces: list[dict], below_the_line: int = 0) -> list[int]:
    """Check a best-to-worst list of trace ids; returns it as indices into ``traces``.

    ``below_the_line``: how many rejected traces will join the group under every
    accepted one (then a single accepted trace is enough). Raises RankingError
    for duplicates, gaps, unknown ids, rejected traces, or a hard-safety trace
    in first place.
    """
    ids = [t["trace_id"] for t in traces]
    if not traces:
        raise RankingError("No trace passed the verifier, so there is nothing to rank above the line; generate again.")
    if len(traces) + below_the_line < 2:
        raise RankingError("At least two accepted traces (or one above rejected ones below the line) are needed; generate again.")
    unknown = [x for x in order if x not in ids]
    if unknown:
        raise RankingError(f"Unknown trace id(s) in the ranking: {', '.join(map(str, unknown))}.")
    dupes = sorted({x for x in order if order.count(x) > 1})
    if dupes:
        raise RankingError(f"Each trace must appear once; repeated: {', '.join(dupes)}.")
    missing = [x for x in ids if x not in order]
    if missing:
        raise RankingError(f"Rank every accepted trace; missing: {', '.join(missing)}.")
    for t in traces:
        if not (t.get("verdict") or {}).get("accepted"):
            raise RankingError(f"Trace {t['trace_id']} was rejected by the verifier and cannot be ranked.")
    indices = [ids.index(x) for x in order]
    if not any(can_rank_first(t) for t in traces):
        raise RankingError("Every accepted trace has a hard safety violation, so none can be ranked first. Generate again.")
    why = first_place_refusal(traces[indices[0]])
    if why:
        raise RankingError(f"Trace {letter(indices[0])} cannot be placed first: {why}.")
    module = _safety_module()
    if module is not None and all(t.get("safety") is not None for t in traces):
        try:
            module.validate_ranking(indices, [safety_result(t["safety"]) for t in traces])
        except ValueError as err:
            raise RankingError(str(err)) from err
    return indices


def validate_negatives(negatives: list[dict], traces: list[dict]) -> None:
    """Rejected traces offered below the line must be rejected, distinct from the
    ranked ones and answer the same case. Raises RankingError otherwise."""
    ids = {t["trace_id"] for t in traces}
    case_ids = {t.get("case_id") for t in traces}
    seen: set[str] = set()
    for t in negatives:
        if (t.get("verdict") or {}).get("accepted"):
            raise RankingError(f"Trace {t['trace_id']} passed the verifier; it belongs above the line, not below it.")
        if t["trace_id"] in ids or t["trace_id"] in seen:
            raise RankingError(f"Trace {t['trace_id']} appears twice in the ranking.")
        if t.get("case_id") not in case_ids:
            raise RankingError(f"Trace {t['trace_id']} answers another case.")
        seen.add(t["trace_id"])
