import pytest
import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_stream, sample_traces
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.rollout.prompts import build_messages, encode_prompt


def test_traces_carry_ids_text_finish_reason_and_logps(tiny_lm, case):
    # the free-text conclusion mode: the model's own tokens only (the constrained
    # conclusion step has its own tests, test_conclusion.py)
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=12, seed=7, conclusion="free"))
    prompt = encode_prompt(tiny_lm.tokenizer, build_messages(case))
    assert len(traces) == 3
    for t in traces:
        assert t.prompt_ids == prompt
        assert 1 <= len(t.completion_ids) <= 12
        assert len(t.old_logps) == len(t.ref_logps) == len(t.completion_ids)
        assert t.finish_reason in ("eos", "length")
        assert (t.finish_reason == "length") == (len(t.completion_ids) == 12 and t.completion_ids[-1] != 258)
        assert t.text == tiny_lm.tokenizer.decode(t.completion_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in t.old_logps)
        # at version 0 the policy is the reference; "old" log-probs come from the decoding
        # pass (KV cache), reference ones from a teacher-forced pass: equal up to float error
        assert torch.allclose(torch.tensor(t.old_logps), torch.tensor(t.ref_logps), atol=1e-5)


def test_stored_logps_equal_a_fresh_forward(tiny_lm, case):
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=10, seed=3))
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        fresh = completion_logps(tiny_lm.model, batch)
    for i, t in enumerate(traces):
        assert torch.allclose(fresh[i, : len(t.completion_ids)], torch.tensor(t.old_logps), atol=1e-5)
        # and the same numbers as a manual full-vocabulary log-softmax over a single sequence
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=ids).logits[0, len(t.prompt_ids) - 1 : -1]
        manual = torch.log_softmax(logits, -1).gather(-1, torch.tensor(t.completion_ids)[:, None]).squeeze(-1)
        assert torch.allclose(manual, torch.tensor(t.old_logps), atol=1e-4)


def test_same_seed_same_traces_and_different_seed_differs(tiny_lm, case):
    a = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=16, seed=11))
    b = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=16, seed=11))
    c = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=16, seed=12))
    assert [t.completion_ids for t in a] == [t.completion_ids for t in b]
    assert [t.completion_ids for t in a] != [t.completion_ids for t in c]


def test_batched_sampling_matches_sequence_by_sequence_decoding(tiny_lm, case):
    # the shared-prefix KV cache must give the same next-token distribution as a full forward
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=8, temperature=0, seed=0, conclusion="free"))
    ids = torch.tensor([traces[0].prompt_ids])
    for _ in range(len(traces[0].completion_ids)):
        with torch.no_grad():
            nxt = tiny_lm.model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert ids[0, len(traces[0].prompt_ids):].tolist() == traces[0].completion_ids
    assert traces[0].completion_ids == traces[1].completion_ids  # greedy: all rows agree


def test_stream_yields_growing_partial_texts_then_traces(tiny_lm, case):
    updates = list(sample_stream(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=20, seed=5, stream_every=4, temperature=2.0)))
    assert updates[-1].traces is not None and len(updates[-1].traces) == 2
    partial = [u for u in updates if u.traces is None]
    assert len(partial) >= 2
    assert all(u.new_tokens < v.new_tokens for u, v in zip(partial, partial[1:]))


def test_hinted_traces_are_rationalised_and_scored_on_the_plain_prompt(tiny_lm, case):
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=6, seed=1), hint=case.answer)
    plain = encode_prompt(tiny_lm.tokenizer, build_messages(case))
    hinted = encode_prompt(tiny_lm.tokenizer, build_messages(case, hint=case.answer))
    assert hinted != plain
    assert all(t.rationalised and t.prompt_ids == plain for t in traces)


def test_plain_prompt_for_models_without_chat_template(tiny_lm, case):
    tiny_lm.tokenizer.chat_template = None
    ids = encode_prompt(tiny_lm.tokenizer, build_messages(case))
    text = tiny_lm.tokenizer.decode(ids)
    assert "Case: " + case.question in text and text.endswith("Reasoning:")
    assert "Final diagnosis:" in text


def test_sampling_config_validation():
    import pytest

    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="k"):
        SamplingConfig(k=0)


def test_shared_prompt_logps_and_gradients_match_full_forward(tiny_lm, case):
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=9, seed=8, temperature=1.5))
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    params = [p for p in tiny_lm.model.parameters()]
    grads = []
    values = []
    for share in (True, False):
        logps = completion_logps(tiny_lm.model, batch, share_prompt=share)
        logps.sum().backward()
        values.append(logps.detach())
        grads.append([p.grad.clone() for p in params])
        tiny_lm.model.zero_grad(set_to_none=True)
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_chunked_lm_head_matches_unchunked_values_and_gradients(tiny_lm):
    from rlhf_core.rollout.logprobs import chunked_head_logps

    head = tiny_lm.model.get_output_embeddings()
    hidden = torch.randn(3, 10, head.in_features, requires_grad=True)
    targets = torch.randint(0, head.out_features, (3, 10))
    results = []
    for chunk, recompute in ((3, True), (100, True), (3, False)):  # recomputed in backward, or kept
        out = chunked_head_logps(head, hidden, targets, chunk=chunk, recompute=recompute)
        (out * torch.arange(10.0)).sum().backward()
        results.append((out.detach(), hidden.grad.clone(), head.weight.grad.clone()))
        hidden.grad, head.weight.grad = None, None
    (a, ga, wa) = results[0]
    for b, gb, wb in results[1:]:
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6) and torch.allclose(wa, wb, atol=1e-6)


