"""Reward-model features of a trace: the frozen reference's view of it, stored compactly.

The reference pass that sampling already runs (to get reference log-probs)
yields the final hidden states that predict each completion token; pooled,
they describe the trace for a small reward head (``reward_model``) without
another forward. The reference never changes, so features stored at sampling
time stay valid for every later fit.
"""
from __future__ import annotations

import base64

import numpy as np
import torch

FEATURE_DTYPE = np.float16  # 2 bytes a number: a SmolLM2 trace's 1,152 features are ~3 kB as text


def pool_hidden(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Mean-pooled and last-position hidden states of each completion.

    Args:
        hidden: [K, T, H] hidden states; position t predicts completion token t.
        lengths: K completion lengths (positions past a row's length are padding).

    Returns:
        [K, 2H] float32: the mean over each row's positions, then its last position.
    """
    k, t, _ = hidden.shape
    if len(lengths) != k:
        raise ValueError(f"{len(lengths)} lengths for {k} rows")
    lengths_t = torch.tensor([max(1, min(n, t)) for n in lengths], device=hidden.device)
    mask = (torch.arange(t, device=hidden.device).unsqueeze(0) < lengths_t.unsqueeze(1)).to(hidden.dtype)
    mean = (hidden * mask.unsqueeze(-1)).sum(dim=1) / lengths_t.unsqueeze(1).to(hidden.dtype)
    last = hidden[torch.arange(k, device=hidden.device), lengths_t - 1]
    return torch.cat([mean, last], dim=-1).float()


def encode(row: torch.Tensor) -> str:
    """One trace's features as base64 text (float16), for JSON and the database."""
    return base64.b64encode(row.detach().cpu().numpy().astype(FEATURE_DTYPE).tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    """``encode``'s inverse, as float32; ValueError for text that is not features."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"not a feature vector: {err}") from None
    if not raw or len(raw) % np.dtype(FEATURE_DTYPE).itemsize:
        raise ValueError("not a feature vector: wrong length")
    values = np.frombuffer(raw, dtype=FEATURE_DTYPE).astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError("not a feature vector: non-finite values")
    return values
