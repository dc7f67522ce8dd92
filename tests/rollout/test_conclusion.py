"""The conclusion step: candidates, their scores and the choice, the row policy,
and what it does to stored traces and updates on a real (tiny) model."""
from __future__ import annotations

import pytest
import torch

from rlhf_core.clinical.cases import Case
from rlhf_core.rollout.conclusion import (
    TRIGGER_RE, Concluder, arithmetic_codes, can_constrain, candidate_probs, candidate_scores, candidates,
    choose_candidate, conclusion_record,
)
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.logprobs import collate, completion_logps

MC_CASE = Case(id="mc", question="Q?", answer="Renal colic", options=["Appendicitis", "Renal colic", "Cholecystitis"], answer_idx=1)
FREE_CASE = Case(id="free", question="Q?", answer="acute appendicitis", distractors=["renal colic", "Renal  colic", "ovarian torsion"])


# ---------------------------------------------------------------------------- pure parts

def test_candidates_are_the_options_or_the_answer_and_distractors():
    assert candidates(MC_CASE) == ["A. Appendicitis", "B. Renal colic", "C. Cholecystitis"]
    names = candidates(FREE_CASE)
    assert sorted(names) == ["acute appendicitis", "ovarian torsion", "renal colic"]  # duplicate dropped
    assert candidates(FREE_CASE) == names  # a fixed order per case
    other = Case(id="another-id", question="Q?", answer=FREE_CASE.answer, distractors=FREE_CASE.distractors)
    orders = {tuple(candidates(Case(id=f"c{i}", question="Q", answer="a", distractors=["b", "c", "d"]))) for i in range(20)}
    assert len(orders) > 1  # the answer is not always in the same place
    assert sorted(candidates(other)) == sorted(names)
    assert not can_constrain(Case(id="x", question="Q?", answer="gout"))
    assert can_constrain(FREE_CASE) and can_constrain(MC_CASE)


def test_trigger_recognises_the_label_only_at_the_end():
    for text in ["Final diagnosis:", "so.\n**Final Diagnosis:**", "Final answer: ", "final  diagnosis :"]:
        assert TRIGGER_RE.search(text), text
    for text in ["Final diagnosis: gout", "diagnosis:", "Final diagnosis is"]:
        assert not TRIGGER_RE.search(text), text


def test_candidate_scores_by_token_or_sequence():
    logps = [[-1.0, -3.0], [-0.5], [-1.0, -1.0, -1.0, -1.0]]
    assert candidate_scores(logps, "sequence") == [-4.0, -0.5, -4.0]
    assert candidate_scores(logps, "per_token") == [-2.0, -0.5, -1.0]
    probs = candidate_probs([-2.0, -0.5, -1.0])
    expected = torch.softmax(torch.tensor([-2.0, -0.5, -1.0], dtype=torch.float64), 0).tolist()
    assert probs == pytest.approx(expected) and sum(probs) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one of"):
        candidate_scores(logps, "bytes")
    with pytest.raises(ValueError, match="no tokens"):
        candidate_scores([[-1.0], []])


def test_choose_candidate_follows_the_models_probabilities():
    scores = [0.0, 2.0, 1.0]
    assert choose_candidate(scores, 0.0, None) == 1
    gen = torch.Generator().manual_seed(0)
    draws = [choose_candidate(scores, 1.0, gen) for _ in range(4000)]
    for index, p in enumerate(candidate_probs(scores)):
        assert abs(draws.count(index) / len(draws) - p) < 0.03


def test_arithmetic_codes_are_each_uniform_and_together_evenly_spread():
    gen = torch.Generator().manual_seed(1)
    batches = [arithmetic_codes(8, gen) for _ in range(3000)]
    for codes in batches[:50]:
        gaps = sorted(codes)
        assert all(0 <= c < 1 for c in codes)
        assert [b - a for a, b in zip(gaps, gaps[1:])] == pytest.approx([1 / 8] * 7)
    for row in (0, 5):  # each row's code on its own: uniform on [0, 1)
        column = torch.tensor([codes[row] for codes in batches])
        histogram = torch.histc(column, bins=4, min=0, max=1) / len(batches)
        assert histogram.tolist() == pytest.approx([0.25] * 4, abs=0.03)
    with pytest.raises(ValueError, match="k must be"):
        arithmetic_codes(0, gen)