def test_while_the_policy_is_the_reference_its_logps_serve_as_reference_logps(tiny_lm, case):
    config = SamplingConfig(k=3, max_new_tokens=10, seed=4)
    for hint in (None, case.answer):
        fast = sample_traces(tiny_lm, case, config, hint=hint, reference_is_policy=True)
        full = sample_traces(tiny_lm, case, config, hint=hint)
        for a, b in zip(fast, full):
            assert a.completion_ids == b.completion_ids
            assert a.ref_logps == a.old_logps  # no reference pass ran
            assert torch.allclose(torch.tensor(a.ref_logps), torch.tensor(b.ref_logps), atol=1e-4)


def test_an_updated_policy_samples_without_a_reference_pass_and_ranked_traces_get_theirs(tmp_path, case):
    """Without a reward model wanting features, sampling leaves the reference log-probs to the
    traces that get ranked: the update fills them (the numbers a pass at sampling gives),
    stores them with the traces and trains on them; an unfilled trace is refused."""
    from rlhf_core.engine import Engine
    from rlhf_core.rollout.teacher import fill_reference, lacks_reference
    from rlhf_core.training.update import DPOConfig

    engine = Engine("tiny-random", device="cpu", store=tmp_path / "db.sqlite")
    lm = engine.lm
    first = sample_traces(lm, case, SamplingConfig(k=2, max_new_tokens=8, seed=1), reference_is_policy=True)
    engine.update(first, [0, 1], DPOConfig(steps=1, lr=1e-3), case=case)  # the policy moves off the reference
    calls = []
    original = engine.lm.reference
    engine.lm.reference = lambda: calls.append(1) or original()
    try:
        config = SamplingConfig(k=3, max_new_tokens=8, seed=2, reward_features=False)
        bare = sample_traces(lm, case, config, policy_version=engine.version)
        hinted = sample_traces(lm, case, config, hint=case.answer, policy_version=engine.version)
    finally:
        engine.lm.reference = original
    assert calls == [] and all(lacks_reference(t) and t.ref_logps == [] and not t.features for t in bare + hinted)
    assert all(len(t.old_logps) == len(t.completion_ids) for t in bare + hinted)
    with pytest.raises(ValueError, match="fill them first"):
        engine.trainer.update(bare, [0, 1, 2], DPOConfig(steps=1))
    full = sample_traces(lm, case, SamplingConfig(k=3, max_new_tokens=8, seed=2), policy_version=engine.version)
    engine.store.record_traces(engine.workspace, bare, case)  # stored when sampled, without them
    engine.update(bare, [2, 0, 1], DPOConfig(steps=1, lr=1e-3), case=case)
    for b, f in zip(bare, full):
        assert b.completion_ids == f.completion_ids
        assert b.ref_logps == pytest.approx(f.ref_logps, abs=1e-5) and b.features
        assert engine.store.trace(engine.workspace, b.trace_id).ref_logps == pytest.approx(f.ref_logps, abs=1e-5)
    fill_reference(lm, hinted)
    assert not any(lacks_reference(t) for t in hinted)


def test_a_reference_pass_prepared_while_the_clinician_reads_spares_the_update_its_own(tmp_path, case):
    """``Engine.prepare_reference`` runs and stores the pass an update of the shown traces
    needs; the update (on the traces as the browser sends them back, still without it)
    then enters no reference pass and trains on the same numbers a pass at ranking time gives."""
    from rlhf_core.engine import Engine
    from rlhf_core.rollout.records import Trace
    from rlhf_core.rollout.teacher import lacks_reference
    from rlhf_core.training.update import DPOConfig

    engine = Engine("tiny-random", device="cpu", store=tmp_path / "db.sqlite")
    lm = engine.lm
    first = sample_traces(lm, case, SamplingConfig(k=2, max_new_tokens=8, seed=1), reference_is_policy=True)
    engine.update(first, [0, 1], DPOConfig(steps=1, lr=1e-3), case=case)  # the policy moves off the reference
    config = SamplingConfig(k=3, max_new_tokens=8, seed=2, reward_features=False)
    shown = [t.to_dict() for t in sample_traces(lm, case, config, policy_version=engine.version)]
    engine.store.record_traces(engine.workspace, [Trace.from_dict(t) for t in shown], case)
    assert engine.prepare_reference([Trace.from_dict(t) for t in shown]) == 3
    assert engine.prepare_reference([Trace.from_dict(t) for t in shown]) == 0  # stored: not run twice
    full = sample_traces(lm, case, SamplingConfig(k=3, max_new_tokens=8, seed=2), policy_version=engine.version)
    ranked = [Trace.from_dict(t) for t in shown]
    assert all(lacks_reference(t) for t in ranked)
    calls = []
    original = engine.lm.reference
    engine.lm.reference = lambda: calls.append(1) or original()
    try:
        engine.update(ranked, [2, 0, 1], DPOConfig(steps=1, lr=1e-3), case=case)
    finally:
        engine.lm.reference = original
    assert calls == []
    for r, f in zip(ranked, full):
        assert r.ref_logps == pytest.approx(f.ref_logps, abs=1e-5) and r.features
