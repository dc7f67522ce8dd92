"""oneDNN linear layers must compute what F.linear computes, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_core.model import cpu_linear
from rlhf_core.model.cpu_linear import OneDnnLinear, onednn_linear
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.model.models import build_tiny_model

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8), (3, 1, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("avx512", [False, True])  # the weight's gradient takes MKL without AVX-512, oneDNN with it
def test_forward_and_gradients_equal_f_linear(shape, with_bias, avx512, monkeypatch):
    monkeypatch.setattr(cpu_linear, "has_avx512", lambda: avx512)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    weight = torch.randn(6, 8, generator=gen, requires_grad=True)
    bias = torch.randn(6, generator=gen, requires_grad=True) if with_bias else None
    upstream = torch.randn(*shape[:-1], 6, generator=gen)

    ours = OneDnnLinear.apply(x, weight, bias)
    ours_grads = torch.autograd.grad(ours, [x, weight] + ([bias] if with_bias else []), upstream)
    theirs = F.linear(x, weight, bias)
    their_grads = torch.autograd.grad(theirs, [x, weight] + ([bias] if with_bias else []), upstream)

    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(ours_grads, their_grads):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_input_does():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8)  # frozen, like a LoRA base layer
    OneDnnLinear.apply(x, weight, None).sum().backward()
    assert torch.allclose(x.grad, weight.sum(0).expand(4, 8), atol=1e-5)


def _spy(monkeypatch) -> list:
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "onednn")  # route every layer, whichever is faster here
    calls = []
    real = cpu_linear._linear_pointwise
    monkeypatch.setattr(cpu_linear, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    return calls


def test_model_log_probs_and_gradients_through_onednn_equal_the_default(monkeypatch):
    model = build_tiny_model().train()
    batch = collate([5, 17, 99, 3], [[7, 8, 9], [10, 11]], 0, "cpu")

    def run(route: bool):
        model.zero_grad()
        with onednn_linear(model, enabled=route):
            logps = completion_logps(model, batch, checkpoint_layers=True)
            logps.sum().backward()  # recomputes checkpointed segments: they must match the forward
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    calls = _spy(monkeypatch)
    routed, routed_grads = run(True)
    assert len(calls) > 0  # really went through oneDNN, forward and backward
    n_routed = len(calls)
    plain, plain_grads = run(False)
    assert len(calls) == n_routed  # and the default path did not
    assert torch.allclose(routed, plain, atol=1e-5)
    assert len(routed_grads) == len(plain_grads)
    for a, b in zip(routed_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert all("forward" not in vars(m) for m in model.modules())  # layers restored


def test_only_float32_cpu_inputs_are_routed(monkeypatch):
    calls = _spy(monkeypatch)
    layer = torch.nn.Linear(4, 3, bias=False)
    with onednn_linear(layer) as on:
        assert on
        layer(torch.randn(4))  # 1-D input: left to F.linear
        assert calls == []
        layer(torch.randn(2, 4))
        assert calls == [1]
    with onednn_linear(layer.double()):
        layer(torch.randn(2, 4, dtype=torch.float64))
    assert calls == [1]


def test_nesting_is_harmless_and_disabled_does_nothing(monkeypatch):
    calls = _spy(monkeypatch)
    layer = torch.nn.Linear(4, 3)
    with onednn_linear(layer, enabled=False) as on:
        assert not on
        layer(torch.randn(2, 4))
    assert calls == []
    with onednn_linear(layer):
        with onednn_linear(layer):
            layer(torch.randn(2, 4))
        layer(torch.randn(2, 4))  # the inner block's exit leaves the outer routing in place
    assert calls == [1, 1]
    layer(torch.randn(2, 4))  # off again after the block
    assert calls == [1, 1]


def test_the_library_choice_follows_the_cpu_and_the_shape_unless_fixed(monkeypatch):
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "auto")
    monkeypatch.setattr(cpu_linear, "has_avx512", lambda: False)
    assert not cpu_linear.onednn_wins(1536, 576)  # a decoder layer: MKL
    assert cpu_linear.onednn_wins(49152, 576)  # an LM head
    assert cpu_linear.onednn_wins(16, 576) and cpu_linear.onednn_wins(1536, 16)  # LoRA's adapters
    monkeypatch.setattr(cpu_linear, "has_avx512", lambda: True)
    assert cpu_linear.onednn_wins(1536, 576)
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "mkl")
    assert not cpu_linear.onednn_wins(49152, 576) and not cpu_linear.onednn_wins(16, 576)
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "onednn")
    monkeypatch.setattr(cpu_linear, "has_avx512", lambda: False)
    assert cpu_linear.onednn_wins(1536, 576)
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "fastest")
    with pytest.raises(ValueError, match="RLHF_CPU_LINEAR='fastest'"):
        cpu_linear.onednn_wins(1536, 576)


def test_a_block_routes_only_the_layers_whose_shape_onednn_wins(monkeypatch):
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "auto")
    monkeypatch.setattr(cpu_linear, "has_avx512", lambda: False)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, cpu_linear.HEAD_SIZED))
    calls = []
    real = cpu_linear._linear_pointwise
    monkeypatch.setattr(cpu_linear, "_linear_pointwise", lambda *a: calls.append(a[1].shape) or real(*a))
    x = torch.randn(2, 256)
    with onednn_linear(model):
        routed = model(x)
    assert calls == [torch.Size([cpu_linear.HEAD_SIZED, 512])]  # the head-sized layer only
    assert torch.allclose(routed, model(x), atol=1e-4)
