import pytest

from rlhf_core.rollout.generation import GenerationUpdate, SamplingConfig, sample_stream

from rlhf_core.rollout.records import Trace
from rlhf_core.rollout.sampler import RejectionConfig, sample_verified, sample_verified_stream

WHY = "The history, the examination and the blood tests together point one way, and the timing fits. "
RIGHT = WHY + "Fever and RLQ pain with rebound.\nFinal diagnosis: acute appendicitis"
RIGHT_2 = WHY + "Migratory pain to McBurney's point.\nFinal diagnosis: appendicitis"
RIGHT_3 = WHY + "Classic history and leukocytosis.\n**Final diagnosis:** Acute appendicitis."
WRONG = WHY + "Could be lymph nodes.\nFinal diagnosis: mesenteric adenitis"
NONE = "The patient needs imaging."
TERSE = "RLQ pain.\nFinal diagnosis: acute appendicitis"  # the right answer without reasoning
LOOP = "The pain is in the right lower quadrant. " * 4 + "\nFinal diagnosis: acute appendicitis"


class ScriptedGenerator:
    """Stands in for the model: yields the given texts batch by batch, recording hints."""

    def __init__(self, batches, hinted_batches=()):
        self.batches = list(batches)
        self.hinted = list(hinted_batches)
        self.calls = []

    def __call__(self, case, config, hint):
        self.calls.append((config.k, hint, config.seed))
        source = self.hinted if hint else self.batches
        texts = source.pop(0)[: config.k]
        yield GenerationUpdate([t[:5] for t in texts], [False] * len(texts), 1)
        traces = [Trace(case.id, [1, 2], [3, 4], t, "eos", [-1.0, -1.0], [-1.0, -1.0], 0, rationalised=bool(hint)) for t in texts]
        yield GenerationUpdate(texts, [True] * len(texts), 2, traces=traces)


def test_stops_as_soon_as_k_distinct_accepted(case):
    gen = ScriptedGenerator([[RIGHT, WRONG, RIGHT_2, NONE], [RIGHT_3, WRONG, WRONG, WRONG]])
    result = sample_verified(gen, case, SamplingConfig(k=4, seed=10), RejectionConfig(batch=1, k=3, budget=12))
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2, RIGHT_3]
    r = result.report
    assert (r.sampled, r.accepted, r.rejected) == (8, 3, 5)
    assert r.sampled == r.accepted + r.rejected == len(result.all_traces)
    assert dict(r.rejected_by_reason) == {"distractor": 4, "no_conclusion": 1}
    assert sum(r.rejected_by_reason.values()) == r.rejected
    assert r.acceptance_rate == 3 / 8
    assert [c[2] for c in gen.calls] == [10, 11]  # each batch gets its own seed
    assert all(t.verdict and t.safety for t in result.all_traces)


def test_duplicates_are_rejected_with_their_own_reason(case):
    gen = ScriptedGenerator([[RIGHT, RIGHT, RIGHT.upper().replace("\n", "  \n "), RIGHT_2]])
    result = sample_verified(gen, case, SamplingConfig(k=4), RejectionConfig(batch=1, k=2, budget=4, rationalise=False))
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2]
    assert result.report.rejected_by_reason["duplicate"] == 2
    assert result.report.sampled == result.report.accepted + result.report.rejected


def test_budget_spent_fills_up_with_labelled_rationalised_traces(case):
    gen = ScriptedGenerator([[WRONG, NONE], [RIGHT, WRONG]], hinted_batches=[[RIGHT_2, WRONG], [RIGHT_3, RIGHT]])
    result = sample_verified(gen, case, SamplingConfig(k=2), RejectionConfig(batch=1, k=3, budget=4, rationalise_budget=4))
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2, RIGHT_3]
    assert [t.rationalised for t in result.accepted] == [False, True, True]
    r = result.report
    assert (r.sampled, r.accepted, r.rejected) == (4, 1, 3)
    assert (r.rationalised_sampled, r.rationalised_accepted, r.rationalised_rejected) == (4, 2, 2)
    assert r.acceptance_rate == 0.25  # hinted samples never inflate the charted rate
    assert [hint for _, hint, _ in gen.calls] == [None, None, case.answer, case.answer]
    # the text of every trace is exactly what the generator produced: nothing appended
    assert {t.text for t in result.all_traces} <= {RIGHT, RIGHT_2, RIGHT_3, WRONG, NONE}


