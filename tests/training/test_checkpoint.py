import json

import pytest
import torch

from rlhf_core.training.checkpoint import CheckpointError, load_checkpoint, load_into, save_checkpoint
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.model.models import LoraSettings, load_model
from rlhf_core.training.update import DPOConfig, PolicyTrainer


def _logps(lm, traces):
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        return completion_logps(lm.model, batch)


@pytest.mark.parametrize("lora", [False, True, LoraSettings(adapted_layers=0.5)], ids=["full", "lora", "lora-top-half"])
def test_checkpoint_round_trip_reproduces_logps_and_resumes_training(tmp_path, case, lora):
    lm = load_model("tiny-random", device="cpu", lora=lora)
    traces = sample_traces(lm, case, SamplingConfig(k=3, max_new_tokens=10, seed=4, temperature=1.5))
    trainer = PolicyTrainer(lm)
    config = DPOConfig(steps=2, lr=1e-3 if not lora else 1e-2)
    trainer.update(traces, [0, 1, 2], config)
    trained = _logps(lm, traces)
    path = save_checkpoint(trainer, tmp_path / "ckpt", extra={"note": "test"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["base_model"] == "tiny-random" and manifest["version"] == 1
    assert (path / ("adapter" if lora else "model.safetensors")).exists()

    restored = load_checkpoint(path, device="cpu")
    assert restored.version == 1 and restored.lm.lora == lm.lora
    assert torch.allclose(_logps(restored.lm, traces), trained, atol=1e-6)
    assert not torch.allclose(trained, torch.stack([torch.tensor(t.ref_logps + [0.0] * (trained.shape[1] - len(t.ref_logps))) for t in traces]), atol=1e-4)

    # resuming is exact: the next update gives the same weights as continuing in place
    a = trainer.update(traces, [0, 1, 2], config)
    b = restored.update(traces, [0, 1, 2], config)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert torch.allclose(_logps(lm, traces), _logps(restored.lm, traces), atol=1e-5)


def test_checkpoint_errors_are_clear(tmp_path, case):
    lm = load_model("tiny-random", device="cpu")
    trainer = PolicyTrainer(lm)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_into(trainer, tmp_path)
    path = save_checkpoint(trainer, tmp_path / "full")
    lora_trainer = PolicyTrainer(load_model("tiny-random", device="cpu", lora=True))
    with pytest.raises(CheckpointError, match="full fine-tuning"):
        load_into(lora_trainer, path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_into(trainer, path)
    # an adapter on the top half does not load into one on every layer (the default)
    top_half = PolicyTrainer(load_model("tiny-random", device="cpu", lora=LoraSettings(adapted_layers=0.5)))
    top = save_checkpoint(top_half, tmp_path / "top")
    with pytest.raises(CheckpointError, match="load the model with the checkpoint's settings"):
        load_into(lora_trainer, top)
    # a manifest from before adapted_layers existed: adapters on every layer
    every = save_checkpoint(lora_trainer, tmp_path / "every")
    manifest = json.loads((every / "manifest.json").read_text())
    del manifest["lora"]["adapted_layers"]
    (every / "manifest.json").write_text(json.dumps(manifest))
    assert load_into(lora_trainer, every)["version"] == 0
    with pytest.raises(CheckpointError, match="load the model with the checkpoint's settings"):
        load_into(top_half, every)
