import math

import pytest
import torch

from rlhf_core.model import cpu_linear
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.training.update import DPOConfig, GRPOConfig, PolicyTrainer, check_ranking, make_config, rank_rewards, ranking_pairs


@pytest.fixture
def traces(tiny_lm, case):
    return sample_traces(tiny_lm, case, SamplingConfig(k=4, max_new_tokens=16, seed=21, temperature=1.5))


def counted(trace):
    """A trace's log-prob summed over the tokens that count (not inserted scaffold)."""
    mask = trace.loss_mask or [1] * len(trace.old_logps)
    return sum(lp for lp, m in zip(trace.old_logps, mask) if m)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ranking_pairs_and_rewards():
    assert ranking_pairs([2, 0, 1]) == ([2, 2, 0], [0, 1, 1])
    assert len(ranking_pairs([3, 1, 0, 2])[0]) == 6  # C(4, 2)
    assert rank_rewards([2, 0, 1]) == [0.5, 0.0, 1.0]
    with pytest.raises(ValueError, match="exactly once"):
        check_ranking([0, 0, 1], 3)
    with pytest.raises(ValueError, match="exactly once"):
        check_ranking([0, 2], 3)


def test_traces_below_the_line_are_tied_under_every_ranked_one():
    # two ranked traces (2 best, then 0), then 1 and 3 tied below the line
    chosen, rejected = ranking_pairs([2, 0, 1, 3], ranked=2)
    assert sorted(zip(chosen, rejected)) == sorted([(2, 0), (2, 1), (2, 3), (0, 1), (0, 3)])  # never (1, 3)
    assert rank_rewards([2, 0, 1, 3], ranked=2) == [0.5, 0.0, 1.0, 0.0]
    assert rank_rewards([1, 0, 2], ranked=1) == [0.0, 1.0, 0.0]  # one correct trace above two negatives
    assert ranking_pairs([1, 0, 2], ranked=1) == ([1, 1], [0, 2])
    assert ranking_pairs([2, 0, 1], ranked=None) == ranking_pairs([2, 0, 1])
    for bad in (0, 3):
        with pytest.raises(ValueError, match="above and one below"):
            check_ranking([0, 1, 2], 3, ranked=bad)


def test_an_update_with_negatives_below_the_line_trains_on_their_pairs_only(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    m = trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-3), ranked=1)
    # one trace above three: three pairs, all with trace 0 chosen
    assert m["logps/chosen"] == pytest.approx(counted(traces[0]), abs=1e-3)
    assert m["logps/rejected"] == pytest.approx(sum(counted(t) for t in traces[1:]) / 3, abs=1e-3)
    g = trainer.update(traces, [0, 1, 2, 3], GRPOConfig(steps=1, lr=1e-3), ranked=1)
    assert g["reward"] == pytest.approx(0.25)  # rewards 1, 0, 0, 0


def test_first_dpo_step_has_loss_ln2_and_zero_rewards(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    steps = []
    trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-3), on_step=steps.append)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_repeated_dpo_updates_raise_margin_and_lower_loss(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    ref_before = [list(t.ref_logps) for t in traces]
    params_before = snapshot(tiny_lm.model)
    with tiny_lm.reference() as ref:
        reference_before = snapshot(ref)
    history = [trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=2, lr=1e-3)) for _ in range(4)]
    margins = [h["rewards/margins"] for h in history]
    losses = [h["loss"] for h in history]
    assert margins == sorted(margins) and margins[-1] > margins[0] + 0.05
    assert losses == sorted(losses, reverse=True) and losses[-1] < math.log(2) - 0.05
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["version"] == 4 and trainer.version == 4
    assert history[-1]["kl"] > history[0]["kl"] > 0
    # parameters changed, the reference did not, stored reference log-probs did not
    assert any(not torch.equal(params_before[n], p) for n, p in tiny_lm.model.named_parameters())
    with tiny_lm.reference() as ref:
        assert all(torch.equal(reference_before[n], p) for n, p in ref.named_parameters())
    assert [t.ref_logps for t in traces] == ref_before
    with torch.no_grad(), tiny_lm.reference() as ref:
        from rlhf_core.rollout.logprobs import collate, completion_logps

        batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
        again = completion_logps(ref, batch)
    assert torch.allclose(again[0, : len(traces[0].ref_logps)], torch.tensor(ref_before[0]), atol=1e-6)


