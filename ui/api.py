"""Named API endpoints, so ``gradio_client`` can drive the whole loop headlessly:

    /cases        list the cases (optionally of one specialty)
    /generate     rejection-sample K verified traces for a case -> batch_id + traces
    /rank_update  rank a batch (trace ids, best first) and update the policy -> metrics
    /metrics      the metrics history (of the active workspace, when the app has a
                  database) and the model's state

Generation and updates share the UI's engine queue (one at a time). As in the browser, the
reference pass a batch's update needs runs once /generate has answered, while the client
reads the traces, so a /rank_update sent later starts training at once.
"""
from __future__ import annotations

import gradio as gr

from rlhf_core.rollout.generation import SamplingConfig
from rlhf_core.rollout.sampler import RejectionConfig

from .ranking import RankingError, can_rank_first
from .rank_tab import DEFAULTS
from .wiring import ENGINE_QUEUE


def trace_summary(trace: dict) -> dict:
    verdict = trace.get("verdict") or {}
    safety = trace.get("safety") or {}
    return {
        "trace_id": trace["trace_id"], "text": trace["text"], "accepted": bool(verdict.get("accepted")),
        "rationalised": bool(trace.get("rationalised")), "diagnosis": verdict.get("diagnosis"),
        "reason": verdict.get("reason"), "code": verdict.get("code"),
        # an accepted trace whose reasoning first concluded another candidate: that phrase
        "earlier_conclusion": verdict.get("earlier_conclusion"), "safety_score": safety.get("score"),
        "violations": safety.get("violations") or [], "can_rank_first": can_rank_first(trace),
        "policy_version": trace.get("policy_version"),
    }


def api_cases(room, specialty: str = "") -> list[dict]:
    return [{"id": c.id, "specialty": c.specialty, "difficulty": c.difficulty, "question": c.question}
            for c in room.cases.values() if not specialty or c.specialty == specialty]


def api_generate(room, case_id: str, k: int = 4, max_new_tokens: int = SamplingConfig.max_new_tokens,
                 temperature: float = 0.8, budget: int = RejectionConfig().budget, rationalise: bool = True,
                 conclusion: str | None = None, negatives: int = RejectionConfig().negatives) -> dict:
    if case_id not in room.cases:
        raise gr.Error(f"unknown case {case_id!r}; see /cases")
    try:
        sampling = SamplingConfig(k=int(k), max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  conclusion=room.conclusion_mode(conclusion or None))
        rejection = RejectionConfig(k=int(k), budget=max(int(budget), int(k)), rationalise=bool(rationalise),
                                    negatives=int(negatives))
    except ValueError as err:
        raise gr.Error(str(err)) from err
    last = None
    for last in room.runner.sample(room.case(case_id), sampling, rejection):
        pass
    accepted = [t.to_dict() for t in last.accepted]
    below = [t.to_dict() for t in last.negatives]
    suggestion = room.suggest_order(accepted)
    batch_id = room.remember_batch(accepted, case_id, last.report.acceptance_rate, getattr(last, "generation_id", None),
                                   negatives=below, suggestion=suggestion)
    # the pass their update will need runs while the client reads them (as it does for the browser)
    room.runner.prepare_in_background(accepted + below, room.batch(batch_id)["model_key"])
    shown = {t["trace_id"] for t in accepted + below}
    return {
        "batch_id": batch_id, "case_id": case_id, "policy_version": room.version,
        "traces": [trace_summary(t) for t in accepted],
        "below_the_line": [trace_summary(t) for t in below],
        "rejected": [trace_summary(t.to_dict()) for t in last.traces if t.trace_id not in shown],
        "report": last.report.to_dict(),
        # the reward model's order (best first) and how good it is; a suggestion only: send your own ranking
        "suggested_order": suggestion and {k: suggestion[k] for k in ("order", "scores", "reward_model")},
    }


