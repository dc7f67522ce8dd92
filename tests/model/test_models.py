import pytest
import torch

from rlhf_core.model.models import REGISTRY, ModelUnavailableError, availability, load_model, pick_dtype, resolve_spec


def test_registry_names():
    assert {"smollm2-135m", "smollm-135m", "phi-1.5", "tinyllama-1.1b", "tiny-random"} <= set(REGISTRY)
    assert resolve_spec("microsoft/phi-1_5").hub_id == "microsoft/phi-1_5"


def test_unknown_model_gives_one_clear_error():
    with pytest.raises(ModelUnavailableError, match="unknown model 'nope'.*one of"):
        resolve_spec("nope")


def test_uncached_hub_model_offline_is_unavailable_with_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state, why = availability("phi-1.5")
    assert state in ("unavailable", "available")
    if state == "unavailable":
        assert "not cached" in why
        with pytest.raises(ModelUnavailableError, match="could not be loaded"):
            load_model("phi-1.5", device="cpu")


def test_tiny_random_is_deterministic():
    a = load_model("tiny-random", device="cpu")
    b = load_model("tiny-random", device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pick_dtype(torch.device("cpu"), "float16x")


@pytest.mark.parametrize("park", [True, False])
def test_full_reference_is_a_frozen_copy_and_reset_restores_it(park):
    lm = load_model("tiny-random", device="cpu", park_reference=park)
    initial = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with torch.no_grad():
        next(lm.model.parameters()).add_(1.0)
    with lm.reference() as ref:
        assert ref is lm._reference and ref is not lm.model
        assert not any(p.requires_grad for p in ref.parameters())
        assert all(torch.equal(initial[n], p) for n, p in ref.named_parameters())
    lm.reset_to_reference()
    assert all(torch.equal(initial[n], p) for n, p in lm.model.named_parameters())


def test_parked_reference_holds_no_weights_between_uses_and_loads_once_when_nested():
    lm = load_model("tiny-random", device="cpu")  # CPU parks by default
    assert lm._parked_reference is not None and lm._parked_reference.path.stat().st_size > 0
    numel = lambda m: sum(p.numel() for p in m.parameters())
    assert numel(lm._reference) == 0
    with lm.reference() as outer:
        loaded = numel(outer)
        assert loaded == numel(lm.model)
        with lm.reference() as inner:
            assert inner is outer and numel(inner) == loaded
        assert numel(outer) == loaded  # the inner block did not park it under the outer one
    assert numel(lm._reference) == 0
    # a tied embedding / LM head pair stays one tensor after reloading
    with lm.reference() as ref:
        assert ref.get_output_embeddings().weight is ref.get_input_embeddings().weight


def test_lora_reference_is_the_same_module_with_adapter_disabled():
    lm = load_model("tiny-random", device="cpu", lora=True)
    with lm.reference() as ref:
        assert ref is lm.model
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_on_the_top_layers_only_adapts_them_and_trains_them_alone():
    from rlhf_core.model.models import LoraSettings, lora_from_dict
    from rlhf_core.rollout.logprobs import collate, completion_logps

    lm = load_model("tiny-random", device="cpu", lora=LoraSettings(adapted_layers=0.5))  # 2 decoder layers
    adapted = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert adapted and all(".layers.1." in n for n in adapted)
    batch = collate([1, 2, 3], [[4, 5], [6, 7]], lm.tokenizer.pad_token_id, lm.device)
    completion_logps(lm.model, batch).sum().backward()
    grads = {n: p.grad for n, p in lm.model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # A's is 0 while B starts at 0
    lm.reset_to_reference()
    assert {n for n, p in lm.model.named_parameters() if p.requires_grad} == adapted
    tiny_share = load_model("tiny-random", device="cpu", lora=LoraSettings(adapted_layers=0.1))
    assert {n for n, p in tiny_share.model.named_parameters() if p.requires_grad} == adapted  # at least one layer
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="share of decoder layers"):
            LoraSettings(adapted_layers=bad)
    # a manifest written before the setting existed had adapters on every layer
    assert lora_from_dict({"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}).adapted_layers == 1.0
    assert lora_from_dict(None) is None


def test_lora_by_default_only_for_large_models_on_cpu():
    from rlhf_core.model.models import LORA_BY_DEFAULT_FROM, lora_by_default

    assert lora_by_default(134_515_008, "cpu")  # SmolLM2-135M
    assert not lora_by_default(LORA_BY_DEFAULT_FROM - 1, "cpu")
    assert not lora_by_default(1_100_048_384, "cuda")  # TinyLlama on a GPU: full fine-tuning is affordable


def test_auto_mode_follows_the_parameter_count(monkeypatch):
    from rlhf_core.model import models

    assert load_model("tiny-random", device="cpu", lora="auto").lora is None  # a few thousand parameters
    monkeypatch.setattr(models, "LORA_BY_DEFAULT_FROM", 1)
    lm = load_model("tiny-random", device="cpu", lora="auto")
    assert lm.lora is not None and all("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="'adapter'"):
        load_model("tiny-random", device="cpu", lora="adapter")
