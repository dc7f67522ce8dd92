"""Float32 linear layers on CPU through oneDNN where it beats MKL here.

torch computes a float32 ``F.linear`` on CPU with MKL's SGEMM. On AMD CPUs MKL
takes its AVX2 code paths, while oneDNN, which torch also ships, uses AVX-512
wherever the CPU has it: on an AVX-512 AMD EPYC at the shapes of a K=4 update
on SmolLM2 (640 rows), MKL 145-200 GFLOPS, oneDNN 320-470. On an AMD EPYC
without AVX-512 the balance turns: MKL is 5-25% faster at the decoder layers'
shapes (forward and input gradient), oneDNN ~20% faster at the LM head's
49152 x 576 forward. So ``onednn_wins`` routes by the CPU and the weight's
shape: oneDNN everywhere with AVX-512, else only the LM head and LoRA's small
adapters (and their weight gradients still take MKL: ``_weight_grad``);
``RLHF_CPU_LINEAR=onednn`` or ``mkl`` fixes the choice instead. A
rule rather than a timing at start-up (tried: on a noisy shared VM the choice
at near-tie shapes flipped from one timing to the next, which would change the
last bits of float32 results from one process to the next). The arithmetic is
the same float32 multiply-add in another order (results agree to ~1e-6
relative, tested), so losses and gradients are the model's own whichever
computes them.

``onednn_linear(model)`` routes the model's ``nn.Linear`` layers (peft's
LoRA layers included: their base and adapter matrices are ``nn.Linear``)
whose shape oneDNN wins through oneDNN, forward and backward, for the
duration of a block; inputs that are not float32 on CPU, or a torch without
oneDNN, take ``F.linear``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Iterator

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (and the weight reordering
    ``fastdecode.PackedLinear`` uses with it)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T (+ bias) in oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], as a linear layer whose weight is b.T (a view)."""
    return _linear_pointwise(a, b.t(), None)


def _weight_grad(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """grad_rows[M, out].T @ x_rows[M, in]: the weight's gradient [out, in]. oneDNN takes the
    transposed operand through a reorder (a copy) and an inner dimension of M rows, where
    MKL reads it in place: without AVX-512 MKL computes it 1.3-4x faster here (LM head 166 ->
    114 ms at 128 rows, a LoRA B matrix 1.7 -> 0.4 ms), so only AVX-512 CPUs keep oneDNN."""
    if has_avx512():
        return _matmul(grad_rows.t(), x_rows)
    return grad_rows.t().mm(x_rows)


class OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN GEMMs in forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] @ weight[out, in].T (+ bias), keeping what ``backward`` needs."""
        # a frozen weight (a LoRA base layer) needs no input kept for its gradient
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _linear_pointwise(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """The gradients of x, weight and bias (None for those that need none)."""
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # [M, out]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_rows, weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_rows, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(dim=0)
        return grad_x, grad_weight, grad_bias


CHOICE_ENV = "RLHF_CPU_LINEAR"  # "auto" (default): the rule of onednn_wins | "onednn" | "mkl"
SMALL_WEIGHT = 1 << 16  # elements: a GEMM this small is call overhead, not arithmetic (LoRA's adapters)
HEAD_SIZED = 16384  # output features: an LM head's vocabulary, never a decoder layer's width


@functools.cache
def has_avx512() -> bool:
    """Whether torch's CPU kernels run AVX-512 code here (oneDNN's float32 GEMMs then are ~2x MKL's on AMD)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_wins(out_features: int, in_features: int) -> bool:
    """Whether a float32 ``[out_features, in_features]`` weight computes through oneDNN
    rather than ``F.linear`` (MKL): on an AVX-512 CPU always, otherwise only LoRA-sized
    and LM-head-sized weights (the measurements are in the module's docstring);
    ``$RLHF_CPU_LINEAR`` fixes it."""
    choice = os.environ.get(CHOICE_ENV, "auto").strip().lower()
    if choice not in ("auto", "onednn", "mkl"):
        raise ValueError(f"{CHOICE_ENV}={choice!r}: expected auto, onednn or mkl")
    if choice != "auto":
        return choice == "onednn"
    return has_avx512() or out_features * in_features < SMALL_WEIGHT or out_features >= HEAD_SIZED


def _routable(x, weight, bias) -> bool:
    tensors = [x, weight] + ([] if bias is None else [bias])
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided for t in tensors)
        and x.dim() >= 2
        and x.numel() > 0
    )


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _routable(x, self.weight, self.bias):
        return OneDnnLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` without grad, through oneDNN where it applies (float32 on CPU) and wins."""
    if onednn_available() and _routable(x, weight, bias) and onednn_wins(*weight.shape):
        return _linear_pointwise(x, weight, bias)
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def onednn_linear(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, the model's float32 CPU ``nn.Linear`` layers whose shape
    oneDNN computes faster here (``onednn_wins``) compute through it, forward and
    backward. Yields whether routing is on (it may route no layer at all).

    Backward must run inside the same block as its forward: recomputed
    (checkpointed) segments must match what the forward saved. Nested blocks
    on the same model leave the outer one in charge.
    """
    if not enabled or not onednn_available():
        yield False
        return
    patched = []
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and "forward" not in vars(module)
                and onednn_wins(module.out_features, module.in_features)):
            module.forward = types.MethodType(_onednn_forward, module)
            patched.append(module)
    try:
        yield True
    finally:
        for module in patched:
            del module.forward