def test_a_coded_draw_keeps_each_rows_probabilities_and_spreads_the_batch():
    scores = [0.0, 2.0, 1.0]  # probabilities 0.09, 0.67, 0.24
    probs = candidate_probs(scores)
    gen = torch.Generator().manual_seed(3)
    batches = [[choose_candidate(scores, 1.0, None, code) for code in arithmetic_codes(8, gen)] for _ in range(2000)]
    for row in (0, 3, 7):  # every row concludes with the model's probabilities
        column = [draws[row] for draws in batches]
        for index, p in enumerate(probs):
            assert abs(column.count(index) / len(column) - p) < 0.035
    for draws in batches:  # ...and a batch holds each candidate in about p x 8 of its rows: never none at 0.24
        for index, p in enumerate(probs):
            assert int(8 * p) <= draws.count(index) <= int(8 * p) + 1
    independent = [[choose_candidate(scores, 1.0, gen) for _ in range(8)] for _ in range(2000)]
    assert sum(2 not in draws for draws in independent) > 100  # ~11% of independent batches miss it
    assert choose_candidate(scores, 0.0, None, 0.99) == 1  # greedy ignores the code
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        choose_candidate(scores, 1.0, None, 1.0)


# ---------------------------------------------------------------------------- the row policy

def _chars(ids):
    return "".join(chr(i) for i in ids)


def _ids(text):
    return [ord(c) for c in text]


EOS = 3


def _concluder(budget=40, constrained=True, k=2, sentence_after=0, stop_rules=True):
    return Concluder(
        k, budget, [EOS], _chars, constrained=constrained, stop_rules=stop_rules, sentence_after=sentence_after,
        scaffold_ids=lambda after_newline: _ids("" if after_newline else "\n") + _ids("Final diagnosis:"),
    )


def _feed(concluder, scripts, steps=80):
    """Drive the concluder with scripted 'sampled' tokens; returns the steps taken."""
    for step in range(steps):
        sampled = [script[step] if step < len(script) else ord(".") for script in scripts]
        concluder.next_tokens(sampled)
        if concluder.all_stopped():
            return step + 1
    return steps


def test_a_written_label_stops_the_row_to_conclude():
    c = _concluder()
    steps = _feed(c, [_ids("Pain in the big toe.\nFinal diagnosis:"), _ids("Rash and joint pain. Final diagnosis: lupus")])
    assert c.concluding() == [0, 1]
    assert _chars(c.rows[0]) == "Pain in the big toe.\nFinal diagnosis:"  # nothing decoded after the label
    assert c.states[0].trigger == "written" and c.states[0].scaffold == []
    assert steps == len("Rash and joint pain. Final diagnosis:")  # stopped as soon as both were ready
    appended = c.conclude(0, 1, _ids(" lupus") + [EOS], [0.3, 0.7])
    assert appended == _ids(" lupus") + [EOS]
    assert _chars(c.rows[0]).endswith("Final diagnosis: lupus" + chr(EOS))
    assert c.masks[0] == [1] * len(c.rows[0])  # nothing inserted: every token counts
    assert c.finish[0] == "conclusion" and c.states[0].chosen == 1 and c.states[0].probs == [0.3, 0.7]
    assert c.next_tokens([ord("z"), ord("z")]) == [None, None]  # a stopped row appends nothing more


def test_an_end_token_or_the_budget_inserts_the_label_masked_out():
    c = _concluder(budget=10)
    _feed(c, [_ids("Toe pain") + [EOS], _ids("a long reasoning that never ends")])
    assert c.states[0].trigger == "eos" and c.states[1].trigger == "budget"
    assert _chars(c.rows[0]) == "Toe pain"  # the end token is not kept: the label goes in its place
    assert _chars(c.rows[1]) == "a long rea"
    for i in (0, 1):
        reasoning = len(c.rows[i])
        c.conclude(i, 0, _ids(" gout") + [EOS], [0.6, 0.4])
        text = _chars(c.rows[i])
        assert text[reasoning:] == "\nFinal diagnosis: gout" + chr(EOS)
        inserted = len("\nFinal diagnosis:")
        assert c.masks[i] == [1] * reasoning + [0] * inserted + [1] * (len(c.rows[i]) - reasoning - inserted)


