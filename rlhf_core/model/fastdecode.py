"""A lean float32 decoding step for Llama-family models on CPU.

Decoding K rows is one token per row per step: every weight is read once per
step for a handful of multiply-adds, so speed is how fast the weights stream
through the two cores plus whatever runs around the matmuls. On SmolLM2 with
K=4, Hugging Face's forward spends ~40% of a step outside the weight matmuls
(module dispatch, cache and mask bookkeeping), and ``F.linear`` at 4 rows
reads its weights at a fraction of the rate of a GEMM whose weight was
reordered once for that batch size (``PackedLinear``: ~3x on the AMD VM,
~1.5x on an Intel one). This module holds the policy's weights packed once per sampling run
(q/k/v fused, gate/up fused, LoRA adapters folded in) and runs the same
float32 arithmetic as the model's forward with a preallocated key/value
cache. Logits agree with the model's own forward to
float32 rounding (~1e-5, tested), so sampled traces and their stored log-probs
are those of the float32 policy, not of an approximation.

Only Llama-architecture models on CPU in float32 qualify (SmolLM, SmolLM2,
TinyLlama); ``LlamaDecoder.build`` returns None for anything else and the
caller decodes through the model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import onednn_available, onednn_linear

SUPPORTED_MODEL_TYPES = {"llama"}


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def effective_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The [out, in] weight a linear layer applies, LoRA deltas included.

    None where the layer is not a bias-free linear map this module can fold
    (merged or DoRA adapters, biases, other layer kinds).
    """
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # peft LoRA layer
        base = module.base_layer
        if not isinstance(base, torch.nn.Linear) or base.bias is not None or getattr(module, "merged", False):
            return None
        weight = base.weight.detach()
        if getattr(module, "disable_adapters", False):
            return weight
        active = [a for a in module.active_adapters if a in module.lora_A]
        if any(getattr(module, "use_dora", {}).get(a, False) for a in active):
            return None
        for adapter in active:
            weight = weight + module.get_delta_weight(adapter).detach()
        return weight
    if isinstance(module, torch.nn.Linear) and module.bias is None:
        return module.weight.detach()
    return None


