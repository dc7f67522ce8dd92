"""Per-token log-probabilities of completions that share one prompt.

Every log-prob the engine uses (the sampling policy's "old" ones, the reference's,
and the policy's during an update) comes from ``completion_logps``, so they agree
exactly for the same weights. All of them are at temperature 1: the model's own
distribution, not the tempered one used to draw samples.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..model.cpu_linear import onednn_linear

# Model types whose LM head is a plain linear map of the decoder's final hidden
# state (no logit soft-capping or scaling), so log-probs can be computed from
# hidden states chunk by chunk; other models go through their own forward.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "phi"}
HEAD_CHUNK = 32  # completion positions whose full-vocabulary logits exist at once


@dataclass
class CompletionBatch:
    """K completions of one prompt, right-padded into one tensor."""

    input_ids: torch.Tensor  # [K, P + T] prompt followed by completion and padding
    attention_mask: torch.Tensor  # [K, P + T] 1 on real tokens
    completion_ids: torch.Tensor  # [K, T] completion tokens, padded
    completion_mask: torch.Tensor  # [K, T] float 1.0 on completion tokens that count (not padding, not scaffold)
    prompt_len: int  # P


def collate(
    prompt_ids: list[int], completions: list[list[int]], pad_id: int, device, loss_masks: list[list[int]] | None = None
) -> CompletionBatch:
    """Pack K completions of the same prompt into a right-padded batch.

    ``loss_masks`` (one 0/1 list per completion, or an empty list for "all
    tokens") zero the mask where a token was inserted by us rather than chosen
    by the model (``Trace.loss_mask``), so it counts in no loss or log-prob sum.
    """
    if not completions:
        raise ValueError("no completions to score")
    if loss_masks is not None and len(loss_masks) != len(completions):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(completions)} completions")
    k = len(completions)
    t = max(1, max(len(c) for c in completions))
    p = len(prompt_ids)
    if p == 0:
        raise ValueError("the prompt is empty")
    comp = torch.full((k, t), pad_id, dtype=torch.long)
    mask = torch.zeros((k, t), dtype=torch.float32)
    present = torch.zeros((k, t), dtype=torch.long)
    for i, c in enumerate(completions):
        if c:
            comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            present[i, : len(c)] = 1
            row_mask = loss_masks[i] if loss_masks is not None and loss_masks[i] else None
            if row_mask is not None and len(row_mask) != len(c):
                raise ValueError(f"loss mask {i} has {len(row_mask)} entries for {len(c)} tokens")
            mask[i, : len(c)] = 1.0 if row_mask is None else torch.tensor(row_mask, dtype=torch.float32)
    prompt = torch.tensor(prompt_ids, dtype=torch.long).expand(k, p)
    input_ids = torch.cat([prompt, comp], dim=1)
    attention = torch.cat([torch.ones((k, p), dtype=torch.long), present], dim=1)
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


def _decoder_and_head(model: torch.nn.Module):
    """(decoder, lm_head) of a causal LM (through a peft wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None:
        return None
    return decoder, head


def chunked_head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = HEAD_CHUNK,
                       recompute: bool = True) -> torch.Tensor:
    """Log-probs of ``targets`` from final hidden states, HEAD_CHUNK positions at a time.

    Under grad with ``recompute`` each chunk is checkpointed, so its [K, chunk, V]
    logits are rebuilt in backward instead of all T positions' being kept: on
    SmolLM2 (V = 49k) that is ~0.4 GB less at the peak of an update, for one
    extra LM-head matmul (~4% of a LoRA update's time), so updates ask for it only
    with activation checkpointing (memory short).

    Args:
        hidden: [K, T, H]; targets: [K, T]. Returns: [K, T] float32.
    """

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_logps_from_logits(head(h), t)

    pieces = []
    for start in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, start : start + chunk], targets[:, start : start + chunk]
        pieces.append(checkpoint(piece, h, t, use_reentrant=False) if recompute and torch.is_grad_enabled()
                      else piece(h, t))
    return torch.cat(pieces, dim=1)


class _SegmentKV:
    """The key/value cache one decoder layer sees inside a checkpointed segment.

    Attention calls ``update(k, v, layer_idx)`` and attends to what it returns.
    Unlike the model's own cache this object is rebuilt on every run of the
    segment, so the recomputation in backward appends to the same prompt
    keys/values as the forward did instead of to the forward's result.
    """

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is not None:
            key_states = torch.cat([self.keys, key_states], dim=-2)
            value_states = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


