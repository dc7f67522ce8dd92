"""The first step of a DPO update from gradients prepared while the clinician reads
(training/prepared.py): the same step as the plain one, without its forward."""
import pytest
import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_traces
import threading

from rlhf_core.training.prepared import PreparedTrace, add_prepared_gradients, prepare_in_turns
from rlhf_core.training.update import DPOConfig, GRPOConfig, PolicyTrainer


@pytest.fixture
def traces(tiny_lora_lm, case):
    return sample_traces(tiny_lora_lm, case, SamplingConfig(k=4, max_new_tokens=16, seed=3, temperature=1.5))


def _weights(lm):
    return [p.detach().clone() for p in lm.trainable_parameters]


def _restore(lm, saved):
    with torch.no_grad():
        for p, w in zip(lm.trainable_parameters, saved):
            p.copy_(w)


class SGDTrainer(PolicyTrainer):
    """Plain SGD, whose step is linear in the gradient: Adam's first step is ~lr * sign(g),
    which turns float32 rounding on a near-zero gradient entry into a whole step."""

    def _new_optimizer(self):
        return torch.optim.SGD(self.lm.trainable_parameters, lr=1e-5)


def _run(lm, traces, config, prepare=(), ranked=None):
    """An update with the traces at ``prepare`` prepared first: weights after it, metrics, forwards run."""
    trainer = SGDTrainer(lm)
    for i in prepare:
        assert trainer.prepare(traces[i])
    passes = trainer.forward_passes
    metrics = trainer.update(traces, [2, 0, 3, 1], config, ranked=ranked)
    return _weights(lm), metrics, trainer.forward_passes - passes


@pytest.mark.parametrize("settings, ranked", [
    ({"steps": 1}, None),
    ({"steps": 2}, 2),  # two ranked, two tied below the line
    ({"steps": 1, "loss_type": "ipo"}, None),  # per-token means: still one weight per trace
])
@pytest.mark.parametrize("prepare", [(0, 1, 2, 3), (1, 3)])
def test_a_prepared_first_step_gives_the_plain_steps_weights(tiny_lora_lm, traces, settings, ranked, prepare):
    config = DPOConfig(lr=1e-1, **settings)
    start = _weights(tiny_lora_lm)
    plain, plain_metrics, plain_passes = _run(tiny_lora_lm, traces, config, ranked=ranked)
    _restore(tiny_lora_lm, start)
    fast, metrics, passes = _run(tiny_lora_lm, traces, config, prepare, ranked=ranked)
    moved = max(float((a - s).abs().max()) for a, s in zip(plain, start))
    differ = max(float((a - b).abs().max()) for a, b in zip(plain, fast))
    assert moved > 1e-5 and differ < 1e-4 * moved  # the same step, to float32 rounding
    assert metrics["prepared_traces"] == len(prepare) and plain_metrics["prepared_traces"] == 0
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4) if config.steps == 1 else True
    assert metrics["kl"] == pytest.approx(plain_metrics["kl"], rel=1e-3, abs=1e-7)
    # every trace prepared: the first step runs no forward (steps + KL pass -> steps)
    assert plain_passes == config.steps + 1
    assert passes == (config.steps if len(prepare) == len(traces) else config.steps + 1)


def test_prepared_gradients_are_dropped_once_the_weights_change(tiny_lora_lm, traces):
    trainer = PolicyTrainer(tiny_lora_lm)
    for trace in traces:
        trainer.prepare(trace)
    trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-2))  # uses them, and moves the weights
    for trace in traces:
        trainer.prepare(trace)
    with torch.no_grad():
        tiny_lora_lm.trainable_parameters[0].add_(1.0)  # e.g. another session's update, a load
    assert trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-2))["prepared_traces"] == 0
    trainer.prepare(traces[0])
    trainer.prepare(traces[1])
    trainer.prepared.keep_only(traces[1:])  # a new batch: the last one's are forgotten
    assert len(trainer.prepared) == 1
    trainer.reset()
    assert len(trainer.prepared) == 0


def test_grpo_and_full_fine_tuning_take_the_plain_step(tiny_lora_lm, tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lora_lm)
    assert trainer.prepare(traces[0])
    assert trainer.update(traces, [0, 1, 2, 3], GRPOConfig(steps=1, lr=1e-2))["prepared_traces"] == 0
    assert len(trainer.prepared) == 0  # taken and forgotten
    assert not PolicyTrainer(tiny_lm).prepare(traces[0])  # a whole model's gradient per trace


def test_a_loss_that_weighs_tokens_unequally_is_refused():
    param = torch.nn.Parameter(torch.zeros(3))
    entry = PreparedTrace(torch.zeros(2), [torch.ones(3)])
    leaf = torch.zeros(1, 2, requires_grad=True)
    (leaf * torch.tensor([[1.0, 2.0]])).sum().backward()  # token 2 weighs twice token 1
    with pytest.raises(RuntimeError, match="unequally"):
        add_prepared_gradients([param], leaf, [entry], torch.ones(1, 2))
    leaf.grad = torch.tensor([[0.5, 0.5]])
    add_prepared_gradients([param], leaf, [entry], torch.ones(1, 2))
    assert param.grad.tolist() == [0.5, 0.5, 0.5]  # dL/ds = 0.5 times the prepared gradient


def test_preparing_in_turns_stops_when_asked_and_forgets_an_earlier_batch(tiny_lora_lm, tiny_lm, traces):
    trainer, lock = PolicyTrainer(tiny_lora_lm), threading.RLock()
    asked = iter([False, False, True])
    assert prepare_in_turns(trainer, lock, traces[:3], lambda: next(asked)) == 2  # a Submit after two
    assert prepare_in_turns(trainer, lock, traces[3:]) == 1 and len(trainer.prepared) == 1
    assert prepare_in_turns(PolicyTrainer(tiny_lm), lock, traces) == 0  # full fine-tuning keeps nothing
