"""The full sequence-classification reward model, for users with a GPU.

The small head of ``reward_model`` reads frozen reference features and fits in
milliseconds; this one fine-tunes the policy's own backbone with a one-output
head (transformers ``AutoModelForSequenceClassification``, the last non-padding
token's hidden state), optionally as a LoRA adapter (peft), on the same K-way
rankings with the same Plackett-Luce loss (``losses.plackett_luce_loss``), so
one ranking of K traces is one forward over K sequences and one step. Its
scores go through the same metrics (``reward_data.pairwise_accuracy``,
``mean_kendall_tau``), which is how ``bench.reward`` compares the two.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model.models import LoadedModel
from ..training.bounds import Range, check_fields, knob
from ..training.losses import plackett_luce_loss
from .reward_data import RankingSet


@dataclass
class SequenceRewardConfig:
    """How the sequence-classification reward model is fine-tuned."""

    lora: bool = knob(True, "Train a LoRA adapter (and the head) instead of every weight of the backbone.")
    lora_r: int = knob(16, "LoRA rank.", Range(1, 256, integer=True))
    lr: float = knob(1e-4, "AdamW learning rate (full fine-tuning wants ~1e-5).", Range(0.0, 1e-2, open_low=True))
    epochs: int = knob(2, "Passes over the rankings (one AdamW step per ranking).", Range(1, 100, integer=True))
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.", Range(0.0, 1e3, open_low=True))
    seed: int = knob(0, "Seed of the head, the LoRA weights and the ranking order.", Range(0, 2**31 - 1, integer=True))

    def __post_init__(self) -> None:
        check_fields(self)


class SequenceRewardModel:
    """A fine-tuned sequence classifier: token ids of prompt + completion -> one score."""

    def __init__(self, model: torch.nn.Module, pad_id: int, info: dict):
        self.model, self.pad_id, self.info = model, pad_id, info

    def scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """[N] scores of N token sequences (with grad when the caller enables it)."""
        return _forward(self.model, sequences, self.pad_id)

    def score_rankings(self, token_ids: list[list[list[int]]], shape: tuple[int, int]) -> np.ndarray:
        """[R, K] scores of R rankings' sequences (zeros at padding), for the ``reward_data`` metrics."""
        out = np.zeros(shape, np.float32)
        self.model.eval()
        with torch.no_grad():
            for r, seqs in enumerate(token_ids):
                out[r, : len(seqs)] = self.scores(seqs).float().cpu().numpy()
        return out


def _forward(model: torch.nn.Module, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded batch through the classifier; it scores each row's last non-padding token."""
    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
    return model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, 0]


def sequence_classifier(lm: LoadedModel, config: SequenceRewardConfig) -> torch.nn.Module:
    """The policy's backbone (its current weights) under a fresh one-output head; LoRA-wrapped
    when ``config.lora``. The policy itself is not touched."""
    from transformers import AutoModelForSequenceClassification

    base = lm.model.get_base_model() if lm.lora is not None else lm.model
    model_config = copy.deepcopy(base.config)
    model_config.num_labels, model_config.pad_token_id = 1, lm.tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        rm = AutoModelForSequenceClassification.from_config(model_config).to(device=lm.device, dtype=lm.dtype)
        state = {k: v for k, v in base.base_model.state_dict().items() if "lora_" not in k}
        missing = rm.base_model.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise ValueError(f"{lm.name}: the backbone's weights do not fit its classifier ({missing[:3]} ...)")
        if config.lora:
            from peft import LoraConfig, get_peft_model

            rm = get_peft_model(rm, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                               task_type="SEQ_CLS"))
    return rm


def fit_sequence_rm(lm: LoadedModel, token_ids: list[list[list[int]]], data: RankingSet,
                    config: SequenceRewardConfig | None = None) -> SequenceRewardModel:
    """Fine-tune a ``sequence_classifier`` on ``data``'s rankings: ``token_ids[r]`` holds the prompt +
    completion ids of ranking r's traces, aligned with ``data.ranks[r]``. One AdamW step per ranking
    (forward, Plackett-Luce loss, backward, clip, step, zero_grad), ``config.epochs`` passes."""
    config = config or SequenceRewardConfig()
    if len(data) == 0:
        raise ValueError("no rankings to fit a reward model on")
    started = time.perf_counter()
    model = sequence_classifier(lm, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    order = list(range(len(data)))
    rng = random.Random(config.seed)
    pad = lm.tokenizer.pad_token_id
    model.train()
    losses = []
    for _ in range(config.epochs):
        rng.shuffle(order)
        for r in order:
            k = len(token_ids[r])
            ranks = torch.from_numpy(data.ranks[r : r + 1, :k]).to(lm.device)
            weight = None if data.weights is None else torch.tensor(data.weights[r : r + 1], device=lm.device)
            loss = plackett_luce_loss(_forward(model, token_ids[r], pad).float()[None], ranks, weight).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    info = {"rankings": len(data), "train_loss": float(np.mean(losses[-len(data):])), "steps": len(losses),
            "trainable_parameters": sum(p.numel() for p in params), "seconds": time.perf_counter() - started,
            "mode": "lora" if config.lora else "full"}
    return SequenceRewardModel(model, pad, info)


def ranking_token_ids(store, workspace: str, data: RankingSet) -> list[list[list[int]]]:
    """Prompt + completion token ids of every trace of ``data``'s rankings, from the store."""
    wanted = {t for ids in data.trace_ids for t in ids}
    traces = {t.trace_id: t for t in store.traces(workspace) if t.trace_id in wanted}
    return [[list(traces[t].prompt_ids) + list(traces[t].completion_ids) for t in ids] for ids in data.trace_ids]
