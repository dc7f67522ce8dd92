"""Preference and policy-gradient losses as pure functions of tensors.

Nothing here knows about models, devices, the UI or logging: each function takes
tensors and returns tensors, so every formula can be checked by hand in a test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-prob of each whole completion: the masked sum of its per-token log-probs, or with
    ``average`` their masked mean (what TRL feeds IPO's loss, Eq. 17 of
    https://arxiv.org/pdf/2310.12036v2.pdf: its DPO trainer divides by the completion length
    when ``loss_type == "ipo"``).

    Args:
        logps: [N, T] per-token log-probs (any value at masked positions).
        mask: [N, T] 1 for tokens that count, 0 for padding and inserted scaffold tokens.
        average: divide by the number of counted tokens (at least 1).

    Returns:
        [N] one log-prob per completion.
    """
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss for a batch of (chosen, rejected) pairs.

    Args:
        policy_chosen_logps: [P] log-prob of each chosen completion under the policy.
        policy_rejected_logps: [P] same for the rejected completion.
        ref_chosen_logps: [P] log-prob of each chosen completion under the reference.
        ref_rejected_logps: [P] same for the rejected completion.
        beta: inverse temperature of the implicit reward (> 0).
        loss_type: "sigmoid" (DPO), "ipo" (callers pass per-token averaged
            log-probs), "hinge" (SLiC) or "robust" (cDPO with unbiased noise correction).
        label_smoothing: assumed probability eps that a preference label is flipped.

    Returns:
        losses: [P] loss per pair.
        chosen_rewards: [P] beta * (policy - reference) for chosen, detached.
        rejected_rewards: [P] same for rejected, detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (GRPO): (r - mean) / (std + eps) within each group.

    Args:
        rewards: [K] one group, or [G, K] G groups of K completions each.
        eps: added to the unbiased standard deviation to avoid division by zero.

    Returns:
        advantages with the shape of ``rewards``; a group whose rewards are all
        equal gets zeros (its deviations from the mean are exactly zero).
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [K] or [G, K], got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=-1, keepdim=True)
    # One sample has no spread; unbiased std would be NaN, and its advantage is 0 anyway.
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(r - p) - (r - p) - 1.

    Args:
        logps: [...] per-token log-probs of sampled tokens under the policy.
        ref_logps: [...] the same tokens under the reference.

    Returns:
        [...] non-negative per-token KL estimates.
    """
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty).

    Args:
        values: [...] any shape; mask: same shape, 0/1.
    """
    return (values * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of GRPO with a k3 KL penalty to the reference.

    Args:
        logps: [K, T] per-token log-probs under the current policy (with grad).
        old_logps: [K, T] the same tokens under the policy that sampled them.
        ref_logps: [K, T] the same tokens under the frozen reference.
        advantages: [K] one advantage per sequence.
        mask: [K, T] 1 for completion tokens, 0 for padding.
        clip_eps: lower clip range, ratio clipped below at 1 - clip_eps.
        clip_eps_high: upper clip range (DAPO's clip-higher); defaults to clip_eps.
        beta: weight of the KL penalty.
        loss_type: aggregation: "grpo" = mean over sequences of each sequence's
            masked token mean; "bnpo" = masked sum / mask sum; "dr_grpo" =
            masked sum / (K * T). Dr. GRPO (https://arxiv.org/pdf/2503.20783)
            divides by a constant so that no sequence's length weights its tokens;
            TRL takes ``max_completion_length`` for T, we take this batch's padded
            length (the longest of the K traces): each update sees one group, so
            the constant only rescales the step, and a fixed maximum would shrink
            short groups' steps for nothing.

    Returns:
        loss: scalar.
        metrics: detached scalars "kl" (mean k3 KL over masked tokens) and
            "clip_ratio" (fraction of masked tokens whose ratio was clipped
            in the direction that stops the gradient).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = k3_kl(logps, ref_logps)
    if beta != 0.0:
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])

    is_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    metrics = {
        "kl": masked_mean(kl.detach(), mask),
        "clip_ratio": masked_mean(is_clipped.to(mask.dtype), mask),
    }
    return loss, metrics


def plackett_luce_loss(scores: torch.Tensor, ranks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of K-way rankings under the Plackett-Luce model.

    P(order) = prod_k exp(s_(k)) / sum_{j >= k} exp(s_(j)) (Plackett 1975, Luce 1959;
    the listwise preference model of Appendix A.3 of https://arxiv.org/pdf/2305.18290,
    ListMLE of https://icml.cc/Conferences/2008/papers/167.pdf). For K = 2 it is the
    Bradley-Terry log-loss -log sigmoid(s_chosen - s_rejected).

    Ties share a rank and use Breslow's approximation: every member of a tied group
    is chosen from the same set, all items ranked at or below the group
    (https://doi.org/10.2307/2529620). The last group (nothing ranked below it)
    carries no preference and adds nothing, so a partial order ("these above,
    the rest tied below the line") is a ranking whose last rank is shared.

    Args:
        scores: [R, K] the reward of each item of R rankings.
        ranks: [R, K] integers, 0 = best; equal ranks tie; negative = not in the
            ranking (padding, for rankings with fewer than K items).
        weights: [R] optional weight per ranking (e.g. lower where annotators disagree).

    Returns:
        [R] loss per ranking (multiplied by its weight).
    """
    if scores.shape != ranks.shape or scores.dim() != 2:
        raise ValueError(f"scores and ranks must both be [R, K], got {tuple(scores.shape)} and {tuple(ranks.shape)}")
    valid = ranks >= 0
    # chooser[r, i, j]: item j is still available when item i is picked
    chooser = valid.unsqueeze(1) & valid.unsqueeze(2) & (ranks.unsqueeze(1) >= ranks.unsqueeze(2))
    chooser |= torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)  # finite rows (and grads) for padding
    masked = scores.unsqueeze(1).expand(-1, scores.shape[1], -1).masked_fill(~chooser, float("-inf"))
    lowest = ranks.masked_fill(~valid, -1).max(dim=1, keepdim=True).values
    informative = valid & (ranks < lowest)
    per_item = torch.logsumexp(masked, dim=2) - scores
    losses = torch.where(informative, per_item, torch.zeros_like(per_item)).sum(dim=1)
    return losses if weights is None else losses * weights
