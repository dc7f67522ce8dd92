"""The lean decoding step must compute what the model's own forward computes."""
import pytest
import torch

from rlhf_core.model import fastdecode
from rlhf_core.model.fastdecode import LlamaDecoder, PackedLinear
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.model.models import build_tiny_model


def _decode_and_compare(model, rows=3, steps=12, seed=0):
    """Feed random tokens through the decoder; compare every step's logits with a
    full forward of the same sequences. Returns the largest difference."""
    prompt = [5, 17, 99, 3, 250, 41, 7]
    decoder = LlamaDecoder.build(model, rows, len(prompt) + steps)
    assert decoder is not None
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (rows, steps), generator=gen)
    collected = [decoder.prefill(prompt).expand(rows, -1)]
    for t in range(steps - 1):
        collected.append(decoder.step(tokens[:, t]))
    ids = torch.cat([torch.tensor([prompt] * rows), tokens[:, : steps - 1]], dim=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, len(prompt) - 1 :]
    return (torch.stack(collected, dim=1) - expected).abs().max().item()


def test_decoder_logits_equal_the_models_forward():
    model = build_tiny_model().eval()
    assert _decode_and_compare(model) < 1e-5


def test_decoder_folds_in_trained_lora_adapters(tiny_lora_lm):
    model = tiny_lora_lm.model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make the adapter count
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    with torch.no_grad():
        changed = model(input_ids=torch.tensor([[5, 6, 7]])).logits
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert (changed - base).abs().max() > 1e-3  # the adapter really moves the logits
    assert _decode_and_compare(model) < 1e-5
    with model.disable_adapter():  # and the disabled adapter is the plain base model
        assert _decode_and_compare(model) < 1e-5


def test_row_cache_gives_each_row_the_cache_of_its_own_sequence():
    """The decoder keeps the prompt's keys/values once; a row's cache handed back is the one
    a forward of prompt + that row's tokens builds."""
    model = build_tiny_model().eval()
    prompt, steps = [5, 17, 99, 3, 250, 41, 7], 5
    decoder = LlamaDecoder.build(model, 3, len(prompt) + steps + 1)
    decoder.prefill(prompt)
    tokens = torch.randint(0, 256, (3, steps), generator=torch.Generator().manual_seed(2))
    for t in range(steps):
        decoder.step(tokens[:, t])
    length = len(prompt) + steps - 1
    got = decoder.row_cache([2, 0], length)
    ids = torch.cat([torch.tensor([prompt] * 3), tokens], dim=1)[[2, 0]]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for (keys, values), layer in zip(got, cache.layers):
        assert keys.shape == (2, decoder.kv_heads, length, decoder.head_dim)
        assert torch.allclose(keys, layer.keys[:, :, :length], atol=1e-5)
        assert torch.allclose(values, layer.values[:, :, :length], atol=1e-5)
    with pytest.raises(ValueError, match="the cache has"):
        decoder.row_cache([0], len(prompt) + steps + 1)


def test_sampling_through_the_decoder_gives_the_same_traces(tiny_lm, case):
    lean = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=20, seed=5, lean_decode=True))
    plain = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=20, seed=5, lean_decode=False))
    assert [t.completion_ids for t in lean] == [t.completion_ids for t in plain]
    for a, b in zip(lean, plain):
        assert torch.allclose(torch.tensor(a.old_logps), torch.tensor(b.old_logps), atol=1e-5)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("lean", [True, False])
def test_model_forward_runs_once_for_the_prompt_when_decoding_lean(tiny_lm, case, lean):
    # a count, not a time: the lean path must really be taken for a Llama model on CPU
    calls, handle = _count_forwards(tiny_lm.model)
    try:
        config = SamplingConfig(k=2, max_new_tokens=10, seed=1, lean_decode=lean)
        traces = sample_traces(tiny_lm, case, config, ignore_eos=True)
    finally:
        handle.remove()
    # the prompt, then (model's own forward only) one per new token but the last;
    # the reference log-probs come from the separate frozen copy
    assert len(calls) == (1 if lean else 10)
    assert all(len(t.completion_ids) == 10 for t in traces)


def test_decoder_declines_what_it_does_not_implement():
    assert LlamaDecoder.build(build_tiny_model().to(torch.bfloat16), 2, 16) is None
    biased = build_tiny_model()
    biased.config.attention_bias = True
    assert LlamaDecoder.build(biased, 2, 16) is None
    other = build_tiny_model()
    other.config.model_type = "phi"
    assert LlamaDecoder.build(other, 2, 16) is None


@pytest.mark.parametrize("backend", ["onednn", "mkl", "plain"])
def test_packed_linear_is_a_plain_matmul_for_its_row_count(backend):
    if backend not in fastdecode.packing_backends():
        pytest.skip(f"this torch build has no {backend}")
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 40, generator=gen), torch.randn(4, 40, generator=gen)
    packed = PackedLinear(weight, rows=4, backend=backend)
    assert torch.allclose(packed(x), x @ weight.T, atol=1e-5)
    with pytest.raises(ValueError, match="packed for 4 rows, got 3"):
        packed(x[:3])


def test_packed_linear_prefers_onednn_and_rejects_a_missing_backend(monkeypatch):
    assert fastdecode.packing_backends()[-1] == "plain"
    weight = torch.randn(8, 6)
    assert PackedLinear(weight, rows=2).backend == fastdecode.packing_backends()[0]
    monkeypatch.setattr(fastdecode, "packing_backends", lambda: ["plain"])
    with pytest.raises(ValueError, match="'onednn' is not available here"):
        PackedLinear(weight, rows=2, backend="onednn")
    assert PackedLinear(weight, rows=2).backend == "plain"


def test_cache_overflow_and_long_prompt_are_clear_errors():
    decoder = LlamaDecoder.build(build_tiny_model().eval(), 1, 4)
    with pytest.raises(ValueError, match="does not fit a cache of 4"):
        decoder.prefill([1, 2, 3, 4])
    decoder.prefill([1, 2, 3])
    decoder.step(torch.tensor([5]))
    with pytest.raises(ValueError, match="holds 4 positions"):
        decoder.step(torch.tensor([6]))
