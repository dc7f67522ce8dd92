"""The control room's settings read from the environment, each checked with a clear error."""
from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT_EVERY = 10  # default: a checkpoint every N updates (replay covers the ones between)
# default (taught, held-out) cases scored after every update: on SmolLM2 on 2 cores 2 + 2 cost
# ~2.9 s an update (the 3 s budget), 3 + 3 ~4.3 s; scoring is compute-bound (the prompts' tokens)
PROBE_SIZE = (2, 2)


def checkpoint_every_from_env(default: int = CHECKPOINT_EVERY) -> int:
    """``$RLHF_CHECKPOINT_EVERY`` (a positive integer), else ``default``."""
    value = os.environ.get("RLHF_CHECKPOINT_EVERY", "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"RLHF_CHECKPOINT_EVERY must be a positive integer, got {value!r}")
    return n


def probe_size_from_env(default: tuple[int, int] = PROBE_SIZE) -> tuple[int, int]:
    """``$RLHF_PROBE`` as "taught,heldout" (two whole numbers 0-50), else ``default``."""
    raw = os.environ.get("RLHF_PROBE", "").strip()
    if not raw:
        return default
    try:
        taught, heldout = (int(x) for x in raw.split(","))
        if not (0 <= taught <= 50 and 0 <= heldout <= 50):
            raise ValueError
    except ValueError:
        raise ValueError(f"RLHF_PROBE must be 'taught,heldout' (two whole numbers 0-50), got {raw!r}") from None
    return taught, heldout


def lora_from_env() -> bool | None:
    """``$RLHF_LORA``: 1/true/yes/on an adapter, 0/false/no/off full fine-tuning, unset or
    "auto" the workspace's own mode, else LoRA on CPU for models of 100M+ parameters."""
    raw = os.environ.get("RLHF_LORA", "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"RLHF_LORA must be 1, 0 or auto, got {raw!r}")


def default_export_dir() -> Path:
    """Downloads are written inside Gradio's file cache, so they are served without a copy."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()) / "rlhf-exports"
