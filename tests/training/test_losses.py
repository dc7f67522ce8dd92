import math

import pytest
import torch

from rlhf_core.training.losses import dpo_loss, group_advantages, grpo_loss, k3_kl, plackett_luce_loss, sequence_logps


def logsig(x):
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = -10.0, -14.0, -11.0, -12.0  # delta = (pc - rc) - (pr - rr) = 1 - (-2) = 3
DELTA = 3.0


def _dpo(loss_type, beta=0.1, eps=0.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize(
    "loss_type,beta,eps,expected",
    [
        ("sigmoid", 0.1, 0.0, -logsig(0.1 * DELTA)),
        ("sigmoid", 0.5, 0.2, -0.8 * logsig(0.5 * DELTA) - 0.2 * logsig(-0.5 * DELTA)),
        ("ipo", 0.1, 0.0, (DELTA - 1 / 0.2) ** 2),
        ("hinge", 0.1, 0.0, max(0.0, 1 - 0.1 * DELTA)),
        ("hinge", 0.5, 0.0, 0.0),
        ("robust", 0.1, 0.1, (-0.9 * logsig(0.3) + 0.1 * logsig(-0.3)) / 0.8),
    ],
)
def test_dpo_loss_matches_hand_computed_values(loss_type, beta, eps, expected):
    losses, chosen, rejected = _dpo(loss_type, beta, eps)
    assert losses.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert chosen.item() == pytest.approx(beta * (PC - RC))
    assert rejected.item() == pytest.approx(beta * (PR - RR))


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -50.0, -7.5])
    other = torch.tensor([-4.0, -20.0, -1.0])
    losses, chosen, rejected = dpo_loss(logps, other, logps, other)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_dpo_rewards_are_detached_and_loss_has_grad():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, chosen, _ = dpo_loss(pc, torch.tensor([-3.0, -3.0]), torch.tensor([-1.5, -2.5]), torch.tensor([-3.0, -3.0]))
    assert losses.requires_grad and not chosen.requires_grad
    losses.sum().backward()
    assert torch.all(pc.grad < 0)  # raising the chosen log-prob lowers the loss