def test_update_metrics_have_trl_names(tiny_lm, traces):
    dpo = PolicyTrainer(tiny_lm).update(traces, [3, 2, 1, 0], DPOConfig(steps=1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "kl", "grad_norm", "seconds", "version"):
        assert isinstance(dpo[key], (float, int)), key
    grpo = PolicyTrainer(tiny_lm).update(traces, [3, 2, 1, 0], GRPOConfig(steps=1))
    for key in ("loss", "reward", "reward_std", "clip_ratio", "kl", "grad_norm", "seconds", "version"):
        assert isinstance(grpo[key], (float, int)), key
    assert grpo["reward"] == pytest.approx(0.5)


def test_one_batched_pass_per_step_plus_one_for_kl_and_no_reference(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    rows = {"policy": [], "reference": 0}

    def policy_hook(module, args, kwargs):
        rows["policy"].append(tuple(kwargs["input_ids"].shape))

    # the passes run the decoder (the LM head is applied to its hidden states in chunks)
    h1 = tiny_lm.model.get_decoder().register_forward_pre_hook(policy_hook, with_kwargs=True)
    h2 = tiny_lm._reference.get_decoder().register_forward_pre_hook(lambda *a: rows.__setitem__("reference", rows["reference"] + 1))
    try:
        trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=3))
    finally:
        h1.remove()
        h2.remove()
    k, p = len(traces), len(traces[0].prompt_ids)
    t = max(len(tr.completion_ids) for tr in traces)
    # per pass: the shared prompt once (1 row), then the K completions in one batch;
    # never 2 * C(K, 2) sequences, and the reference model is never run
    assert rows["policy"] == [(1, p), (k, t - 1)] * (3 + 1)
    assert rows["reference"] == 0
    assert trainer.forward_passes == 4


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")
def test_update_runs_every_linear_layer_through_onednn_and_restores_them(tiny_lm, traces, monkeypatch):
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "onednn")  # every layer, whichever is faster here
    calls = []
    real = cpu_linear._linear_pointwise
    monkeypatch.setattr(cpu_linear, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or real(*a))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_lm.model.modules())
    PolicyTrainer(tiny_lm).update(traces, [0, 1, 2, 3], DPOConfig(steps=1))
    # one step (forward of every layer for the prompt and the completions, and backward)
    # plus the KL pass: oneDNN ran at least once per linear layer per pass
    assert len(calls) >= 3 * n_linear
    assert all("forward" not in vars(m) for m in tiny_lm.model.modules())


def test_grpo_updates_move_probability_toward_higher_ranked(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    ranking = [2, 0, 3, 1]
    best, worst = ranking[0], ranking[-1]
    before = sum(traces[best].old_logps) - sum(traces[worst].old_logps)
    for _ in range(4):
        m = trainer.update(traces, ranking, GRPOConfig(steps=2, lr=1e-3, beta=0.0, clip_eps=0.9, clip_eps_high=100.0))
    from rlhf_core.rollout.logprobs import collate, completion_logps

    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        now = completion_logps(tiny_lm.model, batch).sum(-1)
    assert (now[best] - now[worst]).item() > before + 0.1
    assert m["version"] == 4


def test_all_equal_grpo_group_gives_zero_advantages_and_no_gradient(tiny_lm, traces):
    from rlhf_core.rollout.logprobs import collate, completion_logps
    from rlhf_core.training.losses import group_advantages, grpo_loss

    advantages = group_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert torch.equal(advantages, torch.zeros(4))
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    logps = completion_logps(tiny_lm.model, batch)
    loss, _ = grpo_loss(logps, logps.detach(), logps.detach(), advantages, batch.completion_mask, beta=0.0)
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in tiny_lm.model.parameters())


