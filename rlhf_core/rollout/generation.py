"""Sampling K reasoning traces for a case, streamed token by token.

The prompt is run through the model once and its key/value cache is shared by
the K samples, which then decode together in one batch. The "old" per-token
log-probs come from the decoding logits; the reference's come from one
teacher-forced pass, run when the traces are sampled if a reward model wants
their features then (or free, while the policy is still the reference), else
only for the traces that get ranked (``fill_reference``). Both are stored with
the trace, so an update never has to run the reference model again.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..clinical.cases import Case
from .conclusion import (
    CANDIDATE_SCORES, CONCLUSION_DRAWS, CONCLUSION_MODES, SCAFFOLD_TEXT, Concluder, arithmetic_codes, can_constrain,
    candidate_probs, candidate_scores, candidates, choose_candidate, conclusion_record,
)
from .decoding import open_decoding, sample_next, score_branches
from .logprobs import token_logps_from_logits
from ..model.folded import folded_adapters
from ..model.models import LoadedModel
from .prompts import build_messages, encode_prompt
from .records import Trace
from .teacher import reference_pass, score_completions


def setting(default, help: str):
    """A config field documented once, where it is defined (TRL's ``field(metadata={"help": ...})``);
    the UI reads its help text from here (``bounds.help_text``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class SamplingConfig:
    """How traces are drawn."""

    k: int = setting(4, "Traces decoded together in one batch.")
    # 128: on SmolLM2 about half the rows end their reasoning on their own within it
    max_new_tokens: int = setting(128, "Most tokens of reasoning a trace may write; in the constrained mode the "
                                       "conclusion comes on top of them.")
    # Cut at max_new_tokens, 2 in 3 of SmolLM2's rows ended mid-sentence; from 3/4 of the budget
    # on, a row concludes where its next sentence would begin: 7% cut mid-sentence (6 cases x
    # 16 rows), mean reasoning 115 -> 104 tokens, and K verified rows in hand sooner (bench.rankable)
    wrap_up_from: float = setting(0.75, "Constrained mode: once a row has reasoned for this share of max_new_tokens, "
                                        "it concludes at its next sentence end instead of being cut mid-sentence at "
                                        "the budget (1: only at the budget).")
    temperature: float = setting(0.8, "Sampling temperature (0: greedy decoding).")
    top_p: float = setting(0.95, "Nucleus sampling: the probability mass the next token is drawn from.")
    seed: int | None = setting(None, "Same seed, same weights: the same traces.")
    stream_every: int = setting(4, "Tokens between streamed text updates.")
    lean_decode: bool = setting(True, "Llama models on CPU: the packed-weight float32 decoding step (fastdecode.py; "
                                      "same logits to ~1e-5).")
    conclusion: str = setting("constrained", "How each trace's 'Final diagnosis' line is written: constrained (the "
                                             "candidate the model's own probabilities pick) or free (the model writes "
                                             "it); saved with the workspace and every trace.")
    conclusion_score: str = setting("per_token", "How candidates are scored in the constrained mode: per_token (mean "
                                                 "log-prob of the conclusion's tokens) or sequence (their sum).")
    # diagnosis report, 109 cases x 8: cases with a correct trace 75.2% with independent draws,
    # 89.9% with arithmetic ones (same reasoning re-drawn: expected 79.8% -> 88.8%), acceptance unchanged
    conclusion_draw: str = setting("arithmetic", "Constrained mode: how the rows of a batch draw their conclusions: "
                                                 "arithmetic (evenly spread codes: every row still concludes with its own "
                                                 "probabilities, and a candidate held at p is drawn in about p of the "
                                                 "rows) or independent.")
    # the default model otherwise often stops after a few words, and a conclusion with
    # no reasoning before it is rejected as degenerate
    min_reasoning_tokens: int = setting(32, "No end token before this many reasoning tokens (Hugging Face's "
                                            "min_new_tokens; capped at max_new_tokens).")
    # one teacher-forced pass of the reference over every sampled row; without it an updated
    # policy's traces get their reference log-probs when they are ranked (``fill_reference``),
    # so sampling itself runs no reference pass
    reward_features: bool = setting(True, "Store the reference's pooled hidden states with each trace "
                                          "(features.py), which the reward model learns from, at sampling.")

    def wrap_up_tokens(self) -> int:
        """Reasoning tokens after which a row concludes at its next sentence end (0: never before the budget)."""
        return math.ceil(self.wrap_up_from * self.max_new_tokens) if self.wrap_up_from < 1 else 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_reasoning_tokens <= 4096:
            raise ValueError(f"min_reasoning_tokens must be between 0 and 4096, got {self.min_reasoning_tokens}")
        if not 0 < self.wrap_up_from <= 1:
            raise ValueError(f"wrap_up_from must be a share of max_new_tokens in (0, 1], got {self.wrap_up_from}")
        if self.conclusion not in CONCLUSION_MODES:
            raise ValueError(f"conclusion must be one of {CONCLUSION_MODES}, got {self.conclusion!r}")
        if self.conclusion_score not in CANDIDATE_SCORES:
            raise ValueError(f"conclusion_score must be one of {CANDIDATE_SCORES}, got {self.conclusion_score!r}")
        if self.conclusion_draw not in CONCLUSION_DRAWS:
            raise ValueError(f"conclusion_draw must be one of {CONCLUSION_DRAWS}, got {self.conclusion_draw!r}")
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
class GenerationUpdate:
    """A streamed snapshot: partial texts while decoding, and the traces at the end."""

    texts: list[str]
    finished: list[bool]
    new_tokens: int  # decoding steps done so far
    traces: list[Trace] | None = None  # set on the last update only
    tokens_per_second: float = 0.0
    complete: list[bool] | None = None  # rows whose text is final (conclusion included); None: not reported


def eos_token_ids(lm: LoadedModel) -> list[int]:
    """The model's end tokens: the ids its generation config and its tokenizer name, sorted."""
    ids = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


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
    *,
    finish_reasons: list[str] | None = None,
    loss_masks: list[list[int]] | None = None,
    conclusions: list[dict | None] | None = None,
    features: list[str] | None = None,
) -> list[Trace]:
    """Trace records for completions of one prompt, with their per-token log-probs.
    ``finish_reasons`` default to "eos" when a row ends in an end token, else
    "length"; ``loss_masks`` to all ones (stored as an empty list); ``features``
    (``features.encode``) to none."""
    sampling = asdict(config)
    return [
        Trace(
            case_id=case.id,
            prompt_ids=list(prompt_ids),
            completion_ids=row,
            text=lm.tokenizer.decode(row, skip_special_tokens=True),
            finish_reason=finish_reasons[i] if finish_reasons else ("eos" if row and row[-1] in eos_ids else "length"),
            old_logps=old_logps[i],
            ref_logps=ref_logps[i],
            policy_version=policy_version,
            rationalised=rationalised,
            sampling=sampling,
            loss_mask=list(loss_masks[i]) if loss_masks and 0 in loss_masks[i] else [],
            conclusion=conclusions[i] if conclusions else None,
            features=features[i] if features else "",
        )
        for i, row in enumerate(rows)
    ]


class _ConclusionPlan:
    """The conclusion step of one batch: its mode, candidates and their tokens."""

    def __init__(self, lm: LoadedModel, case: Case, config: SamplingConfig, ignore_eos: bool) -> None:
        tok = lm.tokenizer
        self.eos = [] if ignore_eos else eos_token_ids(lm)
        self.names = candidates(case)
        self.score = config.conclusion_score
        self.draw = config.conclusion_draw
        end = tok.eos_token_id if tok.eos_token_id is not None else (self.eos[0] if self.eos else None)
        mode = config.conclusion
        if mode == "constrained" and (ignore_eos or end is None or not can_constrain(case)):
            mode = "free"  # too few candidates, or nothing to end a conclusion with
        self.mode = mode
        self.sequences = [list(tok.encode(" " + name, add_special_tokens=False)) + [end] for name in self.names] if mode == "constrained" else []
        self.scaffolds = {
            True: list(tok.encode(SCAFFOLD_TEXT, add_special_tokens=False)),
            False: list(tok.encode("\n" + SCAFFOLD_TEXT, add_special_tokens=False)),
        }

    def codes(self, k: int, generator, temperature: float) -> list[float] | None:
        """Each row's conclusion code (arithmetic draws), or None for independent draws and
        for greedy decoding (which concludes with the argmax and draws nothing)."""
        drawn = self.mode == "constrained" and self.draw == "arithmetic" and temperature > 0
        return arithmetic_codes(k, generator) if drawn else None

    def concluder(self, k: int, budget: int, decode, stop_rules: bool, sentence_after: int = 0) -> Concluder:
        return Concluder(k, budget, self.eos, decode, constrained=self.mode == "constrained",
                         scaffold_ids=lambda after_newline: self.scaffolds[after_newline], stop_rules=stop_rules,
                         sentence_after=sentence_after)


def _conclude_rows(model, decoding, prompt_ids: list[int], concluder: Concluder, plan: _ConclusionPlan,
                   temperature: float, generator, pad_id: int, logps: list[list[float]],
                   codes: list[float] | None = None) -> None:
    """Score every candidate after each concluding row's reasoning (and inserted label),
    all rows in one forward, and append the one drawn from the model's own probabilities
    (temperature 1, or the argmax when decoding is greedy; at the row's code when the batch
    draws arithmetically), with its teacher-forced log-probs."""
    concluding = list(concluder.concluding())
    if not concluding:
        return
    fulls = [list(prompt_ids) + concluder.rows[i] for i in concluding]
    stems = [[full[-1], *concluder.states[i].scaffold] for i, full in zip(concluding, fulls)]
    prefix_lens = [len(full) - 1 for full in fulls]
    scored = score_branches(model, decoding.layer_kv(concluding, max(prefix_lens)), prefix_lens, stems,
                            [plan.sequences] * len(concluding), pad_id)
    for i, (scaffold_logps, candidate_logps) in zip(concluding, scored):
        scores = candidate_scores(candidate_logps, plan.score)
        code = codes[i] if codes else None
        chosen = choose_candidate(scores, 1.0 if temperature > 0 else 0.0, generator, code)
        concluder.conclude(i, chosen, plan.sequences[chosen], candidate_probs(scores), code)
        logps[i] += scaffold_logps + candidate_logps[chosen]


def sample_stream(
    lm: LoadedModel,
    case: Case,
    config: SamplingConfig,
    policy_version: int = 0,
    hint: str | None = None,
    ignore_eos: bool = False,
    reference_is_policy: bool = False,
) -> Iterator[GenerationUpdate]:
    """Sample ``config.k`` traces for ``case``, yielding partial texts as they grow.

    Every row reasons for at most ``config.max_new_tokens`` tokens; a row stops
    as soon as it has written (or, constrained, reached) its conclusion while
    the others carry on. In the constrained mode the conclusion is then the
    candidate its own probabilities choose (``conclusion.py``). With ``hint``
    the model sees the correct diagnosis (rationalisation); the traces are
    still scored and stored against the un-hinted prompt. ``ignore_eos``
    decodes exactly max_new_tokens per row with no stopping rule (benchmarks only).
    ``reference_is_policy`` (the caller knows the weights are still the reference's):
    the reference log-probs are the policy's, so no reference pass runs. Otherwise the
    reference pass runs only with ``config.reward_features``; without them the traces'
    reference log-probs are left empty for ``fill_reference`` (an update fills them).

    A caller that watches the rows as they finish sends ``False`` into the stream after
    each update (``stream.send(False)``): from then on the rows that stopped reasoning are
    concluded at every streamed update, so its ``complete`` rows carry their final text
    (plain iteration concludes them all at the end, in one forward: ~8% less time a batch).
    Once it has seen enough (e.g. K verified traces) it sends ``True``: decoding stops, rows
    still reasoning are dropped (never judged, never returned) and the next update is the
    last, with the traces of the rows that had finished.
    """
    model, tok = lm.model, lm.tokenizer
    train_prompt = encode_prompt(tok, build_messages(case))
    sample_prompt = encode_prompt(tok, build_messages(case, hint=hint)) if hint else train_prompt
    k = config.k
    pad_id = tok.pad_token_id
    generator = torch.Generator(device=lm.device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed() % (2**63))
    plan = _ConclusionPlan(lm, case, config, ignore_eos)
    concluder = plan.concluder(k, config.max_new_tokens, lambda ids: tok.decode(ids, skip_special_tokens=True),
                               not ignore_eos, config.wrap_up_tokens())
    rows = concluder.rows
    codes = plan.codes(k, generator, config.temperature)

    started = time.perf_counter()
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad(), folded_adapters(model):
            decoding = open_decoding(model, sample_prompt, k, lm.device, len(sample_prompt) + config.max_new_tokens + 1,
                                     lean=config.lean_decode)
            logits = decoding.logits
            # log-probs of the appended tokens under the sampling policy, at temperature 1
            sampled_logps: list[list[float]] = [[] for _ in range(k)]
            step, watched = 0, False
            for step in range(1, config.max_new_tokens + 1):
                allowed = concluder.without_early_end(logits, config.min_reasoning_tokens)
                sampled = sample_next(allowed, config.temperature, config.top_p, generator).tolist()
                chosen = concluder.next_tokens(sampled)
                next_tokens = torch.tensor([pad_id if t is None else t for t in chosen], device=lm.device)
                token_logps = token_logps_from_logits(logits[:, None, :], next_tokens[:, None])[:, 0].tolist()
                for i, token in enumerate(chosen):
                    if token is not None:
                        sampled_logps[i].append(token_logps[i])
                if concluder.all_stopped() or step == config.max_new_tokens:
                    break
                if step % config.stream_every == 0:
                    if watched:
                        _conclude_rows(model, decoding, sample_prompt, concluder, plan, config.temperature, generator,
                                       pad_id, sampled_logps, codes)
                    enough = yield GenerationUpdate(
                        [tok.decode(r, skip_special_tokens=True) for r in rows],
                        [not concluder.decoding(i) for i in range(k)],
                        step,
                        tokens_per_second=sum(map(len, rows)) / (time.perf_counter() - started),
                        complete=[concluder.states[i].phase == "done" for i in range(k)],
                    )
                    if enough:
                        break
                    watched = enough is not None  # False: the caller reads ``complete`` and may stop the batch
                logits = decoding.advance(next_tokens)
            _conclude_rows(model, decoding, sample_prompt, concluder, plan, config.temperature, generator, pad_id,
                           sampled_logps, codes)
            del decoding  # frees the decoder's packed weights before the reference is loaded
        # rows still reasoning when the caller had enough are dropped; the others are whole
        kept = [i for i in range(k) if concluder.states[i].phase == "done"]
        if len(kept) < k:
            rows = [rows[i] for i in kept]
            sampled_logps = [sampled_logps[i] for i in kept]
        elapsed = time.perf_counter() - started
        if not rows:  # the caller stopped before any row finished
            old_logps = ref_logps = features = []
        elif hint:
            # a hinted trace is trained as answering the plain prompt: its "old"
            # log-probs must be taken under that prompt, not the one it was sampled from
            old_logps, ref_logps, features = score_completions(lm, train_prompt, rows, reference_is_policy,
                                                               config.reward_features, reference=False)
        else:
            features = []
            if reference_is_policy:  # the reference's log-probs are the sampled ones; a pass only for features
                ref_logps = [list(x) for x in sampled_logps]
                if config.reward_features:
                    features = reference_pass(lm, train_prompt, rows, features=True, reference_is_policy=True)[1]
            elif config.reward_features:
                ref_logps, features = reference_pass(lm, train_prompt, rows, True)
            else:  # left for the traces that get ranked (fill_reference)
                ref_logps = [[] for _ in rows]
            old_logps = sampled_logps
    finally:
        model.train(was_training)

    conclusions = [conclusion_record(plan.mode, concluder.states[i], plan.names, plan.score, plan.draw) for i in kept]
    traces = build_traces(
        lm, case, train_prompt, rows, old_logps, ref_logps, policy_version, bool(hint), config, [],
        finish_reasons=[concluder.finish[i] for i in kept], loss_masks=[concluder.masks[i] for i in kept],
        conclusions=conclusions, features=features,
    )
    yield GenerationUpdate(
        [t.text for t in traces],
        [True] * len(traces),
        step,
        traces=traces,
        tokens_per_second=sum(map(len, rows)) / max(elapsed, 1e-9),
        complete=[True] * len(traces),
    )


def sample_traces(lm: LoadedModel, case: Case, config: SamplingConfig, policy_version: int = 0, hint: str | None = None,
                  ignore_eos: bool = False, reference_is_policy: bool = False) -> list[Trace]:
    """Non-streaming form of ``sample_stream``."""
    last = None
    for last in sample_stream(lm, case, config, policy_version, hint, ignore_eos, reference_is_policy):
        pass
    return last.traces
