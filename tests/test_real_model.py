"""One end-to-end check on the real default model (SmolLM2-135M-Instruct from
the bundled GGUF): it loads offline, samples, and a DPO update changes it."""
import math

import pytest
import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.model.models import DEFAULT_MODEL, availability, load_model
from rlhf_core.training.update import DPOConfig, PolicyTrainer


@pytest.fixture(scope="module")
def smollm():
    state, why = availability(DEFAULT_MODEL)
    assert state == "available", f"the bundled default model must load offline: {why}"
    return load_model(DEFAULT_MODEL, device="cpu")


def test_default_model_samples_english_and_trains(smollm, case):
    lm = smollm
    assert sum(p.numel() for p in lm.model.parameters()) > 100e6
    traces = sample_traces(lm, case, SamplingConfig(k=3, max_new_tokens=24, seed=0))
    assert len(traces) == 3
    words = " ".join(t.text for t in traces).split()
    assert len(words) >= 10 and sum(w.isascii() for w in words) / len(words) > 0.9  # real language, not bytes
    assert all(torch.allclose(torch.tensor(t.old_logps), torch.tensor(t.ref_logps), atol=1e-4) for t in traces)

    trainer = PolicyTrainer(lm)
    steps = []
    metrics = trainer.update(traces, [0, 1, 2], DPOConfig(steps=2, lr=1e-5), on_step=steps.append)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["loss"] < steps[0]["loss"]
    assert metrics["rewards/margins"] > 0
    assert metrics["kl"] > 0 and metrics["version"] == 1
    assert math.isfinite(metrics["grad_norm"])

    # after the update, the lean decoder (packed copies of the changed weights)
    # and the model's own forward draw the same traces with the same log-probs
    lean = sample_traces(lm, case, SamplingConfig(k=2, max_new_tokens=16, seed=4))
    plain = sample_traces(lm, case, SamplingConfig(k=2, max_new_tokens=16, seed=4, lean_decode=False))
    assert [t.completion_ids for t in lean] == [t.completion_ids for t in plain]
    for a, b in zip(lean, plain):
        assert torch.allclose(torch.tensor(a.old_logps), torch.tensor(b.old_logps), atol=1e-4)