def test_past_sentence_after_a_row_concludes_where_its_next_sentence_would_start():
    c = _concluder(budget=60, k=4, sentence_after=12)
    _feed(c, [
        _ids("Short one. Then a longer sentence ends here. Never seen"),  # "Short one." ends before 12 tokens
        _ids("Signs, e.g. fever and a rash.\nNext part"),  # an abbreviation is not a sentence end
        _ids("Findings:\n2. pain in the toe, 38.5 degrees, still going on and on and on"),  # a list number, a decimal
        _ids("Why: fits best!) And more"),
    ])
    assert [c.states[i].trigger for i in range(4)] == ["sentence", "sentence", "budget", "sentence"]
    assert _chars(c.rows[0]) == "Short one. Then a longer sentence ends here."  # the space that would start one is not kept
    assert _chars(c.rows[1]) == "Signs, e.g. fever and a rash."
    assert len(c.rows[2]) == 60
    assert _chars(c.rows[3]) == "Why: fits best!)"
    assert c.states[0].scaffold == _ids("\nFinal diagnosis:")
    c.conclude(0, 0, _ids(" gout") + [EOS], [0.6, 0.4])
    assert _chars(c.rows[0]).endswith("ends here.\nFinal diagnosis: gout" + chr(EOS))
    record = conclusion_record("constrained", c.states[0], ["gout", "lupus"], "per_token")
    assert record["trigger"] == "sentence" and record["forced_by_budget"]
    # never in the free mode, nor without stopping rules
    for other in (_concluder(budget=60, k=1, sentence_after=12, constrained=False),
                  _concluder(budget=60, k=1, sentence_after=12, stop_rules=False)):
        _feed(other, [_ids("Short one. Then a longer sentence ends here. And on")], steps=20)
        assert other.states[0].trigger is None and len(other.rows[0]) == 20


def test_free_mode_stops_at_the_end_of_the_label_line():
    c = _concluder(constrained=False)
    _feed(c, [_ids("Toe pain.\nFinal diagnosis: gout\nMore text that is never spent"), _ids("no label" + chr(EOS))])
    assert _chars(c.rows[0]) == "Toe pain.\nFinal diagnosis: gout\n"
    assert c.finish == ["conclusion", "eos"] and c.concluding() == []
    assert _chars(c.rows[1]) == "no label" + chr(EOS)


# ---------------------------------------------------------------------------- on a real model

def test_every_constrained_trace_ends_in_a_candidate_with_exact_policy_logps(tiny_lm):
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=4, max_new_tokens=10, seed=5))
    names = candidates(case)
    for t in traces:
        assert t.finish_reason == "conclusion"
        assert t.conclusion["mode"] == "constrained" and t.conclusion["constrained"]
        assert any(t.text.endswith("Final diagnosis: " + n) for n in names)
        assert t.conclusion["chosen_text"] in names and t.text.endswith(t.conclusion["chosen_text"])
        assert len(t.loss_mask) == len(t.completion_ids) == len(t.old_logps) == len(t.ref_logps)
        assert t.loss_mask.count(0) == t.conclusion["scaffold_tokens"] > 0  # the random model never writes the label
        assert sum(t.conclusion["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    # stored "old" log-probs are the policy's own over the whole vocabulary, not renormalised
    # over the candidates: they equal a fresh teacher-forced forward, token by token
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        fresh = completion_logps(tiny_lm.model, batch)
    for i, t in enumerate(traces):
        assert torch.allclose(fresh[i, : len(t.completion_ids)], torch.tensor(t.old_logps), atol=1e-5)


def test_a_row_past_the_threshold_concludes_at_its_sentence_end_with_exact_logps(tiny_lm, monkeypatch):
    # row 0 ends a sentence at its fifth token and would start another at its sixth: that token
    # is not kept, the label follows the full stop, and the stored log-probs are those of a fresh forward
    import rlhf_core.rollout.generation as generation

    tok = tiny_lm.tokenizer
    period, starts_a_word = tok.encode(".", add_special_tokens=False)[-1], tok.encode(" The", add_special_tokens=False)[0]
    original, calls = generation.sample_next, []

    def sample_next(logits, *args):
        tokens = original(logits, *args)
        calls.append(1)
        if len(calls) in (5, 6):
            tokens[0] = period if len(calls) == 5 else starts_a_word
        return tokens

    monkeypatch.setattr(generation, "sample_next", sample_next)
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=12, wrap_up_from=0.3, seed=4))
    first = traces[0]
    reasoning = first.loss_mask.index(0)
    assert first.conclusion["trigger"] == "sentence" and first.conclusion["forced_by_budget"]
    assert reasoning == 5 and first.completion_ids[4] == period and starts_a_word not in first.completion_ids[:reasoning]
    assert tok.decode(first.completion_ids[reasoning:]).startswith("\nFinal diagnosis:")
    batch = collate(first.prompt_ids, [t.completion_ids for t in traces], tok.pad_token_id, "cpu")
    with torch.no_grad():
        fresh = completion_logps(tiny_lm.model, batch)
    for i, t in enumerate(traces):
        assert torch.allclose(fresh[i, : len(t.completion_ids)], torch.tensor(t.old_logps), atol=1e-5)
    assert SamplingConfig(max_new_tokens=12, wrap_up_from=0.3).wrap_up_tokens() == 4
    assert SamplingConfig(wrap_up_from=1).wrap_up_tokens() == 0
    for share in (0, 1.5):
        with pytest.raises(ValueError, match="wrap_up_from"):
            SamplingConfig(wrap_up_from=share)


