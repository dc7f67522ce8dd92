"""Float32 linear layers on CPU through oneDNN where it beats MKL here.

torch computes a float32 ``F.linear`` on CPU with MKL's SGEMM. On AMD CPUs MKL
takes its AVX2 code paths, while oneDNN, which torch also ships, uses AVX-512
wherever the CPU has it: on an AVX-512 AMD EPYC at the shapes of a K=4 update
on SmolLM2 (640 rows), MKL 145-200 GFLOPS, oneDNN 320-470. On an AMD EPYC
without AVX-512 the balance turns: MKL is 5-25% faster at the decoder layers'
shapes (forward and input gradient) and oneDNN ~25% faster only at the LM
head's 49152 x 576. So which library computes a weight shape is measured, not
assumed: ``onednn_wins`` times both once per shape per process (a few ms; the
LM head ~0.5 s) and remembers the faster. ``RLHF_CPU_LINEAR=onednn`` or ``mkl``
fixes the choice instead. The arithmetic is the same float32 multiply-add in
another order (results agree to ~1e-6 relative, tested), so losses and
gradients are the model's own whichever computes them.

``onednn_linear(model)`` routes the model's ``nn.Linear`` layers (peft's
LoRA layers included: their base and adapter matrices are ``nn.Linear``)
whose shape oneDNN wins through oneDNN, forward and backward, for the
duration of a block; inputs that are not float32 on CPU, or a torch without
oneDNN, take ``F.linear``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
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
            grad_weight = _matmul(grad_rows.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(dim=0)
        return grad_x, grad_weight, grad_bias


CHOICE_ENV = "RLHF_CPU_LINEAR"  # "auto" (default): timed per weight shape | "onednn" | "mkl"
_faster_here: dict[tuple[int, int], bool] = {}  # (out, in) -> oneDNN measured faster


def onednn_wins(out_features: int, in_features: int) -> bool:
    """Whether a float32 ``[out_features, in_features]`` weight computes faster through
    oneDNN than through ``F.linear`` (MKL) on this machine: timed on first use, or
    fixed by ``$RLHF_CPU_LINEAR``."""
    choice = os.environ.get(CHOICE_ENV, "auto").strip().lower()
    if choice not in ("auto", "onednn", "mkl"):
        raise ValueError(f"{CHOICE_ENV}={choice!r}: expected auto, onednn or mkl")
    if choice != "auto":
        return choice == "onednn"
    key = (out_features, in_features)
    if key not in _faster_here:
        _faster_here[key] = _time_onednn_against_mkl(out_features, in_features)
    return _faster_here[key]


def _time_onednn_against_mkl(out_features: int, in_features: int, rows: int | None = None, repeats: int = 3) -> bool:
    """Forward and input-gradient GEMMs (what both an update and a no-grad pass run) at
    ``rows`` rows (default 256, as in an update; 32 for a weight the size of an LM head,
    which keeps its timing under ~0.5 s), each library's best of ``repeats`` rounds, the
    two interleaved so a slow moment on a shared machine hits both."""
    if rows is None:
        rows = 256 if out_features * in_features <= 1 << 22 else 32
    with torch.no_grad():  # the values do not matter to a dense GEMM's speed; constants are quick to make
        x = torch.full((rows, in_features), 0.5)
        weight = torch.full((out_features, in_features), 0.01)
        upstream = torch.full((rows, out_features), 0.25)
        candidates = {
            True: lambda: (_linear_pointwise(x, weight, None), _matmul(upstream, weight)),
            False: lambda: (F.linear(x, weight), upstream @ weight),  # what autograd runs for F.linear
        }
        for run in candidates.values():  # warm-up: first calls pay for allocation and dispatch
            run()
        best = dict.fromkeys(candidates, math.inf)
        for _ in range(repeats):
            for onednn, run in candidates.items():
                start = time.perf_counter()
                run()
                best[onednn] = min(best[onednn], time.perf_counter() - start)
        return best[True] < best[False]


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
