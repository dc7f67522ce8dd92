"""Rejection sampling: draw traces in batches until K distinct ones reach the
correct diagnosis, or the sample budget is spent.

When the budget runs out short, the remainder may be filled with rationalised
traces (STaR): sampled with the correct diagnosis as a hint, then verified like
any other. They are trained on as answering the un-hinted prompt and always
carry ``rationalised=True``. No trace text is ever edited or appended to.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from ..clinical.cases import Case
from .degenerate import degenerate_reason
from .generation import GenerationUpdate, SamplingConfig, setting
from .records import Trace
from ..clinical.safety import check_safety
from ..clinical.verify import check_trace, earlier_disagreement

# generate(case, config, hint) -> stream of GenerationUpdate, the last one carrying traces
GenerateFn = Callable[[Case, SamplingConfig, "str | None"], Iterator[GenerationUpdate]]


@dataclass
class RejectionConfig:
    """How hard to look for verified traces."""

    k: int = setting(4, "Accepted, distinct traces wanted (K).")
    # With the constrained conclusion ~22-28% of SmolLM2-135M's un-hinted samples pass
    # (bench/rankable.json): 8 free samples reach K = 4 on a quarter of the cases, 16 on
    # about 60%, so free samples get the larger budget and rationalisation is the last resort.
    budget: int = setting(16, "Most un-hinted samples drawn to find K verified traces.")
    rationalise: bool = setting(True, "Fill a shortfall with hinted (rationalised) traces, labelled as such.")
    rationalise_budget: int = setting(16, "Most hinted samples drawn.")
    # A decoding step on CPU costs less per row as rows are added (SmolLM2, 2 AMD cores without
    # AVX-512: 62 ms for 8 rows, 77 for 12, 90 for 16), and a batch now stops as soon as the run
    # has K verified traces, so the whole free budget in one batch reaches K soonest on a typical
    # case (~25% accepted: K = 4 needs ~16 samples). bench/rankable.py, 12 library cases:
    # median time to K 20.4 s with batches of 8 (no early stop), 17.5 s with 16 (12: 21.7 s).
    batch: int = setting(16, "Samples decoded together (never fewer than K); a batch stops once K verified traces "
                              "are in hand.")
    # so a generation with a single correct conclusion still teaches
    negatives: int = setting(4, "Rejected traces offered below the line, trained as worse than every ranked "
                                "trace; 0 trains on the ranked traces only.")

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 16:
            raise ValueError(f"k (traces to rank) must be between 2 and 16, got {self.k}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 sample, got {self.budget}")
        if self.rationalise_budget < 0:
            raise ValueError(f"rationalise_budget must be >= 0, got {self.rationalise_budget}")
        if not 1 <= self.batch <= 64:
            raise ValueError(f"batch must be between 1 and 64 samples, got {self.batch}")
        if not 0 <= self.negatives <= 16:
            raise ValueError(f"negatives must be between 0 and 16 traces, got {self.negatives}")


@dataclass
class SamplingReport:
    """Accounting of one rejection-sampling run: sampled = accepted + rejected."""

    sampled: int = 0  # un-hinted samples drawn
    accepted: int = 0  # un-hinted samples kept
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)  # verifier code (or "duplicate") -> count
    rationalised_sampled: int = 0
    rationalised_accepted: int = 0
    rationalised_rejected: int = 0
    cut_short: int = 0  # rows still reasoning when K were in hand: dropped, never judged

    @property
    def acceptance_rate(self) -> float:
        """Fraction of un-hinted samples the verifier accepted (the charted metric). Rows cut
        short once K were in hand were never judged and do not count, so this leans towards
        the rows that finish early; ``python -m rlhf_core diagnose`` samples without stopping."""
        return self.accepted / self.sampled if self.sampled else 0.0

    def to_dict(self) -> dict:
        """The counts as a JSON-ready dict, with ``acceptance_rate``."""
        data = asdict(self)
        data["rejected_by_reason"] = dict(self.rejected_by_reason)
        data["acceptance_rate"] = self.acceptance_rate
        return data


@dataclass
class SamplerEvent:
    """A progress snapshot for the UI."""

    phase: str  # "sampling" | "rationalising" | "done"
    partial_texts: list[str]  # texts of the batch being decoded
    traces: list[Trace]  # every finished trace so far, accepted and rejected, in order
    accepted: list[Trace]  # the (at most k) accepted traces to rank
    report: SamplingReport
    samples_done: int  # finished samples, hinted included
    samples_planned: int  # the most samples this run can draw
    negatives: list[Trace] = field(default_factory=list)  # rejected traces offered below the line


@dataclass
class SamplerResult:
    """A finished rejection-sampling run: the accepted traces, every trace drawn, the report and the negatives."""

    accepted: list[Trace]
    all_traces: list[Trace]
    report: SamplingReport
    negatives: list[Trace] = field(default_factory=list)


# Rejected traces that make the most useful negatives first: a wrong conclusion
# (the model committed to something else), then an unusable trace of the right
# diagnosis, then anything else; un-hinted before rationalised.
_NEGATIVE_ORDER = {"distractor": 0, "wrong_diagnosis": 0, "negated": 1, "multiple_diagnoses": 1}


def pick_negatives(traces: list[Trace], n: int) -> list[Trace]:
    """Up to ``n`` distinct rejected traces to place below the line, most useful first."""
    if n <= 0:
        return []
    seen: set[str] = set()
    rejected = []
    for t in traces:
        key = _dedup_key(t.text)
        if t.verdict and not t.verdict["accepted"] and t.verdict["code"] not in ("duplicate", "empty") and key not in seen:
            seen.add(key)
            rejected.append(t)
    rejected.sort(key=lambda t: (t.rationalised, _NEGATIVE_ORDER.get(t.verdict["code"], 2)))
    return rejected[:n]


def _dedup_key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def judge(text: str, case: Case, hinted: bool = False) -> dict:
    """The verifier's verdict on a trace's text. A correct conclusion without
    reasoning worth ranking (``degenerate``) is rejected; one whose reasoning first
    concluded another candidate stands (the last word counts) but says so in
    ``earlier_conclusion`` and its reason, for the clinician who ranks it."""
    verdict = check_trace(text, case).to_dict()
    if verdict["accepted"]:
        found = degenerate_reason(text, verdict["diagnosis"], hinted=hinted)
        if found:
            verdict.update(accepted=False, code=found[0], reason=f"correct diagnosis, but {found[1]}")
    if verdict["accepted"]:
        earlier = earlier_disagreement(text, case)
        if earlier:
            verdict.update(earlier_conclusion=earlier,
                           reason=f"{verdict['reason']}, but its reasoning first concluded '{earlier}'")
    return verdict


def changed_mind(verdict: dict | None) -> bool:
    """Whether ``judge`` found that the trace's reasoning first concluded another candidate."""
    return bool((verdict or {}).get("earlier_conclusion"))


