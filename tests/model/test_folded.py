"""LoRA adapters folded into their base weights for no-grad passes (model/folded.py)."""
import pytest
import torch

from rlhf_core.model.folded import folded_adapters
from rlhf_core.model.models import build_tiny_model


def _trained_adapter(lm):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make the adapter count
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lm.model.eval()


def test_a_folded_adapter_computes_what_the_adapter_computes_and_is_left_as_it_was(tiny_lora_lm):
    model = _trained_adapter(tiny_lora_lm)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with folded_adapters(model) as folded:
            assert folded > 0
            same = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter really moves the logits
    assert torch.allclose(same, adapted, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():  # and once the block ends the layers are peft's own again
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-6)
    assert all("forward" not in vars(m) for m in model.modules())


def test_folding_refuses_a_pass_that_would_train_and_leaves_plain_models_alone(tiny_lora_lm):
    model = _trained_adapter(tiny_lora_lm)
    with folded_adapters(model):
        with pytest.raises(RuntimeError, match="inference only"):
            model(input_ids=torch.tensor([[5, 6]]))
    plain = build_tiny_model()
    with folded_adapters(plain) as folded:
        assert folded == 0