@pytest.mark.parametrize("lean", [True, False])
def test_the_recorded_probabilities_are_the_models_scores_of_each_candidate(tiny_lm, lean):
    # an independent teacher-forced scoring of every candidate after the trace's own
    # reasoning and label gives the probabilities the choice was drawn from
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    tok = tiny_lm.tokenizer
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=2, lean_decode=lean))
    for t in traces:
        names = t.conclusion["candidates"]
        seqs = [tok.encode(" " + n, add_special_tokens=False) + [tok.eos_token_id] for n in names]
        context = t.prompt_ids + t.completion_ids[: len(t.completion_ids) - len(seqs[t.conclusion["chosen"]])]
        batch = collate(context, seqs, tok.pad_token_id, "cpu")
        with torch.no_grad():
            logps = completion_logps(tiny_lm.model, batch)
        scores = [float(logps[j, : len(seq)].mean()) for j, seq in enumerate(seqs)]
        assert t.conclusion["probabilities"] == pytest.approx(candidate_probs(scores), abs=1e-4)


def test_the_scaffold_counts_in_no_loss(tiny_lm):
    from rlhf_core.training.update import DPOConfig, PolicyTrainer

    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=8, seed=9))
    expected = [sum(lp for lp, m in zip(t.old_logps, t.loss_mask) if m) for t in traces]
    full = [sum(t.old_logps) for t in traces]
    assert all(abs(a - b) > 1e-3 for a, b in zip(expected, full))  # the scaffold has real log-probs
    metrics = PolicyTrainer(tiny_lm).update(traces, [0, 1], DPOConfig(steps=1, lr=1e-9))
    # at version 0 the policy's first-step log-prob of the chosen trace is its stored one, masked
    assert metrics["logps/chosen"] == pytest.approx(expected[0], abs=1e-3)
    assert metrics["logps/rejected"] == pytest.approx(expected[1], abs=1e-3)


def test_free_mode_and_cases_without_candidates_write_their_own_conclusion(tiny_lm):
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["renal colic"])
    for config, c in [(SamplingConfig(k=2, max_new_tokens=8, seed=1, conclusion="free"), case),
                      (SamplingConfig(k=2, max_new_tokens=8, seed=1), Case(id="u", question="Q?", answer="gout"))]:
        for t in sample_traces(tiny_lm, c, config):
            assert t.conclusion["mode"] == "free" and not t.conclusion["constrained"]
            assert t.loss_mask == [] and t.finish_reason in ("eos", "length")
            assert len(t.completion_ids) <= 8
    with pytest.raises(ValueError, match="conclusion must be one of"):
        SamplingConfig(conclusion="forced")


def test_the_end_token_is_ruled_out_before_the_minimum_reasoning():
    c = _concluder()
    logits = torch.zeros(2, 10)
    c.next_tokens([ord("a"), ord("b")])
    c.rows[1] += [ord("x")] * 5  # row 1 has reasoned longer
    out = c.without_early_end(logits, min_tokens=3)
    assert out[0, EOS] == float("-inf") and out[1, EOS] == 0 and logits[0, EOS] == 0  # the input is untouched
    assert torch.equal(c.without_early_end(logits, min_tokens=0), logits)