def annotate(trace: Trace, case: Case) -> Trace:
    """Attach the verifier's verdict (``judge``) and the safety check to a trace."""
    trace.verdict = judge(trace.text, case, hinted=trace.rationalised)
    trace.safety = check_safety(trace.text, case).to_dict()
    return trace


class EnoughCounter:
    """Counts, while a batch decodes, its rows that finished with a distinct accepted text,
    so the batch can stop once the run has K (``GenerationUpdate.complete``)."""

    def __init__(self, case: Case, hinted: bool, seen: set[str], wanted: int) -> None:
        self.case, self.hinted, self.wanted = case, hinted, wanted
        self.seen = set(seen)  # accepted texts (dedup keys), the run's and this batch's
        self.judged: set[int] = set()
        self.passed = 0

    def enough(self, update: GenerationUpdate) -> bool:
        """Judge the rows ``update`` reports complete for the first time; True once ``wanted`` passed."""
        for i, done in enumerate(update.complete or ()):
            if done and i not in self.judged:
                self.judged.add(i)
                key = _dedup_key(update.texts[i])
                if key not in self.seen and judge(update.texts[i], self.case, self.hinted)["accepted"]:
                    self.seen.add(key)
                    self.passed += 1
        return self.passed >= self.wanted


def sample_verified_stream(
    generate: GenerateFn,
    case: Case,
    sampling: SamplingConfig,
    rejection: RejectionConfig,
) -> Iterator[SamplerEvent]:
    """Yield progress while sampling; the last event (phase "done") holds the result.

    ``generate`` draws one batch (of ``config.k`` traces: max(k, batch), or what
    is left of the budget), e.g.
    ``lambda c, s, h: sample_stream(lm, c, s, version, hint=h)``.
    """
    report = SamplingReport()
    accepted: list[Trace] = []
    all_traces: list[Trace] = []
    seen: set[str] = set()
    planned = rejection.budget + (rejection.rationalise_budget if rejection.rationalise else 0)
    batch_no = 0

    def run_phase(hint: str | None, budget: int) -> Iterator[SamplerEvent]:
        nonlocal batch_no
        drawn = 0
        phase = "rationalising" if hint else "sampling"
        while len(accepted) < rejection.k and drawn < budget:
            size = min(max(sampling.k, rejection.batch), budget - drawn)
            seed = None if sampling.seed is None else sampling.seed + batch_no
            config = SamplingConfig(**{**asdict(sampling), "k": size, "seed": seed})
            batch_no += 1
            # the batch stops as soon as the run has K: rows still reasoning then are dropped
            counter = EnoughCounter(case, hint is not None, seen, rejection.k - len(accepted))
            stream = iter(generate(case, config, hint))
            last = next(stream)
            while last.traces is None:
                yield SamplerEvent(phase, last.texts, list(all_traces), list(accepted), report, len(all_traces), planned)
                if not hasattr(stream, "send"):
                    last = next(stream)
                elif counter.enough(last):
                    report.cut_short += sum(not done for done in last.complete)
                    last = stream.send(True)
                else:
                    last = stream.send(False)  # watching: finished rows are concluded as they come
            drawn += size
            for trace in last.traces:
                annotate(trace, case)
                key = _dedup_key(trace.text)
                if trace.verdict["accepted"] and key in seen:
                    trace.verdict = {**trace.verdict, "accepted": False, "code": "duplicate", "reason": "duplicate of an accepted trace"}
                ok = trace.verdict["accepted"]
                if hint:
                    report.rationalised_sampled += 1
                    report.rationalised_accepted += ok
                    report.rationalised_rejected += not ok
                else:
                    report.sampled += 1
                    report.accepted += ok
                    report.rejected += not ok
                    if not ok:
                        report.rejected_by_reason[trace.verdict["code"]] += 1
                if ok:
                    seen.add(key)
                    if len(accepted) < rejection.k:  # a batch can overshoot k; extras are kept but not ranked
                        accepted.append(trace)
                all_traces.append(trace)
            yield SamplerEvent(phase, [t.text for t in last.traces], list(all_traces), list(accepted), report, len(all_traces), planned)

    yield from run_phase(None, rejection.budget)
    if rejection.rationalise and len(accepted) < rejection.k:
        yield from run_phase(case.answer, rejection.rationalise_budget)
    negatives = pick_negatives(all_traces, rejection.negatives)
    yield SamplerEvent("done", [], list(all_traces), list(accepted), report, len(all_traces), planned, negatives)


def sample_verified(generate: GenerateFn, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> SamplerResult:
    """Non-streaming form of ``sample_verified_stream``."""
    last = None
    for last in sample_verified_stream(generate, case, sampling, rejection):
        pass
    return SamplerResult(last.accepted, last.traces, last.report, last.negatives)
