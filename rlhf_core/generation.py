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
from .cpu_linear import onednn_linear
from .fastdecode import LlamaDecoder
from .logprobs import collate, completion_logps, token_logps_from_logits
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
    lean_decode: bool = True  # Llama models on CPU: packed-weight float32 decoding step, same logits to ~1e-5 (fastdecode.py)

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

    The nucleus is exact, but found among the top-n candidates (n grown until
    every row's nucleus fits) instead of sorting the whole vocabulary: on
    SmolLM2's 49k vocabulary the full sort and the exponential draw over it
    cost ~15 ms of every ~80 ms decoding step on 2 CPU cores.

    Args:
        logits: [K, V]. Returns: [K] token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    n = min(256, vocab)
    while True:
        top_probs, top_idx = probs.topk(n, dim=-1)  # sorted, largest first
        if n == vocab or bool((top_probs.sum(dim=-1) >= top_p).all()):
            break
        n = min(n * 4, vocab)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    outside = top_probs.cumsum(dim=-1) - top_probs >= top_p
    choice = torch.multinomial(top_probs.masked_fill(outside, 0.0), 1, generator=generator)
    return top_idx.gather(-1, choice).squeeze(-1)


def _static_cache_from(model, prefill_cache, k: int, max_len: int):
    """A preallocated KV cache holding the prompt's keys/values repeated for K rows,
    so decoding writes in place instead of concatenating a growing cache every
    step (~10% of a decoding step on CPU). None where the model's cache does not fit."""
    try:
        from transformers import StaticCache

        static = StaticCache(config=model.config, max_cache_len=max_len)
        layers = getattr(prefill_cache, "layers", None)
        if not layers or len(layers) != len(static.layers):
            return None
        for src, dst in zip(layers, static.layers):
            if type(dst).__name__ != "StaticLayer":
                return None
            dst.update(src.keys.repeat_interleave(k, dim=0), src.values.repeat_interleave(k, dim=0))
        return static
    except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError):
        return None