def test_dpo_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        _dpo("nope")


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([[1.0, 0.5, 0.0], [2.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    # group 1: mean 0.5, unbiased std 0.5
    assert torch.allclose(adv[0], torch.tensor([0.5, 0.0, -0.5]) / (0.5 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7])), torch.zeros(4))


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert torch.equal(k3_kl(a, a), torch.zeros(2))
    assert torch.all(k3_kl(a, a - 0.5) > 0)


def test_grpo_loss_hand_computed():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.0, -2.5, 0.0], [-1.2, -1.0, -1.0]])
    ref = torch.tensor([[-1.1, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    beta, eps = 0.04, 0.2

    def token(lp, o, r, a):
        ratio = math.exp(lp - o)
        clipped = min(max(ratio, 1 - eps), 1 + eps)
        pg = -min(ratio * a, clipped * a)
        kl = math.exp(r - lp) - (r - lp) - 1
        return pg + beta * kl, kl

    per = [[token(logps[i, j].item(), old[i, j].item(), ref[i, j].item(), adv[i].item()) for j in range(3)] for i in range(2)]
    m = mask.tolist()
    seq_means = [sum(per[i][j][0] * m[i][j] for j in range(3)) / sum(m[i]) for i in range(2)]
    total = sum(per[i][j][0] * m[i][j] for i in range(2) for j in range(3))
    kl_mean = sum(per[i][j][1] * m[i][j] for i in range(2) for j in range(3)) / 5

    loss, metrics = grpo_loss(logps, old, ref, adv, mask, beta=beta, loss_type="grpo")
    assert loss.item() == pytest.approx(sum(seq_means) / 2, rel=1e-5)
    assert grpo_loss(logps, old, ref, adv, mask, beta=beta, loss_type="bnpo")[0].item() == pytest.approx(total / 5, rel=1e-5)
    assert grpo_loss(logps, old, ref, adv, mask, beta=beta, loss_type="dr_grpo")[0].item() == pytest.approx(total / 6, rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl_mean, rel=1e-5)
    # token (0,1): ratio e^0.5 = 1.65 > 1.2 with A > 0 -> clipped; (1,0): ratio e^0.2 = 1.22 with A < 0 -> not clipped
    assert metrics["clip_ratio"].item() == pytest.approx(1 / 5)


def test_grpo_clip_high_widens_upper_range():
    logps = torch.tensor([[0.0]])
    old = torch.tensor([[-0.25]])  # ratio 1.284
    mask = torch.ones(1, 1)
    adv = torch.tensor([1.0])
    _, clipped = grpo_loss(logps, old, logps, adv, mask, clip_eps=0.2)
    _, wide = grpo_loss(logps, old, logps, adv, mask, clip_eps=0.2, clip_eps_high=0.3)
    assert clipped["clip_ratio"].item() == 1.0 and wide["clip_ratio"].item() == 0.0


def test_grpo_zero_advantage_and_equal_policies_give_zero_loss():
    logps = torch.randn(3, 5)
    loss, metrics = grpo_loss(logps, logps, logps, torch.zeros(3), torch.ones(3, 5))
    assert loss.item() == 0.0 and metrics["kl"].item() == 0.0


# ------------------------------------------------------------------ Plackett-Luce

def _pl(scores, ranks, weights=None):
    return plackett_luce_loss(torch.tensor(scores, dtype=torch.float64), torch.tensor(ranks),
                              None if weights is None else torch.tensor(weights, dtype=torch.float64))


def test_plackett_luce_of_two_items_is_the_bradley_terry_log_loss():
    got = _pl([[1.5, -0.5], [0.2, 0.9]], [[0, 1], [0, 1]])
    assert got.tolist() == pytest.approx([-logsig(2.0), -logsig(-0.7)])


def test_plackett_luce_of_three_items_by_hand():
    # order b > c > a with scores a=0, b=2, c=1: -log [e^2/(1+e^2+e) * e/(1+e)]
    want = -(2 - math.log(1 + math.e**2 + math.e)) - (1 - math.log(1 + math.e))
    assert _pl([[0.0, 2.0, 1.0]], [[2, 0, 1]]).item() == pytest.approx(want)


def test_plackett_luce_sees_only_the_order_not_the_item_positions():
    g = torch.Generator().manual_seed(0)
    scores, ranks = torch.randn(5, 6, generator=g), torch.stack([torch.randperm(6, generator=g) for _ in range(5)])
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(plackett_luce_loss(scores, ranks), plackett_luce_loss(scores[:, perm], ranks[:, perm]))
    # the best order (by score) is the likeliest one of all 720
    best = scores.argsort(dim=1, descending=True).argsort(dim=1)
    assert (plackett_luce_loss(scores, best) <= plackett_luce_loss(scores, ranks) + 1e-6).all()


def test_ties_share_the_choice_set_and_a_tied_last_group_adds_nothing():
    # a > {b, c} tied below the line: only a's choice counts
    assert _pl([[1.0, 0.0, 3.0]], [[0, 1, 1]]).item() == pytest.approx(-(1.0 - math.log(math.e + 1 + math.e**3)))
    # {a, b} tied on top of c (Breslow): both picked from {a, b, c}
    lse = math.log(math.e**1 + math.e**0.5 + 1)
    assert _pl([[1.0, 0.5, 0.0]], [[0, 0, 1]]).item() == pytest.approx((lse - 1.0) + (lse - 0.5))
    assert _pl([[1.0, 2.0]], [[0, 0]]).item() == 0.0  # a full tie says nothing


def test_padding_is_ignored_weights_scale_and_gradients_stay_finite():
    padded = torch.tensor([[1.5, -0.5, 7.0]], requires_grad=True)
    loss = plackett_luce_loss(padded, torch.tensor([[0, 1, -1]]))
    assert loss.item() == pytest.approx(-logsig(2.0))
    loss.sum().backward()
    assert torch.isfinite(padded.grad).all() and padded.grad[0, 2] == 0
    assert _pl([[1.5, -0.5]], [[0, 1]], [0.25]).item() == pytest.approx(-0.25 * logsig(2.0))
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        plackett_luce_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_sequence_logps_sums_or_averages_only_the_counted_tokens():
    logps = torch.tensor([[-1.0, -2.0, -30.0], [-0.5, -99.0, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # padding; an inserted scaffold token
    assert torch.allclose(sequence_logps(logps, mask), torch.tensor([-3.0, -2.0]))
    assert torch.allclose(sequence_logps(logps, mask, average=True), torch.tensor([-1.5, -1.0]))
    assert torch.equal(sequence_logps(logps, torch.zeros_like(mask), average=True), torch.zeros(2))
