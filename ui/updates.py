"""What an update is made of and leaves behind, as plain functions of the submitted ranking:
the ranked group, the numbers the charts keep, the submitted record, the suggestion's record."""
from __future__ import annotations

import math
import time
import uuid

from rlhf_core.storage.export import kendall_tau
from rlhf_core.rollout.records import Trace
from rlhf_core.reward.reward_data import positions_changed

from .ranking import validate_negatives, validate_order

ALGORITHMS = {"DPO": "dpo", "GRPO": "grpo"}  # the update radio's labels -> rlhf_core's names


def ranked_group(order: list[str], traces: list[dict], negatives: list[dict] | None) -> tuple[list[Trace], list[int], int | None]:
    """(traces, best-to-worst indices, ranked) for ``Engine.update``: the ordered
    accepted traces, then the rejected ``negatives`` tied below the line.
    Raises RankingError for an invalid order or negative."""
    negatives = list(negatives or [])
    indices = validate_order(order, traces, below_the_line=len(negatives))
    validate_negatives(negatives, traces)
    indices += range(len(traces), len(traces) + len(negatives))
    return [Trace.from_dict(t) for t in [*traces, *negatives]], indices, len(traces) if negatives else None


def suggestion_record(suggestion: dict | None, order: list[str]) -> dict | None:
    """What is stored with a ranking about the reward model's suggested order: the
    suggestion itself (order, scores, the model and its accuracy), how many positions
    the clinician changed and Kendall's tau between the two orders."""
    if not suggestion or sorted(suggestion.get("order") or []) != sorted(order):
        return None
    return {**suggestion, "changed_positions": positions_changed(suggestion["order"], order),
            "kendall_tau": kendall_tau(suggestion["order"], order) if len(order) > 1 else None}


def update_extra(traces: list[Trace], indices: list[int], before: int, annotator: str, acceptance_rate: float | None,
                 generation: dict | None) -> dict:
    """What the charts need of an update beyond the trainer's metrics (stored with it);
    ``generation``: the live record of the sampling run the traces came from, if known."""
    safety = [t.safety["score"] for t in traces if t.safety]
    top = traces[indices[0]].safety
    extra = {
        "annotator": annotator, "case_id": traces[0].case_id, "version_before": before, "n_traces": len(traces),
        "below_the_line": sum(not (t.verdict or {}).get("accepted") for t in traces),
        "acceptance_rate": acceptance_rate,
        "safety_ranked": sum(safety) / len(safety) if safety else None,
        "safety_top": top["score"] if top else None,
        "sampled_version": min(t.policy_version for t in traces),
    }
    if generation:
        extra["generation_id"] = generation["generation_id"]
        for key in ("sampled", "accepted", "rationalised", "safety_accepted", "safety_all"):
            extra[key] = generation.get(key)
        extra["sampled_version"] = generation["version"]
        if extra["acceptance_rate"] is None:
            extra["acceptance_rate"] = generation["acceptance_rate"]
    return extra


def ranking_record(traces: list[Trace], indices: list[int], config, before: int, annotator: str, comments: dict,
               engine) -> dict:
    """What a clinician submitted, with the policy version each trace was sampled from."""
    return {
        "ranking_id": uuid.uuid4().hex[:12], "time": time.time(), "annotator": annotator,
        "case_id": traces[0].case_id, "model": engine.lm.name, "mode": engine.mode,
        "workspace": engine.workspace,
        "order": [traces[i].trace_id for i in indices],
        "traces": [t.to_dict() for t in traces],
        "sampled_versions": {t.trace_id: t.policy_version for t in traces},
        "policy_version_sampled": min(t.policy_version for t in traces),
        "version_before": before, "version_after": None,
        "comments": {k: v for k, v in comments.items() if v},
        "algorithm": config.algorithm, "config": dict(vars(config)), "metrics": None,
    }


def _ratio(logratio: float) -> float:
    """exp(logratio), clamped so a runaway log-ratio stays a finite JSON number."""
    return math.exp(max(-50.0, min(50.0, logratio)))


def likelihood_ratios(logratios: list[float | None], indices: list[int]) -> list[float | None] | None:
    """Best to worst: how many times more likely each ranked trace became (None when the
    trainer reported no per-trace log-ratios)."""
    if len(logratios) != len(indices):
        return None
    return [None if logratios[i] is None else _ratio(logratios[i]) for i in indices]


def likelihood_changes(traces: list[dict], logratios: list[float | None]) -> dict[str, dict]:
    """Per trace id of ``traces`` (the first ``len(traces)`` entries of the trainer's
    ``trace_logratio``, input order): ``ratio``, how many times more likely the update made
    the whole trace, and ``per_token``, its mean log-prob change per trained token (nats;
    inserted scaffold tokens, masked out of the loss, do not count)."""
    out = {}
    for trace, logratio in zip(traces, logratios):
        if logratio is None:
            continue
        mask = trace.get("loss_mask") or [1] * len(trace.get("completion_ids") or [])
        counted = sum(1 for m in mask if m)
        out[trace["trace_id"]] = {"ratio": _ratio(logratio),
                                  "per_token": logratio / counted if counted else 0.0}
    return out

