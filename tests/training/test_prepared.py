"""The first step of a DPO update from gradients prepared while the clinician reads
(training/prepared.py): the same step as the plain one, without its forward."""
import pytest
import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_traces
import threading

from rlhf_core.training.prepared import PreparedTrace, add_prepared_gradients, prepare_in_turns
from rlhf_core.training.update import DPOConfig, GRPOConfig, PolicyTrainer, make_config


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


def _run(lm, traces, config, prepare=(), ranked=None, prepared_for=None):
    """An update with the traces at ``prepare`` prepared first: weights after it, metrics, forwards run."""
    trainer = SGDTrainer(lm)
    for i in prepare:
        assert trainer.prepare(traces[i], prepared_for or config.algorithm)
    passes = trainer.forward_passes
    metrics = trainer.update(traces, [2, 0, 3, 1], config, ranked=ranked)
    return _weights(lm), metrics, trainer.forward_passes - passes


def _same_step(lm, traces, config, prepare, ranked=None, prepared_for=None):
    """The update with ``prepare``d traces against the plain one from the same weights;
    returns (prepared run's metrics and forwards, plain run's)."""
    start = _weights(lm)
    plain, plain_metrics, plain_passes = _run(lm, traces, config, ranked=ranked)
    _restore(lm, start)
    fast, metrics, passes = _run(lm, traces, config, prepare, ranked=ranked, prepared_for=prepared_for)
    moved = max(float((a - s).abs().max()) for a, s in zip(plain, start))
    differ = max(float((a - b).abs().max()) for a, b in zip(plain, fast))
    assert moved > 1e-5 and differ < 1e-4 * moved  # the same step, to float32 rounding
    return (metrics, passes), (plain_metrics, plain_passes)


@pytest.mark.parametrize("settings, ranked", [
    ({"steps": 1}, None),
    ({"steps": 2}, 2),  # two ranked, two tied below the line
    ({"steps": 1, "loss_type": "ipo"}, None),  # per-token means: still one weight per trace
    ({"algorithm": "grpo", "steps": 1}, None),  # a ratio and a KL basis per trace
    ({"algorithm": "grpo", "steps": 2, "loss_type": "dr_grpo", "beta": 0.3}, 2),
])
@pytest.mark.parametrize("prepare", [(0, 1, 2, 3), (1, 3)])
def test_a_prepared_first_step_gives_the_plain_steps_weights(tiny_lora_lm, traces, settings, ranked, prepare):
    settings = dict(settings)  # parametrized values are shared between runs
    config = make_config(settings.pop("algorithm", "dpo"), lr=1e-1, **settings)
    (metrics, passes), (plain_metrics, plain_passes) = _same_step(tiny_lora_lm, traces, config, prepare, ranked)
    assert metrics["prepared_traces"] == len(prepare) and plain_metrics["prepared_traces"] == 0
    if config.steps == 1:
        assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4, abs=1e-7)
    assert metrics["kl"] == pytest.approx(plain_metrics["kl"], rel=1e-3, abs=1e-7)
    # every trace prepared: the first step runs no forward (steps + KL pass -> steps)
    assert plain_passes == config.steps + 1
    assert passes == (config.steps if len(prepare) == len(traces) else config.steps + 1)


def test_a_row_its_bases_do_not_fit_runs_through_the_model(tiny_lora_lm, traces):
    # the weights moved since the traces were sampled: GRPO clips some tokens at the first
    # step, which no ratio/KL combination describes; those rows take forward and backward
    with torch.no_grad():
        for p in tiny_lora_lm.trainable_parameters:
            p.add_(torch.randn_like(p) * 0.5)
    config = GRPOConfig(steps=1, lr=1e-1, clip_eps=0.01)
    (metrics, passes), _ = _same_step(tiny_lora_lm, traces, config, (0, 1, 2, 3))
    assert metrics["clip_ratio"] > 0 and passes == 2  # the KL pass and the unfit rows' forward


def test_prepared_for_one_algorithm_the_other_takes_the_plain_step(tiny_lora_lm, traces):
    (metrics, passes), _ = _same_step(tiny_lora_lm, traces, DPOConfig(steps=1, lr=1e-1), (0, 1, 2, 3),
                                      prepared_for="grpo")
    assert metrics["prepared_traces"] == 0 and passes == 2


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


def test_full_fine_tuning_prepares_nothing(tiny_lora_lm, tiny_lm, traces):
    trainer = PolicyTrainer(tiny_lora_lm)
    assert trainer.prepare(traces[0])
    trainer.update(traces, [0, 1, 2, 3], DPOConfig(steps=1, lr=1e-2))
    assert len(trainer.prepared) == 0  # taken and forgotten
    assert not PolicyTrainer(tiny_lm).prepare(traces[0])  # a whole model's gradient per trace


def test_bases_fit_a_gradient_in_their_span_and_nothing_else():
    param = torch.nn.Parameter(torch.zeros(3))
    entry = PreparedTrace("grpo", torch.zeros(2), torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
                          [[torch.ones(3)], [torch.tensor([0.0, 1.0, 2.0])]])
    leaf = torch.zeros(1, 3, requires_grad=True)
    leaf.grad = torch.tensor([[2.0, 5.0, 0.0]])  # 2 * basis 0 + 3 * basis 1
    assert add_prepared_gradients([param], leaf, [entry]) == []
    assert param.grad.tolist() == pytest.approx([2.0, 5.0, 8.0])  # 2 * ones + 3 * [0, 1, 2]
    leaf.grad = torch.tensor([[2.0, 5.0, 1.0]])  # a gradient past the trace's end: outside the span
    assert add_prepared_gradients([param], leaf, [entry]) == [0]
    dpo = PreparedTrace("dpo", torch.zeros(2), torch.ones(1, 2), [[torch.ones(3)]])
    leaf.grad = torch.tensor([[1.0, 2.0, 0.0]])  # token 2 weighs twice token 1: no sequence-level weight
    assert add_prepared_gradients([param], leaf, [dpo]) == [0]


def test_preparing_in_turns_stops_when_asked_and_forgets_an_earlier_batch(tiny_lora_lm, tiny_lm, traces):
    trainer, lock = PolicyTrainer(tiny_lora_lm), threading.RLock()
    assert prepare_in_turns(trainer, lock, traces[:3], lambda: len(trainer.prepared) >= 2) == 2  # a Submit after two
    assert prepare_in_turns(trainer, lock, traces[3:]) == 1 and len(trainer.prepared) == 1
    assert prepare_in_turns(PolicyTrainer(tiny_lm), lock, traces) == 0  # full fine-tuning keeps nothing
    passes = iter([False, True])  # asked to stop after the forward and first backward of a GRPO trace
    assert not trainer.prepare(traces[0], "grpo", lambda: next(passes))
    assert trainer.prepared.take(tiny_lora_lm.trainable_parameters, traces[:1], "grpo") == [None]
