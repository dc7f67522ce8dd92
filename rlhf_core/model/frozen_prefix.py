"""The decoder layers below every trainable weight, run once per update.

With LoRA on the top layers only (``LoraSettings.adapted_layers`` < 1) the layers under
the lowest adapter compute the same hidden states at every optimisation step of
an update and in its post-update KL pass: their weights and the embedding are
frozen and the tokens are the same. ``replayed_frozen_prefix`` runs them on the
first forward inside the block and replays what they returned on every later
forward of the same inputs, so a 2-step update with a KL pass runs them once
instead of three times. A replayed layer also puts the prompt's keys and values
it stored back into the cache, so the shared-prompt forward
(``logprobs.completion_logps``) sees the cache it would have built.

Outputs are keyed by the input's shape and whether the layer's cache was empty
(the prompt pass or a plain forward) or held the prompt (the completion pass):
the block must see one batch only. With every layer trainable (LoRA everywhere,
full fine-tuning) nothing is frozen and the block changes nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def frozen_prefix(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The leading decoder layers of ``model`` with no trainable parameter ([] when the
    input embedding is trainable or the layers cannot be found)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    layers = list(getattr(decoder, "layers", None) or [])
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if not layers or embedding is None or any(p.requires_grad for p in embedding.parameters()):
        return []
    prefix = []
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        prefix.append(layer)
    return prefix


def _cache_is_empty(cache, index: int | None) -> bool:
    if cache is None or index is None or index >= len(getattr(cache, "layers", [])):
        return True
    held = cache.layers[index]
    return not (held.is_initialized and held.keys.numel() > 0)


def _replaying_forward(layer: torch.nn.Module, forward):
    index = layer.self_attn.layer_idx if hasattr(layer, "self_attn") else None
    recorded: dict[tuple, tuple] = {}

    def run(hidden_states, *args, past_key_values=None, **kwargs):
        empty = _cache_is_empty(past_key_values, index)
        key = (tuple(hidden_states.shape), empty)
        if key in recorded:
            out, kv = recorded[key]
            if kv is not None:
                past_key_values.update(*kv, index)
            return out
        with torch.no_grad():
            out = forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        kv = None
        if empty and past_key_values is not None and not _cache_is_empty(past_key_values, index):
            held = past_key_values.layers[index]
            kv = (held.keys, held.values)
        recorded[key] = (out, kv)
        return out

    return run


@contextlib.contextmanager
def replayed_frozen_prefix(model: torch.nn.Module) -> Iterator[int]:
    """Within the block the frozen prefix (``frozen_prefix``) runs once per input shape
    and is replayed afterwards. Yields how many layers it covers (0: nothing changed)."""
    layers = [layer for layer in frozen_prefix(model) if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = _replaying_forward(layer, layer.forward)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