class PackedLinear:
    """``x @ weight.T`` for exactly ``rows`` input rows, with the weight prepacked.

    At a handful of rows a matmul is the time it takes to stream the weight, and
    how fast that goes depends on the kernel's layout and code path, not on the
    arithmetic. Backends, best first:

    * ``"onednn"``: oneDNN's inner product on a weight reordered once for the
      batch size. Measured on the 2-core AMD EPYC (AVX-512) VM: ~37 GB/s, and a
      SmolLM2 decoding step for K=4 of ~20 ms against ~54 ms with MKL.
    * ``"mkl"``: MKL's packed SGEMM. On the Intel VM of an earlier session it
      reached the memory bandwidth (~22 GB/s); on AMD, MKL takes its AVX2 code
      paths and streams at ~12 GB/s, like ``F.linear``.
    * ``"plain"``: a transposed contiguous copy, where neither is in the build.

    All three compute in float32 (agreement ~1e-6 relative, tested).
    """

    def __init__(self, weight: torch.Tensor, rows: int, backend: str | None = None) -> None:
        available = packing_backends()
        backend = backend or available[0]
        if backend not in available:
            raise ValueError(f"packing backend {backend!r} is not available here (have: {', '.join(available)})")
        self.rows, self.backend = rows, backend
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        if backend == "onednn":
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        elif backend == "mkl":
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            # MKL only reads the original's shape; a broadcast stand-in keeps a
            # folded LoRA weight from staying alive next to its packed copy
            self._shape_only = torch.zeros((), dtype=weight.dtype).expand(self.out_features, self.in_features)
        else:
            self._packed = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, in]. Returns [rows, out]."""
        if x.shape[0] != self.rows:  # MKL's packed kernel would silently fall back to the stand-in
            raise ValueError(f"packed for {self.rows} rows, got {x.shape[0]}")
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        if self.backend == "mkl":
            return torch.ops.mkl._mkl_linear(x, self._packed, self._shape_only, None, self.rows)
        return x @ self._packed


def packing_backends() -> list[str]:
    """``PackedLinear`` backends this torch build offers, best first."""
    backends = []
    if onednn_available():
        backends.append("onednn")
    if getattr(torch._C, "has_mkl", False) and hasattr(torch.ops.mkl, "_mkl_linear"):
        backends.append("mkl")
    return backends + ["plain"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Decodes ``rows`` sequences that share one prompt, one token per row per step.

    Usage: ``decoder.prefill(prompt_ids)`` returns the prompt's last logits
    [V]; then ``decoder.step(tokens)`` with one token per row returns the next
    logits [rows, V]. All rows advance together (finished rows keep feeding a
    pad token, as with the model's own forward), so every row is at the same
    position and no attention mask is needed.

    The prompt's keys and values are held once, not once per row: at a step,
    attention reads the cache, and with 16 rows after a 250-token prompt
    the 16 copies of the prompt were half the bytes a step read (attention was
    a quarter of the step). Each row's queries meet the shared prompt keys in
    one matmul for all rows and their own generated keys in another, with one
    softmax over both (``_attend``): the same attention, read once.
    ``row_cache`` gives rows their whole cache back when a caller needs it.
    """

    def __init__(self, model: torch.nn.Module, rows: int, max_len: int, layers: list[dict], head: PackedLinear) -> None:
        base = _base_model(model)
        config = base.config
        self.model, self.rows, self.max_len = model, rows, max_len
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.layers, self.head = layers, head
        decoder = base.get_decoder()
        self.embed = decoder.embed_tokens.weight.detach()
        self.final_norm = decoder.norm.weight.detach()
        dtype = self.embed.dtype
        with torch.no_grad():
            positions = torch.arange(max_len)[None]
            cos, sin = decoder.rotary_emb(torch.zeros((), dtype=dtype), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.dtype = dtype
        self.prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [kv_heads, P, head_dim], shared
        self.own_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [kv_heads, rows, max_len - P, head_dim]
        self.prompt_len = 0
        self.length = 0  # positions filled in the cache

    @classmethod
    def build(cls, model: torch.nn.Module, rows: int, max_len: int) -> "LlamaDecoder | None":
        """A decoder holding the model's current weights, or None where it does not apply."""
        base = _base_model(model)
        config = getattr(base, "config", None)
        if (
            config is None
            or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES
            or getattr(config, "hidden_act", "silu") != "silu"
            or getattr(config, "attention_bias", False)
            or getattr(config, "mlp_bias", False)
            or getattr(config, "pretraining_tp", 1) != 1
        ):
            return None
        try:
            parameter = next(base.parameters())
        except StopIteration:
            return None
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            return None
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        head_weight = effective_weight(head) if head is not None else None
        if head_weight is None:
            return None
        layers = []
        with torch.no_grad():
            for layer in decoder.layers:
                attn, mlp = layer.self_attn, layer.mlp
                weights = [effective_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
                if any(w is None for w in weights):
                    return None
                q, k, v, o, gate, up, down = weights
                layers.append(
                    {
                        "input_norm": layer.input_layernorm.weight.detach(),
                        "post_norm": layer.post_attention_layernorm.weight.detach(),
                        "qkv": PackedLinear(torch.cat([q, k, v]), rows),
                        "o": PackedLinear(o, rows),
                        "gate_up": PackedLinear(torch.cat([gate, up]), rows),
                        "down": PackedLinear(down, rows),
                    }
                )
            return cls(model, rows, max_len, layers, PackedLinear(head_weight, rows))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's arithmetic as one fused kernel
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt through the model's own forward and keep its keys/values
        (once, shared by every row). Returns the logits after the prompt, [V]."""
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a cache of {self.max_len}")
        with torch.no_grad(), onednn_linear(self.model):
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        self.prompt_kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous())
                          for layer in out.past_key_values.layers]
        shape = (self.kv_heads, self.rows, self.max_len - len(prompt_ids), self.head_dim)
        self.own_kv = [(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
                       for _ in self.layers]
        self.prompt_len = self.length = len(prompt_ids)
        return out.logits[0, -1]

    def _attend(self, q: torch.Tensor, prompt_kv, own_kv) -> torch.Tensor:
        """Scaled dot-product attention of each row's query over the shared prompt's keys
        and the row's own, one softmax over both; the query heads that share a key/value
        head (grouped-query attention) are grouped as Hugging Face's ``repeat_kv`` groups them.

        Args:
            q: [rows, heads, head_dim]; prompt_kv: ([kv_heads, P, head_dim],) * 2;
            own_kv: ([kv_heads, rows, n, head_dim],) * 2.
        Returns:
            [rows, heads * head_dim].
        """
        rows, kv_heads, dim = self.rows, self.kv_heads, self.head_dim
        group = self.heads // kv_heads
        (prompt_keys, prompt_values), (own_keys, own_values) = prompt_kv, own_kv
        prompt_len = prompt_keys.shape[1]
        q = q.view(rows, kv_heads, group, dim).transpose(0, 1)  # [kv_heads, rows, group, dim]
        shared = torch.matmul(q.reshape(kv_heads, rows * group, dim), prompt_keys.transpose(1, 2))
        own = torch.matmul(q, own_keys.transpose(-1, -2))  # [kv_heads, rows, group, n]
        weights = torch.softmax(torch.cat([shared.view(kv_heads, rows, group, prompt_len), own], dim=-1) * self.scale,
                                dim=-1)
        out = torch.matmul(weights[..., :prompt_len].reshape(kv_heads, rows * group, prompt_len), prompt_values)
        out = out.view(kv_heads, rows, group, dim) + torch.matmul(weights[..., prompt_len:], own_values)
        return out.transpose(0, 1).reshape(rows, self.heads * dim)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [rows] ids at the next position. Returns logits [rows, V]."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions")
        rows, heads, kv_heads, dim = self.rows, self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[pos], self.sin[pos]
        n = pos - self.prompt_len  # this token's index among the rows' own
        with torch.no_grad():
            x = self.embed[tokens]  # [rows, C]
            for layer, prompt_kv, (keys, values) in zip(self.layers, self.prompt_kv, self.own_kv):
                h = self._norm(x, layer["input_norm"])
                qkv = layer["qkv"](h)
                # queries and keys rotate together: one set of elementwise ops for both
                qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
                qk = qk * cos + _rotate_half(qk) * sin
                keys[:, :, n] = qk[:, heads:].transpose(0, 1)
                values[:, :, n] = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim).transpose(0, 1)
                attended = self._attend(qk[:, :heads], prompt_kv, (keys[:, :, : n + 1], values[:, :, : n + 1]))
                x = x + layer["o"](attended)
                h = self._norm(x, layer["post_norm"])
                gate, up = layer["gate_up"](h).chunk(2, dim=-1)
                x = x + layer["down"](F.silu(gate) * up)
            logits = self.head(self._norm(x, self.final_norm))
        self.length = pos + 1
        return logits

    def row_cache(self, rows: list[int], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of ``rows``' first ``length`` positions, as Hugging
        Face caches hold them: [len(rows), kv_heads, length, head_dim] (copies)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"asked for {length} cached positions, the cache has {self.length}")
        index = torch.tensor(rows, dtype=torch.long)
        shared, own = min(length, self.prompt_len), length - min(length, self.prompt_len)

        def whole(prompt: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
            head = prompt[None, :, :shared].expand(len(rows), -1, -1, -1)
            return torch.cat([head, generated[:, :, :own].index_select(1, index).transpose(0, 1)], dim=2)

        return [(whole(pk, gk), whole(pv, gv)) for (pk, pv), (gk, gv) in zip(self.prompt_kv, self.own_kv)]