def test_non_finite_loss_skips_step_and_leaves_weights(tiny_lm, traces, monkeypatch):
    import json

    import rlhf_core.training.update as update_mod

    real = update_mod.completion_logps

    def poisoned(model, batch, **kw):  # a forward that overflows while training
        out = real(model, batch, **kw)
        return out * float("nan") if model.training else out

    monkeypatch.setattr(update_mod, "completion_logps", poisoned)
    before = snapshot(tiny_lm.model)
    trainer = PolicyTrainer(tiny_lm)
    m = trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=2, lr=1e-2))
    assert m["skipped"] is True and m["skipped_steps"] == 2 and m["version"] == 0
    assert m["skip_reason"].startswith("no step applied") and m["loss"] is None and m["grad_norm"] is None
    json.dumps(m, allow_nan=False)  # the metrics are JSON: no bare NaN reaches a client
    assert all(torch.equal(before[n], p) for n, p in tiny_lm.model.named_parameters())


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_stored_log_probs_are_bad_input(tiny_lm, traces, algorithm, bad):
    traces[1].old_logps = [*traces[1].old_logps[:-1], bad]
    before = snapshot(tiny_lm.model)
    with pytest.raises(ValueError, match="trace 1 .*non-finite stored log-probs"):
        PolicyTrainer(tiny_lm).update(traces, [0, 1, 2, 3], make_config(algorithm, steps=1, lr=1e-2))
    assert all(torch.equal(before[n], p) for n, p in tiny_lm.model.named_parameters())


def test_an_update_past_the_kl_ceiling_is_rolled_back(tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lm)
    first = trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-3))
    assert not first["skipped"] and first["version"] == 1
    weights = snapshot(tiny_lm.model)
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in trainer.optimizer.state.items()}
    m = trainer.update(traces, [3, 2, 1, 0], DPOConfig(steps=3, lr=5e-2, max_kl=first["kl"] * 1.01 + 1e-6))
    assert m["rolled_back"] is True and m["skipped"] is True and m["version"] == 1
    assert m["rejected_kl"] > m["kl"] and m["skip_reason"].startswith("rolled back: KL")
    assert m["kl"] == pytest.approx(first["kl"], rel=1e-4, abs=1e-7)
    assert all(torch.equal(weights[n], p) for n, p in tiny_lm.model.named_parameters())
    for p, st in trainer.optimizer.state.items():  # AdamW's moments are the ones before the update
        assert all(torch.equal(moments[id(p)][k], v) for k, v in st.items())


def test_lora_update_trains_only_the_adapter_and_reference_is_the_base(tiny_lora_lm, case):
    lm = tiny_lora_lm
    traces = sample_traces(lm, case, SamplingConfig(k=3, max_new_tokens=12, seed=2, temperature=1.5))
    base_before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}
    trainer = PolicyTrainer(lm)
    for _ in range(3):
        m = trainer.update(traces, [0, 1, 2], DPOConfig(steps=2, lr=5e-3))
    assert m["kl"] > 0 and m["rewards/margins"] > 0
    assert all(torch.equal(base_before[n], p) for n, p in lm.model.named_parameters() if "lora_" not in n)
    assert lm._reference is None  # no second copy of the weights
    from rlhf_core.rollout.logprobs import collate, completion_logps

    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], lm.tokenizer.pad_token_id, "cpu")
    with lm.reference() as ref:
        ref_now = completion_logps(ref, batch)
    assert torch.allclose(ref_now[0, : len(traces[0].ref_logps)], torch.tensor(traces[0].ref_logps), atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="algorithm"):
        make_config("ppo")
    with pytest.raises(ValueError, match="learning rate"):
        DPOConfig(lr=-1.0)


