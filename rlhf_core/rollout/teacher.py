"""Teacher-forced passes over sampled completions: the reference's log-probs and
reward-model features (``reference_pass``), given to the traces that lack them
(``fill_reference``: sampling leaves them to the traces that get ranked), and the
policy's and reference's log-probs together (``score_completions``)."""
from __future__ import annotations

import contextlib

import torch

from ..model.models import LoadedModel
from .features import encode as encode_features, pool_hidden
from .logprobs import collate, completion_logps
from .records import Trace


def _rows(values: torch.Tensor, completions: list[list[int]]) -> list[list[float]]:
    return [values[i, : len(c)].tolist() for i, c in enumerate(completions)]


def reference_pass(lm: LoadedModel, prompt_ids: list[int], completions: list[list[int]],
                   features: bool = False, reference_is_policy: bool = False) -> tuple[list[list[float]], list[str]]:
    """(per-token reference log-probs, reward-model features) of each completion, from one
    teacher-forced pass of the reference; the features are ``[]`` unless asked for.
    ``reference_is_policy`` (the weights are still the reference's): the pass runs on the
    policy itself, so a parked reference copy is not read back for it."""
    batch = collate(prompt_ids, completions, lm.tokenizer.pad_token_id, lm.device)
    reference = contextlib.nullcontext(lm.model) if reference_is_policy else lm.reference()
    with reference as ref_model, torch.no_grad():
        was_training = ref_model.training
        ref_model.train(False)
        try:
            if not features:
                return _rows(completion_logps(ref_model, batch), completions), []
            logps, hidden = completion_logps(ref_model, batch, return_hidden=True)
        finally:
            ref_model.train(was_training)
    pooled = pool_hidden(hidden, [len(c) for c in completions])
    return _rows(logps, completions), [encode_features(row) for row in pooled]


def lacks_reference(trace: Trace) -> bool:
    """Whether the trace was sampled without its reference log-probs (``fill_reference``)."""
    return len(trace.ref_logps) != len(trace.completion_ids)


def fill_reference(lm: LoadedModel, traces: list[Trace], reference_is_policy: bool = False,
                   logps: bool = True) -> list[Trace]:
    """Give the traces what the reference's teacher-forced pass gives and they lack (one pass
    per prompt): reward-model features, and with ``logps`` reference log-probs. Returns the
    traces it gave something to. Sampling skips the pass unless a reward model wants the
    features then, so only the traces a clinician ranks pay for it (an update needs their
    reference log-probs; the features keep what was ranked learnable by a later reward model)."""
    missing: dict[tuple, list[Trace]] = {}
    for t in traces:
        if t.completion_ids and t.prompt_ids and (not t.features or (logps and lacks_reference(t))):
            missing.setdefault(tuple(t.prompt_ids), []).append(t)
    for prompt, group in missing.items():
        ref, features = reference_pass(lm, list(prompt), [t.completion_ids for t in group], features=True,
                                       reference_is_policy=reference_is_policy)
        for t, r, f in zip(group, ref, features):
            t.features = t.features or f
            if logps and lacks_reference(t):
                t.ref_logps = r
    return [t for group in missing.values() for t in group]


def score_completions(
    lm: LoadedModel, prompt_ids: list[int], completions: list[list[int]], reference_is_policy: bool = False,
    features: bool = False, reference: bool = True,
) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """(policy log-probs, reference log-probs, features) per completion, without grad
    (one pass when the caller knows the policy is still the reference). Without
    ``reference`` (and ``features``) no reference pass runs: its log-probs are left
    empty for ``fill_reference``."""
    if reference_is_policy:  # one pass gives both (and the features, from the same hidden states)
        ref, feats = reference_pass(lm, prompt_ids, completions, features, reference_is_policy=True)
        return [list(x) for x in ref], ref, feats
    batch = collate(prompt_ids, completions, lm.tokenizer.pad_token_id, lm.device)
    with torch.no_grad():
        old = _rows(completion_logps(lm.model, batch), completions)
    if not (reference or features):
        return old, [[] for _ in completions], []
    ref, feats = reference_pass(lm, prompt_ids, completions, features)
    return old, ref, feats
