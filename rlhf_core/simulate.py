"""The headless loop: generate -> verify -> rank (scripted clinician) -> update."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .clinical.cases import Case
from .engine import Engine
from .rollout.generation import SamplingConfig
from .rollout.records import Trace
from .library import library_or_builtin
from .reward.reward_data import MODEL_RANKED
from .rollout.sampler import RejectionConfig, changed_mind
from .training.update import make_config


def scripted_ranking(traces: list[Trace]) -> list[int]:
    """The simulated clinician: verified first; among them, reasoning consistent with its
    conclusion before reasoning that first concluded another diagnosis (the warning the
    clinician sees on the card, and the app's initial order); then safer, then more concise."""

    def key(i: int):
        t = traces[i]
        verdict = t.verdict or {}
        safety = t.safety["score"] if t.safety else 1.0
        return (not verdict.get("accepted"), changed_mind(verdict), -safety,
                len(t.completion_ids), i)

    return sorted(range(len(traces)), key=key)


def model_ranking(traces: list[Trace], reward_model) -> list[int]:
    """The autopilot's order: the verifier is a hard gate (verified first), then the
    reward model's score (a trace it cannot score goes last among its side of the gate)."""
    scores = reward_model.score_traces([t.features for t in traces])

    def key(i: int):
        verified = bool(traces[i].verdict and traces[i].verdict.get("accepted"))
        return (not verified, scores[i] is None, -(scores[i] or 0.0), i)

    return sorted(range(len(traces)), key=key)


@dataclass
class SimulationSettings:
    """What ``simulate`` runs."""

    algorithm: str = "dpo"  # "dpo" | "grpo"
    updates: int = 3  # rankings to apply
    traces: int = 4  # traces ranked per update (K)
    max_new_tokens: int = 128
    seed: int = 0
    budget: int = 8  # un-hinted samples per case before rationalising
    steps: int = 2  # optimisation steps per ranking
    lr: float | None = None  # None: the engine's default for the mode
    conclusion: str = "constrained"  # SamplingConfig.conclusion
    negatives: int = 4  # rejected traces below the line (RejectionConfig.negatives); 0: none
    # rank with the workspace's reward model (fitted on its clinicians' rankings; verified
    # traces first) instead of the scripted clinician; recorded as source "autopilot"
    autopilot: bool = False

    def __post_init__(self) -> None:
        if self.updates < 1:
            raise ValueError(f"updates must be >= 1, got {self.updates}")
        if self.traces < 2:
            raise ValueError(f"traces must be >= 2 to rank, got {self.traces}")


def run_simulation(
    engine: Engine,
    settings: SimulationSettings,
    cases: list[Case] | None = None,
    on_update: Callable[[dict], None] | None = None,
    annotator: str = "simulated-clinician",
) -> list[dict]:
    """Run ``settings.updates`` generate-rank-update rounds; returns one metrics dict each.

    With a store attached to the engine every trace, ranking (committed before
    its update starts), update and checkpoint is recorded, and the run carries
    on from the workspace's history: update numbers, the case order and the
    sampling seeds continue where the previous run stopped. With ``settings.autopilot``
    the workspace's reward model ranks (``model_ranking``): it needs a store whose
    workspace holds enough clinician rankings, and every ranking it makes is labelled
    (source "autopilot", annotator "autopilot (reward model vN)").
    """
    cases = cases or library_or_builtin()
    reward_model = clinicians_reward_model(engine) if settings.autopilot else None
    rng = random.Random(settings.seed)
    order = rng.sample(cases, len(cases))
    start = len(engine.workspaces.history())
    results = []
    for n in range(start, start + settings.updates):
        metrics = play_round(engine, order[n % len(order)], settings, n, reward_model, annotator)
        results.append(metrics)
        if on_update:
            on_update(metrics)
    return results


def play_round(engine: Engine, case: Case, settings: SimulationSettings, n: int, reward_model=None,
               annotator: str = "simulated-clinician") -> dict:
    """One generate-rank-update round on ``case`` (the ``n``-th: it seeds the sampling).
    The scripted clinician ranks, or the ``reward_model`` (autopilot, labelled as such)."""
    sampling = SamplingConfig(
        k=settings.traces, max_new_tokens=settings.max_new_tokens, seed=settings.seed * 1000 + n,
        conclusion=settings.conclusion,
    )
    rejection = RejectionConfig(k=settings.traces, budget=settings.budget, rationalise_budget=settings.traces,
                                negatives=settings.negatives)
    started = time.perf_counter()
    result = engine.sample_verified(case, sampling, rejection)
    generation_seconds = time.perf_counter() - started
    # Rank the accepted traces; rejected ones join the group below the line
    # (verified-above-unverified is itself signal). With no accepted trace at
    # all, the scripted clinician orders rejected ones (safer, shorter first).
    group = list(result.accepted)
    ranked = len(group) if group and result.negatives else None
    group += result.negatives
    if len(group) < 2:
        chosen_ids = {t.trace_id for t in group}
        group += [t for t in result.all_traces if t.trace_id not in chosen_ids][: settings.traces - len(group)]
        ranked = None
    ranking = model_ranking(group, reward_model) if reward_model else scripted_ranking(group)
    config = make_config(settings.algorithm, steps=settings.steps, lr=settings.lr)
    safety_scores = [t.safety["score"] for t in group if t.safety]
    extra = dict(
        update=n,
        case_id=case.id,
        acceptance_rate=result.report.acceptance_rate,
        sampling=result.report.to_dict(),
        ranked_accepted=len(result.accepted),
        ranked_changing_mind=sum(changed_mind(t.verdict) for t in result.accepted),
        below_the_line=len(group) - ranked if ranked else 0,
        ranked_rationalised=sum(t.rationalised for t in group),
        safety_mean=sum(safety_scores) / len(safety_scores) if safety_scores else None,
        generation_seconds=generation_seconds,
    )
    source = "app"
    if reward_model:
        annotator, source = f"autopilot (reward model v{reward_model.info['version']})", MODEL_RANKED
        extra.update(autopilot=True, reward_model_version=reward_model.info["version"])
    return engine.update(group, ranking, config, annotator=annotator, case=case, extra_metrics=extra,
                         ranked=ranked, source=source)


def clinicians_reward_model(engine: Engine, advisor=None):
    """The workspace's reward model, fitted on its clinicians' rankings (``advisor``: a
    ``RankingAdvisor`` of the engine's store, default a new one); ValueError when too few."""
    from .reward.suggest import RankingAdvisor

    advisor = advisor or RankingAdvisor(engine.store)
    model = advisor.model(engine.workspace)
    if model is None:
        raise ValueError(f"autopilot needs at least {advisor.config.min_rankings} clinician rankings with features "
                         f"in workspace {engine.workspace!r} to fit its reward model")
    return model


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write ``rows`` to ``path`` as JSON lines (replacing the file)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