def _decoding(model, prompt_ids: list[int], k: int, config: SamplingConfig, device):
    """Prefill the prompt for K rows. Returns (logits after the prompt [K, V],
    advance): ``advance(tokens [K])`` feeds one token per row and returns the
    next logits [K, V]."""
    max_len = len(prompt_ids) + config.max_new_tokens
    decoder = LlamaDecoder.build(model, k, max_len) if config.lean_decode else None
    if decoder is not None:
        return decoder.prefill(prompt_ids).expand(k, -1), decoder.step
    # float32 CPU matmuls through oneDNN (cpu_linear.py): ~1.45x a SmolLM2 step at 4 rows on AMD
    on_cpu = torch.device(device).type == "cpu"
    with onednn_linear(model, enabled=on_cpu):
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    cache = _static_cache_from(model, out.past_key_values, k, max_len)
    if cache is None:  # fall back to the dynamic cache, shared by repeating it
        cache = out.past_key_values
        if k > 1:
            cache.batch_repeat_interleave(k)
    position = len(prompt_ids)

    def advance(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal position
        with onednn_linear(model, enabled=on_cpu):
            out = model(
                input_ids=tokens[:, None],
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([position], device=device),
                position_ids=torch.full((k, 1), position, device=device),
            )
        position += 1
        return out.logits[:, -1, :]

    return out.logits[:, -1, :].expand(k, -1), advance


def eos_token_ids(lm: LoadedModel) -> list[int]:
    ids = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _rows(values: torch.Tensor, completions: list[list[int]]) -> list[list[float]]:
    return [values[i, : len(c)].tolist() for i, c in enumerate(completions)]


def reference_logps(lm: LoadedModel, prompt_ids: list[int], completions: list[list[int]]) -> list[list[float]]:
    """Per-token reference log-probs of each completion (one teacher-forced pass)."""
    batch = collate(prompt_ids, completions, lm.tokenizer.pad_token_id, lm.device)
    with lm.reference() as ref_model:
        return _rows(completion_logps(ref_model, batch), completions)


def score_completions(lm: LoadedModel, prompt_ids: list[int], completions: list[list[int]]) -> tuple[list[list[float]], list[list[float]]]:
    """(policy log-probs, reference log-probs) per completion token, without grad."""
    batch = collate(prompt_ids, completions, lm.tokenizer.pad_token_id, lm.device)
    with torch.no_grad():
        old = completion_logps(lm.model, batch)
    return _rows(old, completions), reference_logps(lm, prompt_ids, completions)


def build_traces(
    lm: LoadedModel,
    case: Case,
    prompt_ids: list[int],
    rows: list[list[int]],
    old_logps: list[list[float]],
    ref_logps: list[list[float]],
    policy_version: int,
    rationalised: bool,
    config: SamplingConfig,
    eos_ids: list[int],
) -> list[Trace]:
    """Trace records for completions of one prompt, with their per-token log-probs."""
    sampling = asdict(config)
    return [
        Trace(
            case_id=case.id,
            prompt_ids=list(prompt_ids),
            completion_ids=row,
            text=lm.tokenizer.decode(row, skip_special_tokens=True),
            finish_reason="eos" if row and row[-1] in eos_ids else "length",
            old_logps=old_logps[i],
            ref_logps=ref_logps[i],
            policy_version=policy_version,
            rationalised=rationalised,
            sampling=sampling,
        )
        for i, row in enumerate(rows)
    ]


def sample_stream(
    lm: LoadedModel,
    case: Case,
    config: SamplingConfig,
    policy_version: int = 0,
    hint: str | None = None,
    ignore_eos: bool = False,
) -> Iterator[GenerationUpdate]:
    """Sample ``config.k`` traces for ``case``, yielding partial texts as they grow.

    With ``hint`` the model sees the correct diagnosis (rationalisation); the
    traces are still scored and stored against the un-hinted prompt.
    ``ignore_eos`` decodes exactly max_new_tokens per row (benchmarks only).
    """
    model, tok = lm.model, lm.tokenizer
    train_prompt = encode_prompt(tok, build_messages(case))
    sample_prompt = encode_prompt(tok, build_messages(case, hint=hint)) if hint else train_prompt
    k = config.k
    eos = torch.tensor([] if ignore_eos else eos_token_ids(lm), dtype=torch.long, device=lm.device)
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
            logits, advance = _decoding(model, sample_prompt, k, config, lm.device)
            # log-probs of the sampled tokens under the sampling policy, at temperature 1
            sampled_logps: list[list[float]] = [[] for _ in range(k)]
            step = 0
            for step in range(1, config.max_new_tokens + 1):
                next_tokens = sample_next(logits, config.temperature, config.top_p, generator)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
                token_logps = token_logps_from_logits(logits[:, None, :], next_tokens[:, None])[:, 0]
                done = finished.tolist()
                for i, (token, logp) in enumerate(zip(next_tokens.tolist(), token_logps.tolist())):
                    if not done[i]:
                        rows[i].append(token)
                        sampled_logps[i].append(logp)
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
                logits = advance(next_tokens)
            del advance  # frees the decoder's packed weights before the reference is loaded
        elapsed = time.perf_counter() - started
        if hint:
            # a hinted trace is trained as answering the plain prompt: its "old"
            # log-probs must be taken under that prompt, not the one it was sampled from
            old_logps, ref_logps = score_completions(lm, train_prompt, rows)
        else:
            old_logps, ref_logps = sampled_logps, reference_logps(lm, train_prompt, rows)
    finally:
        model.train(was_training)

    traces = build_traces(lm, case, train_prompt, rows, old_logps, ref_logps, policy_version, bool(hint), config, eos.tolist())
    yield GenerationUpdate(
        [t.text for t in traces],
        [True] * k,
        step,
        traces=traces,
        tokens_per_second=sum(map(len, rows)) / max(elapsed, 1e-9),
    )


def sample_traces(lm: LoadedModel, case: Case, config: SamplingConfig, policy_version: int = 0, hint: str | None = None, ignore_eos: bool = False) -> list[Trace]:
    """Non-streaming form of ``sample_stream``."""
    last = None
    for last in sample_stream(lm, case, config, policy_version, hint, ignore_eos):
        pass
    return last.traces
