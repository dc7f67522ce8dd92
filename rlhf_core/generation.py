"""Sampling K reasoning traces for a case, streamed token by token.

The prompt is run through the model once and its key/value cache is shared by
the K samples, which then decode together in one batch. After sampling, one
teacher-forced pass under the policy and one under the reference give every
trace its per-token "old" and reference log-probs, stored with the trace so an
update never has to run the reference model again.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from .cases import Case
from .logprobs import collate, completion_logps
from .models import LoadedModel
from .prompts import build_messages, encode_prompt


@dataclass
class SamplingConfig:
    """How traces are drawn."""

    k: int = 4  # traces per batch
    max_new_tokens: int = 192  # completion length limit; longer traces end with finish_reason "length"
    temperature: float = 0.8  # 0 means greedy decoding
    top_p: float = 0.95  # nucleus sampling mass
    seed: int | None = None  # same seed, same weights -> same traces
    stream_every: int = 4  # tokens between streamed text updates

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 64:
            raise ValueError(f"k (traces per batch) must be between 1 and 64, got {self.k}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be between 1 and 4096, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stream_every < 1:
            raise ValueError(f"stream_every must be >= 1, got {self.stream_every}")


@dataclass
class Trace:
    """One sampled completion with everything an update needs. Plain lists only,
    so a trace is cheap to copy, store as JSON, and keep in UI session state."""

    case_id: str
    prompt_ids: list[int]  # the un-hinted prompt the trace is trained as answering
    completion_ids: list[int]  # includes the EOS token when finish_reason == "eos"
    text: str  # decoded completion without special tokens
    finish_reason: str  # "eos" or "length"
    old_logps: list[float]  # per completion token, under the policy that sampled it
    ref_logps: list[float]  # per completion token, under the frozen reference
    policy_version: int  # version of the policy that sampled it
    rationalised: bool = False  # sampled with the answer as a hint (STaR); never edited
    sampling: dict = field(default_factory=dict)  # the SamplingConfig used, as a dict
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    verdict: dict | None = None  # filled by the verifier
    safety: dict | None = None  # filled by the safety checker

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        return cls(**data)


@dataclass
class GenerationUpdate:
    """A streamed snapshot: partial texts while decoding, and the traces at the end."""

    texts: list[str]
    finished: list[bool]
    new_tokens: int  # decoding steps done so far
    traces: list[Trace] | None = None  # set on the last update only
    tokens_per_second: float = 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from temperature- and nucleus-filtered logits.

    Args:
        logits: [K, V]. Returns: [K] token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return sorted_idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_token_ids(lm: LoadedModel) -> list[int]:
    ids = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def score_completions(lm: LoadedModel, prompt_ids: list[int], completions: list[list[int]]) -> tuple[list[list[float]], list[list[float]]]:
    """(policy log-probs, reference log-probs) per completion token, without grad."""
    batch = collate(prompt_ids, completions, lm.tokenizer.pad_token_id, lm.device)
    with torch.no_grad():
        old = completion_logps(lm.model, batch)
    with lm.reference() as ref_model:
        ref = completion_logps(ref_model, batch)
    lengths = [len(c) for c in completions]
    return (
        [old[i, :n].tolist() for i, n in enumerate(lengths)],
        [ref[i, :n].tolist() for i, n in enumerate(lengths)],
    )


def sample_stream(
    lm: LoadedModel,
    case: Case,
    config: SamplingConfig,
    policy_version: int = 0,
    hint: str | None = None,
) -> Iterator[GenerationUpdate]:
    """Sample ``config.k`` traces for ``case``, yielding partial texts as they grow.

    With ``hint`` the model sees the correct diagnosis (rationalisation); the
    traces are still scored and stored against the un-hinted prompt.
    """
    model, tok = lm.model, lm.tokenizer
    train_prompt = encode_prompt(tok, build_messages(case))
    sample_prompt = encode_prompt(tok, build_messages(case, hint=hint)) if hint else train_prompt
    k = config.k
    eos = torch.tensor(eos_token_ids(lm), device=lm.device)
    pad_id = tok.pad_token_id
    generator = torch.Generator(device=lm.device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed() % (2**63))

    started = time.perf_counter()
    rows: list[list[int]] = [[] for _ in range(k)]
    finished = torch.zeros(k, dtype=torch.bool, device=lm.device)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            prompt = torch.tensor([sample_prompt], device=lm.device)
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if k > 1:
                cache.batch_repeat_interleave(k)  # one prefill shared by all K samples
            logits = out.logits[:, -1, :].expand(k, -1)
            step = 0
            for step in range(1, config.max_new_tokens + 1):
                next_tokens = sample_next(logits, config.temperature, config.top_p, generator)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
                for i, token in enumerate(next_tokens.tolist()):
                    if not finished[i]:
                        rows[i].append(token)
                finished |= torch.isin(next_tokens, eos)
                if bool(finished.all()) or step == config.max_new_tokens:
                    break
                if step % config.stream_every == 0:
                    yield GenerationUpdate(
                        [tok.decode(r, skip_special_tokens=True) for r in rows],
                        finished.tolist(),
                        step,
                        tokens_per_second=sum(map(len, rows)) / (time.perf_counter() - started),
                    )
                out = model(input_ids=next_tokens[:, None], past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :]
        elapsed = time.perf_counter() - started
        old_logps, ref_logps = score_completions(lm, train_prompt, rows)
    finally:
        model.train(was_training)

    sampling = asdict(config)
    traces = [
        Trace(
            case_id=case.id,
            prompt_ids=list(train_prompt),
            completion_ids=row,
            text=tok.decode(row, skip_special_tokens=True),
            finish_reason="eos" if row and row[-1] in eos.tolist() else "length",
            old_logps=old_logps[i],
            ref_logps=ref_logps[i],
            policy_version=policy_version,
            rationalised=bool(hint),
            sampling=sampling,
        )
        for i, row in enumerate(rows)
    ]
    yield GenerationUpdate(
        [t.text for t in traces],
        [True] * k,
        step,
        traces=traces,
        tokens_per_second=sum(map(len, rows)) / max(elapsed, 1e-9),
    )


def sample_traces(lm: LoadedModel, case: Case, config: SamplingConfig, policy_version: int = 0, hint: str | None = None) -> list[Trace]:
    """Non-streaming form of ``sample_stream``."""
    last = None
    for last in sample_stream(lm, case, config, policy_version, hint):
        pass
    return last.traces
