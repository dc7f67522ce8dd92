"""Policy updates from a clinician's ranking: DPO over all ranked pairs, or GRPO
with rank rewards. Each optimisation step is one forward over the K ranked
traces, the loss, backward, clip, AdamW step, zero_grad (the first step skips
the forward and backward for traces prepared while the clinician read:
prepared.py).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .bounds import Range, check_fields, knob
from ..model.cpu_linear import onednn_linear
from ..model.folded import folded_adapters
from ..model.frozen_prefix import replayed_frozen_prefix
from ..rollout.records import Trace
from ..rollout.logprobs import collate, completion_logps
from .prepared import PreparedGradients, policy_logps
from .losses import (
    DPO_LOSS_TYPES, GRPO_LOSS_TYPES, dpo_loss, grpo_loss, group_advantages, k3_kl, masked_mean, sequence_logps,
)
from ..model.models import LoadedModel, LoraSettings

ALGORITHMS = ("dpo", "grpo")


_knob = knob  # a config field documented once (bounds.knob)


@dataclass
class OptimConfig:
    """Optimiser settings shared by both algorithms."""

    lr: float | None = _knob(None, "AdamW learning rate; empty: 5e-6 for full fine-tuning, 1e-4 for LoRA.",
                             Range(1e-7, 1e-3), label="learning rate")
    steps: int = _knob(2, "Optimisation steps on one ranking.", Range(1, 20, integer=True))
    max_grad_norm: float = _knob(1.0, "Gradient clipping threshold (L2 over all trainable parameters).",
                                 Range(0.0, 100.0, open_low=True))
    weight_decay: float = _knob(0.0, "AdamW decoupled weight decay.", Range(0.0, 1.0))
    max_kl: float = _knob(3.0, "Guard-rail: an update that leaves the policy more than this many nats/token "
                               "from the reference (on the ranked traces) is rolled back.",
                          Range(0.0, 50.0, open_low=True), label="KL ceiling")
    # recompute each decoder layer in backward: ~1 GB less peak memory on SmolLM2
    # (4 x 120 tokens) for ~25% more update time; None: only when memory is short
    checkpoint_activations: bool | None = _knob(None, "Recompute decoder layers in backward (less memory, slower).")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DPOConfig(OptimConfig):
    """DPO on every (better, worse) pair of a ranking."""

    beta: float = _knob(0.1, "DPO: strength of the implicit KL constraint.", Range(0.01, 10.0))
    loss_type: str = _knob("sigmoid", "DPO loss variant: sigmoid | ipo | hinge | robust.")
    label_smoothing: float = _knob(0.0, "Assumed label-flip probability (sigmoid / robust).", Range(0.0, 0.49))

    algorithm = "dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"DPO loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")


@dataclass
class GRPOConfig(OptimConfig):
    """GRPO with rewards from rank (best 1.0 ... worst 0.0)."""

    beta: float = _knob(0.04, "GRPO: weight of the k3 KL penalty to the reference.", Range(0.0, 10.0))
    clip_eps: float = _knob(0.2, "Lower clip range of the importance ratio.", Range(0.0, 0.9, open_low=True))
    clip_eps_high: float | None = _knob(None, "Upper clip range; empty: clip_eps.", Range(0.0, 10.0, open_low=True))
    loss_type: str = _knob("grpo", "GRPO loss variant: grpo | bnpo | dr_grpo.")

    algorithm = "grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"GRPO loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")


def make_config(algorithm: str, **kwargs) -> DPOConfig | GRPOConfig:
    """The config class for an algorithm name; unknown keys are an error."""
    if algorithm == "dpo":
        return DPOConfig(**kwargs)
    if algorithm == "grpo":
        return GRPOConfig(**kwargs)
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def check_ranking(ranking: list[int], n_traces: int, ranked: int | None = None) -> None:
    """A ranking is a best-to-worst order of trace indices: no duplicates, no gaps.
    ``ranked``: only the first ``ranked`` positions are ordered; the rest are tied
    below them (rejected traces below the line). None: all are ordered."""
    if len(ranking) < 2:
        raise ValueError("a ranking needs at least two traces")
    if sorted(ranking) != list(range(n_traces)):
        raise ValueError(
            f"the ranking {ranking} must order every one of the {n_traces} traces exactly once"
        )
    if ranked is not None and not 1 <= ranked < len(ranking):
        raise ValueError(f"ranked must leave at least one trace above and one below the line, got {ranked} of {len(ranking)}")


def rank_tiers(n: int, ranked: int | None = None) -> list[int]:
    """Tier of each position: 0, 1, ... for the ordered positions, one shared tier
    for the positions tied below the line (n=5, ranked=2: [0, 1, 2, 2, 2])."""
    return [min(position, ranked) if ranked is not None else position for position in range(n)]


def ranking_pairs(ranking: list[int], ranked: int | None = None) -> tuple[list[int], list[int]]:
    """(chosen, rejected) trace indices for every pair where chosen is ranked higher
    (traces tied below the line are not paired with each other)."""
    tiers = rank_tiers(len(ranking), ranked)
    chosen, rejected = [], []
    for a, b in itertools.combinations(range(len(ranking)), 2):
        if tiers[a] < tiers[b]:
            chosen.append(ranking[a])
            rejected.append(ranking[b])
    return chosen, rejected


def rank_rewards(ranking: list[int], ranked: int | None = None) -> list[float]:
    """Reward per trace index, linear in tier: best 1.0, worst 0.0 (K=3: 1, 0.5, 0;
    traces tied below the line share the lowest reward)."""
    tiers = rank_tiers(len(ranking), ranked)
    top = max(tiers)
    rewards = [0.0] * len(ranking)
    for position, index in enumerate(ranking):
        rewards[index] = 1.0 - tiers[position] / top
    return rewards


LOW_MEMORY_GIB = 8.0  # below this much available memory, updates checkpoint activations by default


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def use_activation_checkpointing(config: OptimConfig, device: torch.device) -> bool:
    """The config's choice, else: on a CPU with under LOW_MEMORY_GIB available
    (time is the scarcer resource elsewhere; GPUs are left to the caller)."""
    if config.checkpoint_activations is not None:
        return config.checkpoint_activations
    if device.type != "cpu":
        return False
    available = available_memory_gib()
    return available is not None and available < LOW_MEMORY_GIB


# Learning rates when the config leaves it open: small enough that one ranking nudges the
# policy rather than wrecking it. LoRA's is 20x full fine-tuning's: its low-rank update moves
# the policy far less per step (after 8 DPO updates on SmolLM2 at 5e-5, KL 0.04 nats/token on
# the probe against 0.53 for full fine-tuning at 5e-6; see README "learning modes").
# An adapter on the top half of the layers (an option) moves the policy less per step than
# one on every layer (probe KL ~1/5 after 4 updates at 1e-4), so it takes twice the rate.
FULL_LR = 5e-6
LORA_LR = 1e-4  # adapters on every layer
TOP_LORA_LR = 2e-4  # adapters on the top layers only (LoraSettings.adapted_layers < 1)


def lora_lr(lora: LoraSettings) -> float:
    """The learning rate for an adapter of shape ``lora`` (``LORA_LR``, ``TOP_LORA_LR``)."""
    return LORA_LR if lora.adapted_layers >= 1.0 else TOP_LORA_LR


def default_lr(lm: LoadedModel) -> float:
    """The learning rate for ``lm`` when the config leaves it open (``FULL_LR``, ``lora_lr``)."""
    return FULL_LR if lm.lora is None else lora_lr(lm.lora)


def _finite(value) -> float | None:
    """A metric as a JSON-safe float: None where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _snapshot(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """Copies of the trainable weights and the optimiser state (restored by ``_restore``)."""
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state}
    return [p.detach().clone() for p in params], state


