"""The record of one sampled trace: plain data, no torch, so the store, exports and the
UI's session state can hold traces without importing the model code."""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field


@dataclass
class Trace:
    """One sampled completion with everything an update needs. Plain lists only,
    so a trace is cheap to copy, store as JSON, and keep in UI session state."""

    case_id: str
    prompt_ids: list[int]  # the un-hinted prompt the trace is trained as answering
    completion_ids: list[int]  # includes the EOS token when finish_reason == "eos"
    text: str  # decoded completion without special tokens
    finish_reason: str  # "eos", "length", or "conclusion" (stopped once its conclusion was complete)
    old_logps: list[float]  # per completion token, under the policy that sampled it
    ref_logps: list[float]  # per completion token, under the frozen reference
    policy_version: int  # version of the policy that sampled it
    rationalised: bool = False  # sampled with the answer as a hint (STaR); never edited
    sampling: dict = field(default_factory=dict)  # the SamplingConfig used, as a dict
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    verdict: dict | None = None  # filled by the verifier
    safety: dict | None = None  # filled by the safety checker
    # 1 per completion token the policy chose, 0 where we inserted it (the label of a
    # forced conclusion); such tokens count in no loss or log-prob sum. Empty: all 1.
    loss_mask: list[int] = field(default_factory=list)
    conclusion: dict | None = None  # how the conclusion was reached (conclusion.conclusion_record)
    features: str = ""  # the reference's pooled hidden states (features.encode), for the reward model; "" when none

    def to_dict(self) -> dict:
        """The trace as a JSON-ready dict (the inverse of ``from_dict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        """The ``Trace`` of a ``to_dict`` dict."""
        return cls(**data)