@contextlib.contextmanager
def checkpointed_layers(decoder: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing per decoder layer that keeps the shared-prompt cache.

    Inside the block each layer keeps only its input hidden states for backward
    and recomputes its activations there (one extra forward in all), instead of
    keeping attention and MLP intermediates of every layer: on SmolLM2 with
    K=4 x 120 tokens that is ~1 GB less at the peak of an update. Hugging Face's
    own gradient checkpointing turns the KV cache off, which the shared-prompt
    forward needs. In the prompt pass a layer returns its keys/values, which
    are stored in the model's cache as usual; in the completion pass it reads
    the prompt's (repeated) keys/values from that cache.
    """
    # a layer replayed from the frozen prefix (model/frozen_prefix.py) has nothing to recompute
    layers = [layer for layer in getattr(decoder, "layers", []) if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = _checkpointed_forward(layer, layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward is back


def _checkpointed_forward(layer: torch.nn.Module, forward):
    index = layer.self_attn.layer_idx if hasattr(layer, "self_attn") else None

    def run(hidden_states, *args, past_key_values=None, **kwargs):
        if past_key_values is None or index is None:
            return checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
        held = past_key_values.layers[index] if index < len(past_key_values.layers) else None
        if held is not None and held.is_initialized and held.keys.numel() > 0:
            prompt_keys, prompt_values = held.keys, held.values

            def completion_segment(h, pk, pv):
                return forward(h, *args, past_key_values=_SegmentKV(pk, pv), **kwargs)

            return checkpoint(completion_segment, hidden_states, prompt_keys, prompt_values, use_reentrant=False)

        def prompt_segment(h):
            kv = _SegmentKV(None, None)
            out = forward(h, *args, past_key_values=kv, **kwargs)
            return out, kv.keys, kv.values

        out, keys, values = checkpoint(prompt_segment, hidden_states, use_reentrant=False)
        past_key_values.update(keys, values, index)
        return out

    return run


def completion_logps(
    model: torch.nn.Module, batch: CompletionBatch, share_prompt: bool = True, checkpoint_layers: bool = False,
    return_hidden: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion token given prompt and preceding tokens.

    With ``share_prompt`` the prompt, identical for all K rows, is forwarded
    once and its key/value cache repeated K times (gradients flow through it),
    instead of K times; the LM head then runs only at the positions that
    predict completion tokens, in chunks. Without it, one plain forward over
    the K full sequences (the reference path, and the fallback for models
    whose cache cannot be repeated or whose head is not a plain linear map).
    Padding is on the right only, so causal attention never lets a real token
    see a pad and no attention mask is needed. ``checkpoint_layers`` (under
    grad, shared-prompt path) recomputes each decoder layer in backward
    instead of keeping its activations (see ``checkpointed_layers``), and the
    LM head's logits with it (``chunked_head_logps``).

    Returns:
        [K, T] float32 log-probs, 0 at padding positions. Differentiable when
        called with grad enabled. With ``return_hidden`` also the [K, T, H]
        final hidden states that predict each completion token (what the head
        reads; ``features.pool_hidden`` turns them into reward-model features).
    """
    # Without grad, float32 CPU matmuls go through oneDNN where it wins (cpu_linear.py). Under grad
    # the caller decides, as backward (and any recomputation of checkpointed
    # segments in it) must run under the same routing as the forward.
    with onednn_linear(model, enabled=batch.input_ids.device.type == "cpu" and not torch.is_grad_enabled()):
        logps, hidden = _completion_logps(model, batch, share_prompt, checkpoint_layers, return_hidden)
    return (logps, hidden) if return_hidden else logps


def _completion_logps(model: torch.nn.Module, batch: CompletionBatch, share_prompt: bool, checkpoint_layers: bool,
                      return_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    k, t = batch.completion_ids.shape
    p = batch.prompt_len
    parts = _decoder_and_head(model) if share_prompt and k > 1 else None
    if parts is not None:
        decoder, head = parts
        recompute = checkpoint_layers and torch.is_grad_enabled()
        layer_checkpointing = checkpointed_layers(decoder) if recompute else contextlib.nullcontext()
        with layer_checkpointing:
            prompt_out = decoder(input_ids=batch.input_ids[:1, :p], use_cache=True)
            cache = prompt_out.past_key_values
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(k)
                hidden = prompt_out.last_hidden_state[:, -1:, :].expand(k, 1, -1)
                if t > 1:
                    rest = decoder(input_ids=batch.completion_ids[:, :-1], past_key_values=cache, use_cache=True)
                    hidden = torch.cat([hidden, rest.last_hidden_state], dim=1)
                logps = chunked_head_logps(head, hidden, batch.completion_ids, recompute=checkpoint_layers)
                return logps * batch.completion_mask, hidden if return_hidden else None
    if return_hidden and (parts := _decoder_and_head(model)) is not None:
        decoder, head = parts  # the head's input is the decoder's last_hidden_state
        hidden = decoder(input_ids=batch.input_ids, use_cache=False).last_hidden_state[:, p - 1 : p + t - 1, :]
        return chunked_head_logps(head, hidden, batch.completion_ids) * batch.completion_mask, hidden
    out = model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=t + 1, output_hidden_states=return_hidden)
    logits = out.logits[:, -(t + 1) : -1, :]
    hidden = out.hidden_states[-1][:, -(t + 1) : -1, :] if return_hidden else None
    return token_logps_from_logits(logits, batch.completion_ids) * batch.completion_mask, hidden
