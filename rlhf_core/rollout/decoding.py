"""Decoding K rows that share one prompt, one token per row per step.

The prompt is run through the model once and its key/value cache is shared by
the K rows (``open_decoding``); ``sample_next`` draws the next tokens, and
``score_continuations`` scores several continuations of one row from that
same cache (the constrained conclusion step scores the candidates this way).
"""
from __future__ import annotations

import torch

from ..model.cpu_linear import onednn_linear
from ..model.fastdecode import LlamaDecoder
from .logprobs import token_logps_from_logits


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


class BatchDecoding:
    """K rows decoding together after one shared prompt.

    ``logits`` [K, V] are the next-token logits; ``advance(tokens [K])`` feeds one
    token per row and returns the next logits; ``layer_kv()`` lists each layer's
    cached (keys, values), [K, kv_heads, positions, head_dim] after rotation,
    as Hugging Face caches hold them.
    """

    def __init__(self, logits: torch.Tensor, advance, layer_kv) -> None:
        self.logits, self.advance, self.layer_kv = logits, advance, layer_kv


def open_decoding(model, prompt_ids: list[int], k: int, device, max_len: int, lean: bool = True) -> BatchDecoding:
    """Prefill the prompt for K rows, with a cache of ``max_len`` positions: the lean
    float32 decoder where it applies (``lean``; fastdecode.py), else the model's own
    forward with a preallocated (or repeated dynamic) cache."""
    decoder = LlamaDecoder.build(model, k, max_len) if lean else None
    if decoder is not None:
        return BatchDecoding(decoder.prefill(prompt_ids).expand(k, -1), decoder.step,
                             lambda: list(zip(decoder.keys, decoder.values)))
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

    return BatchDecoding(out.logits[:, -1, :].expand(k, -1), advance,
                         lambda: [(layer.keys, layer.values) for layer in cache.layers])


def score_continuations(
    model, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], row: int, prefix_len: int, continuations: list[list[int]],
    pad_id: int,
) -> list[list[float]]:
    """Teacher-forced log-probs of several continuations of one row of a batch.

    The row's first ``prefix_len`` cached positions (``layer_kv``, from
    ``BatchDecoding.layer_kv``) are shared by the C continuations, which run in
    one forward of the model, right-padded. Each continuation must start with
    the token at position ``prefix_len`` (the row's last token, re-fed so its
    logits predict the first new one); the log-probs returned are those of the
    tokens after it, over the whole vocabulary at temperature 1.
    """
    from transformers import DynamicCache

    device = layer_kv[0][0].device
    c = len(continuations)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layer_kv):
        cache.update(keys[row : row + 1, :, :prefix_len].expand(c, -1, -1, -1).contiguous(),
                     values[row : row + 1, :, :prefix_len].expand(c, -1, -1, -1).contiguous(), index)
    length = max(len(x) for x in continuations)
    ids = torch.full((c, length), pad_id, dtype=torch.long)
    for i, x in enumerate(continuations):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    ids = ids.to(device)
    positions = (prefix_len + torch.arange(length, device=device)).expand(c, -1)
    on_cpu = device.type == "cpu"
    with torch.no_grad(), onednn_linear(model, enabled=on_cpu):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions,
                    cache_position=prefix_len + torch.arange(length, device=device))
    logps = token_logps_from_logits(out.logits[:, :-1], ids[:, 1:])
    return [logps[i, : len(x) - 1].tolist() for i, x in enumerate(continuations)]
