"""The frozen layers under LoRA's lowest adapter, run once per update (model/frozen_prefix.py)."""
import pytest
import torch

from rlhf_core.model.frozen_prefix import frozen_prefix, replayed_frozen_prefix
from rlhf_core.model.models import LoraSettings, load_model
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.training.update import DPOConfig, PolicyTrainer


def _top_layer_lora(seed: int = 3):
    """tiny-random (2 decoder layers) with a non-zero adapter on its top layer only."""
    lm = load_model("tiny-random", device="cpu", lora=LoraSettings(adapted_layers=0.5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lm


def _counting(layer):
    """The list that grows by one each time ``layer`` really computes (its MLP runs)."""
    calls = []
    layer.mlp.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _batch(lm):
    return collate([5, 17, 99, 3], [[250, 41, 7], [8, 9], [60, 61, 62]], lm.tokenizer.pad_token_id, lm.device)


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_replayed_layers_give_the_same_log_probs_and_gradients_and_run_once(checkpoint_layers):
    lm = _top_layer_lora()
    [bottom] = frozen_prefix(lm.model)
    batch = _batch(lm)

    def logps_and_grads():
        lm.model.zero_grad(set_to_none=True)
        logps = completion_logps(lm.model, batch, checkpoint_layers=checkpoint_layers)
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.requires_grad}

    calls = _counting(bottom)
    plain = logps_and_grads()
    with replayed_frozen_prefix(lm.model) as replayed:
        assert replayed == 1
        first, second = logps_and_grads(), logps_and_grads()
        with torch.no_grad():
            third = completion_logps(lm.model, batch)
    assert len(calls) == 2 + 2  # plain; then the prompt pass and the completion pass once: not three times each
    for logps, grads in (first, second):
        assert torch.equal(logps, plain[0])
        assert grads.keys() == plain[1].keys() and all(torch.allclose(grads[n], plain[1][n], atol=1e-7) for n in grads)
    assert torch.allclose(third, plain[0], atol=1e-6)
    assert all("forward" not in vars(m) for m in lm.model.modules())  # the layers are the model's own again


def test_nothing_is_frozen_with_adapters_on_every_layer_or_full_fine_tuning(tiny_lm):
    every_layer = load_model("tiny-random", device="cpu", lora=LoraSettings(adapted_layers=1.0))
    for lm in (every_layer, tiny_lm):
        assert frozen_prefix(lm.model) == []
        with replayed_frozen_prefix(lm.model) as replayed:
            assert replayed == 0


def test_an_update_runs_the_frozen_layers_once_for_its_steps_and_kl_pass(case):
    lm = _top_layer_lora()
    traces = sample_traces(lm, case, SamplingConfig(k=4, max_new_tokens=12, seed=5, temperature=1.5))
    for t in traces:
        t.ref_logps = list(t.old_logps)  # sampled from the initial policy... of a non-zero adapter: its own reference
    [bottom] = frozen_prefix(lm.model)
    calls = _counting(bottom)
    metrics = PolicyTrainer(lm).update(traces, [0, 1, 2, 3], DPOConfig(steps=2, lr=1e-3))
    assert not metrics["skipped"] and metrics["version"] == 1
    assert len(calls) == 2  # two steps and the KL pass: one prompt pass and one completion pass
