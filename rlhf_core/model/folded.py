"""LoRA adapters folded into their base weights for the length of a no-grad block.

A peft LoRA layer computes ``base(x) + B(A(dropout(x))) * scale``: three
matmuls and a handful of small ops per linear layer, 210 such layers on
SmolLM2. Where nothing is trained (sampling's prompt pass and conclusion
step, the probe set, the belief chart) one matmul by the weight the layer
applies (``fastdecode.effective_weight``) computes the same map: ~25% off
a probe scoring on SmolLM2 (measured, 2-core AMD VM). The folded weights
are new tensors (the adapter and its base are untouched, so nothing needs
unfolding), dropped when the block ends.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .cpu_linear import linear
from .fastdecode import effective_weight


def _folded_forward(weight: torch.Tensor):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled():  # a folded weight has no gradient path to the adapter
            raise RuntimeError("LoRA adapters are folded for inference only; run this under torch.no_grad()")
        return linear(x, weight)

    return forward


@contextlib.contextmanager
def folded_adapters(model: torch.nn.Module) -> Iterator[int]:
    """Within the block (under ``torch.no_grad()``) every LoRA layer of ``model`` that
    ``effective_weight`` can fold computes as one linear map. Yields how many were folded
    (0 for a model without adapters, which is left as it is)."""
    patched = []
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and "forward" not in vars(module):
                weight = effective_weight(module)
                if weight is not None:
                    module.forward = _folded_forward(weight.contiguous())
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