def test_no_rationalising_when_disabled_and_budget_respected(case):
    gen = ScriptedGenerator([[WRONG, WRONG, WRONG], [NONE, NONE, NONE]])
    result = sample_verified(gen, case, SamplingConfig(k=3), RejectionConfig(batch=1, k=2, budget=5, rationalise=False))
    assert result.accepted == [] and result.report.sampled == 5
    assert [k for k, _, _ in gen.calls] == [3, 2]


def test_stream_reports_progress_over_the_whole_run(case):
    gen = ScriptedGenerator([[WRONG, NONE], [RIGHT, RIGHT_2]])
    events = list(sample_verified_stream(gen, case, SamplingConfig(k=2), RejectionConfig(batch=1, k=2, budget=6)))
    assert events[-1].phase == "done"
    assert [e.samples_done for e in events] == sorted(e.samples_done for e in events)
    assert events[-1].samples_planned == 6 + RejectionConfig().rationalise_budget
    assert any(e.partial_texts and e.samples_done == 0 for e in events)


def test_real_tiny_model_accounting(tiny_lm, case):
    def generate(c, config, hint):
        return sample_stream(tiny_lm, c, config, 0, hint=hint)

    result = sample_verified(generate, case, SamplingConfig(k=2, max_new_tokens=8, seed=0), RejectionConfig(batch=1, k=2, budget=4, rationalise_budget=2))
    r = result.report
    assert r.sampled == 4 and r.rationalised_sampled == 2
    assert r.sampled == r.accepted + r.rejected
    assert sum(r.rejected_by_reason.values()) == r.rejected
    assert len(result.all_traces) == 6


def test_samples_are_decoded_in_batches_of_max_k_batch_within_the_budget(case):
    gen = ScriptedGenerator([[WRONG] * 8, [NONE] * 8], hinted_batches=[[RIGHT, RIGHT_2, RIGHT_3, WRONG] * 2])
    result = sample_verified(gen, case, SamplingConfig(k=4, seed=5), RejectionConfig(k=3, budget=11, rationalise_budget=8, batch=8))
    # free samples: one batch of 8, then the 3 left of the budget; hinted: one batch of 8
    assert gen.calls == [(8, None, 5), (3, None, 6), (8, case.answer, 7)]
    assert result.report.sampled == 11 and result.report.rationalised_sampled == 8
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2, RIGHT_3]
    with pytest.raises(ValueError, match="batch must be between 1 and 64"):
        RejectionConfig(batch=0)


def test_correct_conclusions_without_reasoning_worth_ranking_are_rejected(case):
    gen = ScriptedGenerator([[TERSE, LOOP, RIGHT, WRONG]])
    result = sample_verified(gen, case, SamplingConfig(k=4, seed=1), RejectionConfig(k=2, budget=4, rationalise=False))
    codes = [t.verdict["code"] for t in result.all_traces]
    assert codes == ["no_reasoning", "repetition", "accepted", "distractor"]
    assert "correct diagnosis, but" in result.all_traces[0].verdict["reason"]
    assert [t.text for t in result.accepted] == [RIGHT]


def test_rationalised_traces_that_restate_the_hint_are_rejected(case):
    hinted = WHY + "As the hint says, the correct diagnosis is acute appendicitis.\nFinal diagnosis: acute appendicitis"
    gen = ScriptedGenerator([[NONE] * 4], hinted_batches=[[hinted, RIGHT, RIGHT_2, TERSE]])
    result = sample_verified(gen, case, SamplingConfig(k=4, seed=1), RejectionConfig(k=2, budget=4, rationalise_budget=4))
    hint_trace = next(t for t in result.all_traces if t.text == hinted)
    assert hint_trace.verdict["code"] == "restates_hint"
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2]