def test_sampled_rows_reason_for_at_least_the_minimum(tiny_lm):
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["renal colic"])
    for t in sample_traces(tiny_lm, case, SamplingConfig(k=4, max_new_tokens=12, min_reasoning_tokens=8, seed=3, temperature=2.0)):
        reasoning = t.loss_mask.index(0) if 0 in t.loss_mask else len(t.completion_ids)
        assert reasoning >= 8


def test_a_stream_stopped_by_its_caller_returns_the_finished_rows_whole(tiny_lm, monkeypatch):
    # row 0 samples its end token at the third step, so it concludes while the others reason;
    # the caller, content with it, stops the batch: only row 0 comes back, concluded, exact
    import rlhf_core.rollout.generation as generation

    eos, original, calls = tiny_lm.tokenizer.eos_token_id, generation.sample_next, []

    def sample_next(logits, *args):
        tokens = original(logits, *args)
        calls.append(1)
        if len(calls) == 3:
            tokens[0] = eos
        return tokens

    monkeypatch.setattr(generation, "sample_next", sample_next)
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    config = SamplingConfig(k=4, max_new_tokens=30, seed=3, stream_every=2, min_reasoning_tokens=0)
    stream = generation.sample_stream(tiny_lm, case, config)
    update = next(stream)
    while not any(update.complete):
        update = stream.send(False)  # watching the rows: they are concluded as they finish
    assert update.complete == [True, False, False, False] and update.new_tokens == 4
    assert any(update.texts[0].endswith("Final diagnosis: " + n) for n in candidates(case))
    final = stream.send(True)
    assert final.traces is not None and len(final.traces) == 1
    (trace,) = final.traces
    assert trace.text == update.texts[0] and trace.finish_reason == "conclusion"
    assert trace.conclusion["trigger"] == "eos" and trace.conclusion["chosen_text"] in candidates(case)
    assert len(trace.completion_ids) == len(trace.old_logps) == len(trace.ref_logps) == len(trace.loss_mask)
    batch = collate(trace.prompt_ids, [trace.completion_ids], tiny_lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        fresh = completion_logps(tiny_lm.model, batch)
    assert torch.allclose(fresh[0, : len(trace.completion_ids)], torch.tensor(trace.old_logps), atol=1e-5)
    with pytest.raises(StopIteration):
        next(stream)


def test_a_stream_nobody_watches_concludes_every_row_at_the_end(tiny_lm, monkeypatch):
    # plain iteration: no conclusion pass before the last step, one for all rows after it
    import rlhf_core.rollout.generation as generation

    passes, original = [], generation.score_branches
    monkeypatch.setattr(generation, "score_branches", lambda *a, **kw: passes.append(len(a[2])) or original(*a, **kw))
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    updates = list(generation.sample_stream(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=12, seed=3, stream_every=2)))
    assert passes == [3] and not any(any(u.complete) for u in updates[:-1])
    assert len(updates[-1].traces) == 3 and all(t.finish_reason == "conclusion" for t in updates[-1].traces)



@pytest.mark.parametrize("draw", ["arithmetic", "independent"])
def test_a_batchs_conclusions_are_drawn_at_evenly_spread_codes(tiny_lm, draw):
    case = Case(id="t", question="Q?", answer="acute appendicitis", distractors=["mesenteric adenitis", "renal colic"])
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=6, max_new_tokens=8, seed=9, conclusion_draw=draw))
    records = [t.conclusion for t in traces]
    assert {r["draw"] for r in records} == {draw}
    if draw == "independent":
        assert {r["code"] for r in records} == {None}
        return
    codes = sorted(r["code"] for r in records)
    assert [b - a for a, b in zip(codes, codes[1:])] == pytest.approx([1 / 6] * 5, abs=1e-5)
    for r in records:  # each row concluded with the candidate whose share of its own CDF holds its code
        cdf = torch.tensor(r["probabilities"], dtype=torch.float64).cumsum(0)
        low = 0.0 if r["chosen"] == 0 else float(cdf[r["chosen"] - 1])
        assert low - 1e-5 <= r["code"] < float(cdf[r["chosen"]]) + 1e-5
    with pytest.raises(ValueError, match="conclusion_draw"):
        SamplingConfig(conclusion_draw="stratified")
