"""Per-token log-probabilities of completions that share one prompt.

Every log-prob the engine uses (the sampling policy's "old" ones, the reference's,
and the policy's during an update) comes from ``completion_logps``, so they agree
exactly for the same weights. All of them are at temperature 1: the model's own
distribution, not the tempered one used to draw samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompletionBatch:
    """K completions of one prompt, right-padded into one tensor."""

    input_ids: torch.Tensor  # [K, P + T] prompt followed by completion and padding
    attention_mask: torch.Tensor  # [K, P + T] 1 on real tokens
    completion_ids: torch.Tensor  # [K, T] completion tokens, padded
    completion_mask: torch.Tensor  # [K, T] float 1.0 on completion tokens
    prompt_len: int  # P


def collate(prompt_ids: list[int], completions: list[list[int]], pad_id: int, device) -> CompletionBatch:
    """Pack K completions of the same prompt into a right-padded batch."""
    if not completions:
        raise ValueError("no completions to score")
    k = len(completions)
    t = max(1, max(len(c) for c in completions))
    p = len(prompt_ids)
    if p == 0:
        raise ValueError("the prompt is empty")
    comp = torch.full((k, t), pad_id, dtype=torch.long)
    mask = torch.zeros((k, t), dtype=torch.float32)
    for i, c in enumerate(completions):
        if c:
            comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1.0
    prompt = torch.tensor(prompt_ids, dtype=torch.long).expand(k, p)
    input_ids = torch.cat([prompt, comp], dim=1)
    attention = torch.cat([torch.ones((k, p), dtype=torch.long), mask.long()], dim=1)
    return CompletionBatch(
        input_ids.to(device), attention.to(device), comp.to(device), mask.to(device), p
    )


def token_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without keeping a second vocabulary-sized tensor.

    Args:
        logits: [K, T, V]; targets: [K, T] token ids.
    Returns:
        [K, T] log-probs in float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logps(model: torch.nn.Module, batch: CompletionBatch, share_prompt: bool = True) -> torch.Tensor:
    """Per-token log-probs of each completion token given prompt and preceding tokens.

    With ``share_prompt`` the prompt, identical for all K rows, is forwarded
    once and its key/value cache repeated K times (gradients flow through it),
    instead of K times; the LM head then runs only at the positions that
    predict completion tokens. Without it, one plain forward over the K full
    sequences (the reference path, and the fallback for caches that cannot
    be repeated). Padding is on the right only, so causal attention never lets
    a real token see a pad and no attention mask is needed.

    Returns:
        [K, T] float32 log-probs, 0 at padding positions. Differentiable when
        called with grad enabled.
    """
    k, t = batch.completion_ids.shape
    p = batch.prompt_len
    if share_prompt and k > 1:
        prompt_out = model(input_ids=batch.input_ids[:1, :p], use_cache=True, logits_to_keep=1)
        cache = prompt_out.past_key_values
        if hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(k)
            first = prompt_out.logits[:, -1:, :].expand(k, 1, -1)
            if t > 1:
                rest = model(input_ids=batch.completion_ids[:, :-1], past_key_values=cache, use_cache=True).logits
                logits = torch.cat([first, rest], dim=1)
            else:
                logits = first
            return token_logps_from_logits(logits, batch.completion_ids) * batch.completion_mask
    out = model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=t + 1)
    logits = out.logits[:, -(t + 1) : -1, :]
    return token_logps_from_logits(logits, batch.completion_ids) * batch.completion_mask
