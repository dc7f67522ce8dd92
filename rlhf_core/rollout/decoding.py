"""Decoding K rows that share one prompt, one token per row per step.

The prompt is run through the model once and its key/value cache is shared by
the K rows (``open_decoding``); ``sample_next`` draws the next tokens, and
``score_branches`` scores a stem and several branches after it for several rows
from that same cache, in one forward (the constrained conclusion step scores the
candidates this way).
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
    token per row and returns the next logits; ``layer_kv(rows, length)`` lists each
    layer's cached (keys, values) of those rows' first ``length`` positions,
    [len(rows), kv_heads, length, head_dim] after rotation, as Hugging Face caches hold them.
    """

    def __init__(self, logits: torch.Tensor, advance, layer_kv) -> None:
        self.logits, self.advance, self.layer_kv = logits, advance, layer_kv


def open_decoding(model, prompt_ids: list[int], k: int, device, max_len: int, lean: bool = True) -> BatchDecoding:
    """Prefill the prompt for K rows, with a cache of ``max_len`` positions: the lean
    float32 decoder where it applies (``lean``; fastdecode.py), else the model's own
    forward with a preallocated (or repeated dynamic) cache."""
    decoder = LlamaDecoder.build(model, k, max_len) if lean else None
    if decoder is not None:
        return BatchDecoding(decoder.prefill(prompt_ids).expand(k, -1), decoder.step, decoder.row_cache)
    # float32 CPU matmuls through oneDNN where it beats MKL (cpu_linear.py; ~1.45x a SmolLM2 step
    # at 4 rows on the AVX-512 AMD VM)
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

    def layer_kv(rows: list[int], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.tensor(rows, device=device)
        return [(layer.keys[:, :, :length].index_select(0, index), layer.values[:, :, :length].index_select(0, index))
                for layer in cache.layers]

    return BatchDecoding(out.logits[:, -1, :].expand(k, -1), advance, layer_kv)


def tree_layout(stem_len: int, branch_lens: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Where each token of a stem and its branches sits when they are packed into one row.

    The packed row is the stem's tokens, then each branch's in turn. Returns, per packed
    token: its depth (position after the stem's first token), its group (-1: the stem,
    else the branch's index), and the packed index of the token whose logits predict it
    (-1 for the stem's first token, which is only re-fed).
    """
    depth = list(range(stem_len))
    group = [-1] * stem_len
    predictor = list(range(-1, stem_len - 1))
    for b, n in enumerate(branch_lens):
        start = len(depth)
        depth += [stem_len + j for j in range(n)]
        group += [b] * n
        predictor += [stem_len - 1] + [start + j for j in range(n - 1)]
    return depth, group, predictor


def tree_mask(group: list[int], length: int) -> torch.Tensor:
    """[length, length] bool: packed token q may attend to packed token k (k <= q, and k is
    in the stem or in q's own branch). Tokens past ``len(group)`` (padding) see only
    themselves, so no row of the attention is empty."""
    n = len(group)
    g = torch.tensor(group)
    allowed = torch.zeros((length, length), dtype=torch.bool)
    causal = torch.ones((n, n), dtype=torch.bool).tril()
    allowed[:n, :n] = causal & ((g[None, :] == -1) | (g[None, :] == g[:, None]))
    pad = torch.arange(n, length)
    allowed[pad, pad] = True
    return allowed


def score_branches(
    model, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_lens: list[int],
    stems: list[list[int]], branches: list[list[list[int]]], pad_id: int,
) -> list[tuple[list[float], list[list[float]]]]:
    """Teacher-forced log-probs of a stem and several branches after it, for several cached rows, in one forward.

    Row ``r`` of ``layer_kv`` (each layer's cached keys and values, [R, kv_heads, positions,
    head_dim], e.g. from ``BatchDecoding.layer_kv``) holds a sequence whose first
    ``prefix_lens[r]`` positions are its own. ``stems[r]`` continues it and starts with the
    token at position ``prefix_lens[r]`` (the row's last token, re-fed so its logits predict
    the next one); each of the row's ``branches[r]`` continues the stem. Stem and branches are packed into one row
    (``tree_layout``) whose attention mask lets each branch see the prefix, the stem and its
    own earlier tokens only (``tree_mask``), so the cache is read in place and each branch's
    tokens are scored once, as in a forward of ``prefix + stem + branch``.

    Returns per row: the stem's log-probs after its first token, and each branch's log-probs,
    over the whole vocabulary at temperature 1.
    """
    from transformers import DynamicCache

    device = layer_kv[0][0].device
    cached = max(prefix_lens)
    rows = range(len(stems))
    layouts = [tree_layout(len(stem), [len(b) for b in row]) for stem, row in zip(stems, branches)]
    length = max(len(depth) for depth, _, _ in layouts)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, length, cached + length), dtype=torch.bool)
    for r, (stem, (depth, group, _)) in enumerate(zip(stems, layouts)):
        packed = stem + [t for b in branches[r] for t in b]
        ids[r, : len(packed)] = torch.tensor(packed)
        positions[r, : len(depth)] = prefix_lens[r] + torch.tensor(depth)
        mask[r, 0, : len(depth), : prefix_lens[r]] = True  # the row's own prefix, never another row's tail
        mask[r, 0, :, cached:] = tree_mask(group, length)
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(layer_kv):
        cache.update(keys[:, :, :cached], values[:, :, :cached], layer)
    ids, positions, mask = ids.to(device), positions.to(device), mask.to(device)
    with torch.no_grad(), onednn_linear(model, enabled=device.type == "cpu"):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions, attention_mask=mask,
                    cache_position=cached + torch.arange(length, device=device))
    results = []
    for r, (depth, group, predictor) in enumerate(layouts):
        targets = torch.arange(1, len(depth), device=device)  # every packed token but the re-fed first one
        logps = token_logps_from_logits(out.logits[r, torch.tensor(predictor[1:], device=device)][None],
                                        ids[r, targets][None])[0].tolist()
        stem_n = len(stems[r]) - 1
        stem_logps, rest = logps[:stem_n], logps[stem_n:]
        split, offset = [], 0
        for b in branches[r]:
            split.append(rest[offset: offset + len(b)])
            offset += len(b)
        results.append((stem_logps, split))
    return results