def api_rank_update(room, batch_id: str, ranking: list[str], annotator: str, algorithm: str = "dpo",
                    comments: dict | None = None, beta: float | None = None, lr: float | None = None,
                    steps: int = 2, loss_type: str | None = None, negatives: bool = True,
                    train_heldout: bool = False) -> dict:
    try:
        batch = room.batch(batch_id)
    except KeyError as err:
        raise gr.Error(str(err.args[0])) from err
    if batch["submitted"]:
        raise gr.Error(f"batch {batch_id} was already ranked; generate again")
    algorithm = (algorithm or "dpo").lower()
    if algorithm not in DEFAULTS:
        raise gr.Error(f"algorithm must be 'dpo' or 'grpo', got {algorithm!r}")
    kwargs = {"steps": steps, "lr": lr, "beta": DEFAULTS[algorithm].beta if beta is None else beta}
    if loss_type:
        kwargs["loss_type"] = loss_type
    try:
        config = type(DEFAULTS[algorithm])(**kwargs)
        final = None
        for final in room.runner.update(batch["traces"], list(ranking), config, annotator=annotator, model_key=batch["model_key"],
                                 comments=dict(comments or {}), acceptance_rate=batch["acceptance_rate"],
                                 generation_id=batch.get("generation_id"),
                                 negatives=(batch.get("negatives") or []) if negatives else [],
                                 suggestion=batch.get("suggestion"), train_heldout=bool(train_heldout)):
            pass
    except (RankingError, ValueError) as err:
        raise gr.Error(str(err)) from err
    batch["submitted"] = True
    return {"ranking_id": final["ranking"]["ranking_id"], **final["result"],
            "version_before": final["ranking"]["version_before"]}


def api_metrics(room) -> dict:
    return {"model": room.describe(), "updates": room.metrics("update"), "steps": room.metrics("step"),
            "generations": room.metrics("generation")}


def build_api(room) -> None:
    """Register the endpoints (inside the app's ``gr.Blocks``)."""

    def cases(specialty: str = "") -> list[dict]:
        """The case library: id, specialty, difficulty and question of each case."""
        return api_cases(room, specialty)

    def generate(case_id: str, k: int = 4, max_new_tokens: int = SamplingConfig.max_new_tokens, temperature: float = 0.8,
                 budget: int = RejectionConfig().budget, rationalise: bool = True, conclusion: str = "",
                 negatives: int = RejectionConfig().negatives) -> dict:
        """Rejection-sample K verified traces for a case. Returns batch_id, the rankable traces
        (trace_id, text, verdict, safety, can_rank_first), the rejected ones offered below the line,
        the other rejected ones and the sampling report. ``conclusion``: "constrained" or "free"
        (empty: the workspace's setting)."""
        return api_generate(room, case_id, k, max_new_tokens, temperature, budget, rationalise, conclusion, negatives)

    def rank_update(batch_id: str, ranking: list[str], annotator: str, algorithm: str = "dpo",
                    comments: dict | None = None, beta: float | None = None, lr: float | None = None,
                    steps: int = 2, loss_type: str | None = None, negatives: bool = True) -> dict:
        """Rank a generated batch (every accepted trace id, best first) and update the policy with
        DPO or GRPO; with ``negatives`` the batch's rejected traces below the line are trained as
        worse than every ranked one. Returns the update's metrics (loss, kl, rewards, version, ...)."""
        return api_rank_update(room, batch_id, ranking, annotator, algorithm, comments, beta, lr, steps, loss_type,
                               negatives)

    def metrics() -> dict:
        """The metrics history of this app (generations, steps, updates) and the model's state."""
        return api_metrics(room)

    gr.api(cases, api_name="cases", concurrency_limit=None)
    gr.api(generate, api_name="generate", concurrency_id=ENGINE_QUEUE, concurrency_limit=1)
    gr.api(rank_update, api_name="rank_update", concurrency_id=ENGINE_QUEUE, concurrency_limit=1)
    gr.api(metrics, api_name="metrics", concurrency_limit=None)