def test_rejected_traces_are_offered_below_the_line_most_useful_first(case):
    gen = ScriptedGenerator([[NONE, WRONG, RIGHT, NONE, TERSE, WRONG + " "]])
    result = sample_verified(gen, case, SamplingConfig(k=6, seed=1),
                             RejectionConfig(k=2, budget=6, rationalise=False, negatives=3))
    assert [t.text for t in result.accepted] == [RIGHT]
    # a wrong conclusion first; duplicates of each other (by text) only once
    assert [t.verdict["code"] for t in result.negatives] == ["distractor", "no_conclusion", "no_reasoning"]
    assert all(not t.verdict["accepted"] for t in result.negatives)
    none = sample_verified(ScriptedGenerator([[NONE, WRONG, RIGHT]]), case, SamplingConfig(k=3, seed=1),
                           RejectionConfig(k=2, budget=3, rationalise=False, negatives=0))
    assert none.negatives == []


class StoppableGenerator:
    """A batch whose rows finish one per update (as ``sample_stream`` reports them); a caller
    that sends True gets the finished rows only, as the real stream gives them."""

    def __init__(self, texts):
        self.texts, self.stopped_after = texts, None

    def __call__(self, case, config, hint):
        texts = self.texts[: config.k]
        for n in range(1, len(texts)):
            complete = [i < n for i in range(len(texts))]
            if (yield GenerationUpdate(list(texts), complete, n, complete=complete)):
                self.stopped_after = n
                texts = texts[:n]
                break
        traces = [Trace(case.id, [1, 2], [3, 4], t, "conclusion", [-1.0, -1.0], [-1.0, -1.0], 0) for t in texts]
        yield GenerationUpdate(texts, [True] * len(texts), 9, traces=traces, complete=[True] * len(texts))


def test_a_batch_stops_as_soon_as_the_run_has_k_and_drops_the_rows_still_reasoning(case):
    # rows finish in order: RIGHT, WRONG, RIGHT again (a duplicate does not count), RIGHT_2: K = 2 reached at the 4th
    gen = StoppableGenerator([RIGHT, WRONG, RIGHT, RIGHT_2, RIGHT_3, WRONG, NONE, WRONG])
    result = sample_verified(gen, case, SamplingConfig(k=8, seed=1), RejectionConfig(k=2, budget=8, batch=8))
    assert gen.stopped_after == 4
    assert [t.text for t in result.accepted] == [RIGHT, RIGHT_2]
    assert [t.verdict["code"] for t in result.all_traces] == ["accepted", "distractor", "duplicate", "accepted"]
    assert result.report.cut_short == 4 and result.report.sampled == 4
    # a run that never has K decodes its whole batch
    whole = StoppableGenerator([WRONG, RIGHT, NONE, WRONG])
    result = sample_verified(whole, case, SamplingConfig(k=4, seed=1), RejectionConfig(k=2, budget=4, rationalise=False))
    assert whole.stopped_after is None and result.report.sampled == 4 and result.report.cut_short == 0


def test_an_accepted_trace_whose_reasoning_first_concluded_a_distractor_is_kept_and_flagged(case):
    changed = WHY + "The most likely diagnosis is mesenteric adenitis. Yet the pain migrated.\nFinal diagnosis: acute appendicitis"
    gen = ScriptedGenerator([[changed, RIGHT, WRONG, NONE]])
    result = sample_verified(gen, case, SamplingConfig(k=4, seed=1), RejectionConfig(k=2, budget=4, rationalise=False))
    flagged, plain = result.accepted
    assert flagged.text == changed and flagged.verdict["accepted"]
    assert flagged.verdict["earlier_conclusion"] == "mesenteric adenitis"
    assert "first concluded 'mesenteric adenitis'" in flagged.verdict["reason"]
    assert "earlier_conclusion" not in plain.verdict
    # a rejected trace is not flagged: its own conclusion already rejects it
    assert all("earlier_conclusion" not in t.verdict for t in result.all_traces if not t.verdict["accepted"])