@pytest.mark.parametrize("lora", [False, True, "top half"])
def test_layer_checkpointing_recomputes_each_layer_and_changes_no_number(lora, case):
    """Checkpointed and plain updates must give bit-identical losses and weights;
    the checkpointed one must really run every trained decoder layer again in backward
    (an adapter on the top half leaves the bottom half frozen: run once per update, never recomputed)."""
    from rlhf_core.model.frozen_prefix import frozen_prefix
    from rlhf_core.model.models import LoraSettings, load_model

    top_half = lora == "top half"
    if top_half:
        lora = LoraSettings(adapted_layers=0.5)

    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator
        lm = load_model("tiny-random", device="cpu", lora=lora)
        traces = sample_traces(lm, case, SamplingConfig(k=4, max_new_tokens=16, seed=21, temperature=1.5))
        layer_calls = []
        decoder = lm.model.get_decoder() if not lora else lm.model.get_base_model().get_decoder()
        hooks = [layer.mlp.register_forward_pre_hook(lambda *a: layer_calls.append(1)) for layer in decoder.layers]
        steps = []
        try:
            PolicyTrainer(lm).update(
                traces, [0, 1, 2, 3], DPOConfig(steps=2, lr=1e-3, checkpoint_activations=checkpointed), on_step=steps.append
            )
        finally:
            for h in hooks:
                h.remove()
        trained = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
        results[checkpointed] = (steps, trained, len(layer_calls))
    (plain_steps, plain_weights, plain_calls), (ck_steps, ck_weights, ck_calls) = results[False], results[True]
    assert [s["loss"] for s in ck_steps] == [s["loss"] for s in plain_steps]
    assert [s["grad_norm"] for s in ck_steps] == [s["grad_norm"] for s in plain_steps]
    assert all(torch.equal(ck_weights[n], w) for n, w in plain_weights.items())
    frozen = len(frozen_prefix(lm.model))
    trained_layers = len(decoder.layers) - frozen
    assert frozen == (1 if top_half else 0)  # tiny-random has 2 layers
    # plain: 2 steps + the KL pass, each a prompt pass and a completion pass through every
    # trained layer; the frozen ones run one prompt pass and one completion pass in all
    assert plain_calls == 3 * 2 * trained_layers + 2 * frozen
    # checkpointed: the 2 training passes run every trained layer once more in backward
    assert ck_calls == plain_calls + 2 * 2 * trained_layers


def test_activation_checkpointing_defaults_to_on_only_when_cpu_memory_is_short(monkeypatch, tiny_lm, traces):
    import rlhf_core.training.update as update

    cpu = torch.device("cpu")
    assert update.use_activation_checkpointing(DPOConfig(checkpoint_activations=True), cpu)
    assert not update.use_activation_checkpointing(DPOConfig(checkpoint_activations=False), cpu)
    monkeypatch.setattr(update, "available_memory_gib", lambda: 3.5)
    assert update.use_activation_checkpointing(DPOConfig(), cpu)
    assert not update.use_activation_checkpointing(DPOConfig(), torch.device("cuda"))
    assert PolicyTrainer(tiny_lm).update(traces, [0, 1, 2, 3], DPOConfig(steps=1))["checkpointed"] is True
    monkeypatch.setattr(update, "available_memory_gib", lambda: 64.0)
    assert not update.use_activation_checkpointing(DPOConfig(), cpu)
    assert PolicyTrainer(tiny_lm).update(traces, [0, 1, 2, 3], DPOConfig(steps=1))["checkpointed"] is False
    monkeypatch.setattr(update, "available_memory_gib", lambda: None)  # unknown: do not slow updates down
    assert not update.use_activation_checkpointing(DPOConfig(), cpu)
