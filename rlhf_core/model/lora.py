"""LoRA: the adapter's shape (``LoraSettings``) and peft's config for it.

The default adapter covers every decoder layer. One on the top half only
(``adapted_layers=0.5``) makes an update ~40% shorter on SmolLM2 (backward stops at the
lowest adapter and the frozen layers under it run once, ``frozen_prefix.py``), but in
30-update scripted runs it improved fewer of the taught cases (46 of 60 against 49 of 60
over two seeds) and lowered the training cases not ranked more (README "learning modes"),
so it stays an option.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft)."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input; 0 keeps log-probs deterministic
    target_modules: str | list[str] = "all-linear"  # which linear layers get adapters
    # the share of decoder layers, counted from the top, that get adapters (1.0: every layer):
    # backward stops at the lowest adapted layer and the frozen ones under it run once per
    # update (frozen_prefix.py), so an update costs less (README "learning modes" measures it)
    adapted_layers: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.adapted_layers <= 1.0:
            raise ValueError(f"LoRA adapted_layers is the share of decoder layers that get adapters, in (0, 1]; "
                             f"got {self.adapted_layers}")
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def lora_from_dict(saved: dict | None) -> LoraSettings | None:
    """LoRA settings as a checkpoint manifest stores them (None: full fine-tuning); a manifest
    written before ``adapted_layers`` existed had adapters on every layer."""
    return None if saved is None else LoraSettings(**{"adapted_layers": 1.0, **saved})


def peft_config(lora: LoraSettings, model: torch.nn.Module):
    """peft's config for ``lora`` on ``model`` (the base model, before adapters)."""
    from peft import LoraConfig

    targets, layers = lora.target_modules, None
    if lora.adapted_layers < 1.0:
        n_layers = model.config.num_hidden_layers
        top = max(1, round(n_layers * lora.adapted_layers))
        layers = list(range(n_layers - top, n_layers))
        if targets == "all-linear":  # peft takes a layer subset only with named targets: name them
            head = model.get_output_embeddings()
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head})
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,  # peft reads the index from the first numbered segment of a module's name
        task_type="CAUSAL_LM",
    )