def _restore(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, saved) -> None:
    weights, state = saved
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    optimizer.state.clear()
    for p, s in state.items():
        optimizer.state[p] = s


def _padded(rows: list[list[float]], t: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), t), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out.to(device)


class PolicyTrainer:
    """Owns the optimiser and the policy version of one loaded model."""

    def __init__(self, lm: LoadedModel, version: int = 0):
        self.lm = lm
        self.version = version  # bumped once per update that changed the weights
        self.optimizer: torch.optim.AdamW | None = None
        self.forward_passes = 0  # model forwards run by updates (a regression counter)
        self.prepared = PreparedGradients()  # first-step gradients computed while the clinician reads

    def _new_optimizer(self) -> torch.optim.AdamW:
        # fused: one kernel over all parameters, without the parameter-sized
        # temporaries of the foreach path (matters for peak memory on CPU)
        fused = self.lm.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(self.lm.trainable_parameters, lr=1e-5, weight_decay=0.0, fused=fused)

    def _optimizer(self, config: OptimConfig) -> torch.optim.AdamW:
        if self.optimizer is None:
            self.optimizer = self._new_optimizer()
        lr = config.lr if config.lr is not None else default_lr(self.lm)
        for group in self.optimizer.param_groups:  # hyper-parameters are chosen per update
            group["lr"] = lr
            group["weight_decay"] = config.weight_decay
        return self.optimizer

    def restore_optimizer(self, state: dict) -> None:
        """Rebuild AdamW from a saved state dict (checkpoint resume)."""
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state)
        self.prepared.clear()

    def reset(self) -> None:
        """Forget optimiser state (after the policy was reset or replaced)."""
        self.optimizer = None
        self.version = 0
        self.prepared.clear()

    def prepare(self, trace: Trace, algorithm: str = "dpo", should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Compute what the first step of an ``algorithm`` update needs of ``trace`` under the
        current weights (prepared.py); False when that is not kept (full fine-tuning) or stopped."""
        return self.prepared.prepare(self.lm, trace, algorithm, should_stop)

    def update(
        self,
        traces: list[Trace],
        ranking: list[int],
        config: DPOConfig | GRPOConfig,
        on_step: Callable[[dict], None] | None = None,
        ranked: int | None = None,
    ) -> dict:
        """Run ``config.steps`` optimisation steps on one ranking of ``traces``.

        ``ranking`` lists indices into ``traces`` from best to worst; with
        ``ranked`` only its first ``ranked`` positions are ordered and the rest
        are tied below them. Returns metrics with TRL's names as plain floats;
        ``on_step`` receives each step's metrics as it finishes.
        """
        check_ranking(ranking, len(traces), ranked)
        prompts = {tuple(t.prompt_ids) for t in traces}
        if len(prompts) != 1:
            raise ValueError("all ranked traces must answer the same prompt")
        for i, tr in enumerate(traces):
            if not len(tr.old_logps) == len(tr.ref_logps) == len(tr.completion_ids):
                raise ValueError(f"trace {i} ({tr.trace_id}) has {len(tr.old_logps)} old and {len(tr.ref_logps)} reference "
                                 f"log-probs for {len(tr.completion_ids)} tokens: fill them first "
                                 "(rollout.teacher.fill_reference)")
            if not all(map(math.isfinite, itertools.chain(tr.old_logps, tr.ref_logps))):
                raise ValueError(f"trace {i} ({tr.trace_id}) has non-finite stored log-probs: it cannot be trained on")
        lm = self.lm
        started = time.perf_counter()
        batch = collate(
            traces[0].prompt_ids, [t.completion_ids for t in traces], lm.tokenizer.pad_token_id, lm.device,
            loss_masks=[t.loss_mask for t in traces],
        )
        t = batch.completion_ids.shape[1]
        mask = batch.completion_mask  # 0 at padding and at inserted scaffold tokens
        # stored log-probs cover every token; masked ones count nowhere (ratio 1, KL 0)
        ref_logps = _padded([tr.ref_logps for tr in traces], t, lm.device) * mask
        old_logps = _padded([tr.old_logps for tr in traces], t, lm.device) * mask
        optimizer = self._optimizer(config)
        params = lm.trainable_parameters
        saved = _snapshot(params, optimizer)  # for the KL guard-rail's rollback
        recompute = use_activation_checkpointing(config, lm.device)
        prepared = self.prepared.take(params, traces, config.algorithm)  # computed while the clinician read

        step_loss = OBJECTIVES[config.algorithm](config, ranking, ranked, old_logps, ref_logps, mask)
        lm.model.train(True)
        step_metrics: list[dict] = []
        applied = 0
        # the layers under LoRA's lowest adapter run once for the steps and the KL pass (frozen_prefix.py)
        with replayed_frozen_prefix(lm.model):
            # forward and backward (and the recomputation of checkpointed layers in it)
            # run their float32 CPU matmuls through oneDNN where it beats MKL here (cpu_linear.py)
            with onednn_linear(lm.model, enabled=lm.device.type == "cpu"):
                try:
                    for step in range(config.steps):
                        logps, add_prepared = self._policy_logps(batch, recompute, prepared if step == 0 else [])
                        loss, metrics = step_loss(logps)
                        skipped = not bool(torch.isfinite(loss))
                        grad_norm = float("nan")
                        if not skipped:
                            loss.backward()
                            add_prepared()
                            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                            skipped = not math.isfinite(grad_norm)
                            if not skipped:
                                optimizer.step()
                                applied += 1
                        optimizer.zero_grad(set_to_none=True)
                        record = {k: _finite(v) for k, v in metrics.items()}
                        record.update(loss=_finite(loss.detach()), grad_norm=_finite(grad_norm), step=step, skipped=skipped)
                        step_metrics.append(record)
                        if on_step is not None:
                            on_step(dict(record))
                finally:
                    lm.model.train(False)

            kl, after = self._kl(batch, ref_logps, mask)
            rolled_back = None
            if applied and not kl <= config.max_kl:  # "not <=": a NaN KL is rolled back too
                _restore(params, optimizer, saved)
                rolled_back, applied = kl, 0
                kl, after = self._kl(batch, ref_logps, mask)
        if applied:
            self.version += 1
        result = dict(step_metrics[-1])
        result.pop("step")
        result.update(
            algorithm=config.algorithm,
            kl=_finite(kl),
            steps=config.steps,
            checkpointed=recompute,
            skipped_steps=config.steps - applied,
            skipped=applied == 0,
            version=self.version,
            seconds=time.perf_counter() - started,
            prepared_traces=sum(entry is not None for entry in prepared),
            # what the ranking did to each trace (input order): log of how many times more
            # likely the policy now makes it than the policy that sampled it
            trace_logratio=[_finite(x) for x in ((after - old_logps) * mask).sum(-1).tolist()],
        )
        if rolled_back is not None:
            result.update(rolled_back=True, rejected_kl=_finite(rolled_back),
                          skip_reason=f"rolled back: KL {rolled_back:.3g} nats/token exceeds the ceiling {config.max_kl:g}")
        elif applied == 0:
            result["skip_reason"] = "no step applied: every step had a non-finite loss or gradient"
        return result

    def _policy_logps(self, batch, recompute: bool, prepared: list) -> tuple[torch.Tensor, Callable[[], None]]:
        """Per-token log-probs under the policy with grad, and what to call after backward
        (rows with a ``prepared`` entry come from it: prepared.policy_logps)."""
        def forward(rows) -> torch.Tensor:
            self.forward_passes += 1
            return completion_logps(self.lm.model, rows, checkpoint_layers=recompute)

        return policy_logps(batch, prepared, forward, self.lm.trainable_parameters)

    def _kl(self, batch, ref_logps: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
        """KL from the reference now, over the ranked traces (k3, nats/token), and the
        traces' per-token log-probs [K, T] under the policy now. LoRA adapters run folded
        into their base weights (no gradient here: one matmul per layer instead of three)."""
        with torch.no_grad(), folded_adapters(self.lm.model):
            after = completion_logps(self.lm.model, batch)
        self.forward_passes += 1
        return float(masked_mean(k3_kl(after, ref_logps), mask)), after


# The objectives: each turns one ranking into the loss of one optimisation step
# (alpaca_farm's ``compute_loss`` hook, as plain functions): called once per update
# with the ranking and the stored log-probs, it returns ``step_loss(logps) -> (loss, metrics)``.

StepLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def dpo_objective(config: DPOConfig, ranking: list[int], ranked: int | None, old_logps: torch.Tensor,
                  ref_logps: torch.Tensor, mask: torch.Tensor) -> StepLoss:
    """DPO on every ranked pair (``ranking_pairs``); one forward over the K traces serves them all."""
    chosen, rejected = (torch.tensor(ix, device=mask.device) for ix in ranking_pairs(ranking, ranked))
    average = config.loss_type == "ipo"  # IPO works on per-token averaged log-probs
    ref_seq = sequence_logps(ref_logps, mask, average)

    def step_loss(logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        seq = sequence_logps(logps, mask, average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            seq[chosen], seq[rejected], ref_seq[chosen], ref_seq[rejected],
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        )
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": seq[chosen].detach().mean(),
            "logps/rejected": seq[rejected].detach().mean(),
        }
        return losses.mean(), metrics

    return step_loss


def grpo_objective(config: GRPOConfig, ranking: list[int], ranked: int | None, old_logps: torch.Tensor,
                   ref_logps: torch.Tensor, mask: torch.Tensor) -> StepLoss:
    """GRPO with linear rank rewards (``rank_rewards``), normalised within the group."""
    rewards = torch.tensor(rank_rewards(ranking, ranked), device=mask.device)
    advantages = group_advantages(rewards)

    def step_loss(logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=config.clip_eps,
                                  clip_eps_high=config.clip_eps_high, beta=config.beta, loss_type=config.loss_type)
        return loss, {"clip_ratio": metrics["clip_ratio"], "reward": rewards.mean(), "reward_std": rewards.std()}

    return step_loss


OBJECTIVES: dict[str, Callable[..., StepLoss]] = {"dpo": dpo_objective, "grpo": grpo_objective}
