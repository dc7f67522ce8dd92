"""What the model believes (teacher-forced candidate probabilities), the probe set
scored after each update, and the charts that show them honestly."""
import math

import pytest
import torch

from rlhf_core.belief import (
    ProbeSet, _common_prefix, _continuations, belief, beliefs, correct_index, policy_logps, probe_kl, reference_kl,
)
from rlhf_core.clinical.cases import Case
from rlhf_core.rollout.conclusion import candidates
from rlhf_core.engine import Engine
from rlhf_core.rollout.records import Trace
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.rollout.prompts import build_messages, encode_prompt
from rlhf_core.training.update import DPOConfig
from ui import charts

CASE = Case(id="b-mi", question="Crushing chest pain, ST elevation. Diagnosis?", answer="myocardial infarction",
            distractors=["pericarditis", "aortic dissection", "pulmonary embolism"])
MC = Case(id="b-mc", question="Which organism?", answer="Klebsiella", options=["E. coli", "Klebsiella", "Proteus"],
          answer_idx=1)


@pytest.fixture(scope="module")
def engine():
    return Engine("tiny-random", device="cpu")


def test_belief_is_a_distribution_over_the_candidates_and_matches_a_plain_forward(engine):
    lm = engine.lm
    found = belief(lm, CASE)
    assert found["names"] == candidates(CASE) and math.isclose(sum(found["probs"]), 1.0, rel_tol=1e-9)
    assert found["names"][found["correct"]] == "myocardial infarction"
    assert belief(lm, CASE) == found  # deterministic: scored, not sampled
    # the shared-prompt cache gives what one full forward per candidate gives
    prompt = encode_prompt(lm.tokenizer, build_messages(CASE))
    scaffold = len(lm.tokenizer.encode("\nFinal diagnosis:", add_special_tokens=False))
    with torch.no_grad():
        per_token = []
        for seq in _continuations(lm, found["names"]):
            lps = completion_logps(lm.model, collate(prompt, [seq], lm.tokenizer.pad_token_id, "cpu"))[0]
            per_token.append(float(lps[scaffold:].mean()))
    expected = torch.softmax(torch.tensor(per_token, dtype=torch.float64), 0).tolist()
    assert found["probs"] == pytest.approx(expected, abs=1e-4)
    mc = belief(lm, MC)
    assert mc["names"][mc["correct"]] == "B. Klebsiella" and correct_index(MC, mc["names"]) == 1


def _conclusion_traces(lm, case, version=0):
    """Two traces that only conclude: the right diagnosis, then a distractor."""
    prompt = encode_prompt(lm.tokenizer, build_messages(case))
    names = candidates(case)
    right = correct_index(case, names)
    wrong = next(i for i in range(len(names)) if i != right)
    seqs = _continuations(lm, [names[right], names[wrong]])
    with torch.no_grad():
        logps = completion_logps(lm.model, collate(prompt, seqs, lm.tokenizer.pad_token_id, "cpu"))
    return [Trace(case_id=case.id, prompt_ids=prompt, completion_ids=s, text=f"t{i}", finish_reason="eos",
                  old_logps=logps[i, : len(s)].tolist(), ref_logps=logps[i, : len(s)].tolist(),
                  policy_version=version, trace_id=f"{case.id}-{i}") for i, s in enumerate(seqs)]


def test_the_probe_sees_a_ranking_move_the_taught_case_and_measures_kl_from_the_reference():
    engine = Engine("tiny-random", device="cpu")
    lm = engine.lm
    heldout = Case(id="b-held", question="Fever and neck stiffness. Diagnosis?", answer="meningitis",
                   distractors=["migraine", "sinusitis"])
    engine.probe = ProbeSet(heldout=[heldout], max_taught=2)
    before = belief(lm, CASE)["p_correct"]
    traces = _conclusion_traces(lm, CASE)
    first = engine.update(traces, [0, 1], DPOConfig(steps=2, lr=1e-3), case=CASE)
    assert [c.id for c in engine.probe.taught] == [CASE.id]
    assert first["probe/taught_p_correct"] > before  # the clinician's first choice gained belief
    assert set(first) >= {"probe/heldout_p_correct", "probe/heldout_top1", "probe/taught_top1", "probe/kl",
                          "probe/seconds"}
    second = engine.update(_conclusion_traces(lm, CASE, 1), [0, 1], DPOConfig(steps=2, lr=1e-3), case=CASE)
    assert second["probe/kl"] > first["probe/kl"] > 0  # cumulative: same fixed traces, further from the reference
    assert second["probe/kl"] == pytest.approx(probe_kl(lm, list(engine.probe.completions.values())), rel=1e-6)
    assert second["probe/taught_p_correct"] > first["probe/taught_p_correct"]
    assert first["trace_logratio"][0] > 0 > first["trace_logratio"][1]  # chosen more likely, rejected less


def test_fixed_completions_scored_from_the_belief_pass_equal_their_own_forward(engine):
    """The probe's KL reuses the belief's prompt pass: same log-probs as a forward with the prompt."""
    lm = engine.lm
    traces = _conclusion_traces(lm, CASE)
    traces[1].loss_mask = [0] * 3 + [1] * (len(traces[1].completion_ids) - 3)  # an inserted scaffold
    shared = belief(lm, CASE, completions=traces)["completion_logps"]
    own = policy_logps(lm, traces)
    for t, a, b in zip(traces, shared, own):
        counted = [i for i in range(len(a)) if not t.loss_mask or t.loss_mask[i]]
        assert [a[i] for i in counted] == pytest.approx([b[i] for i in counted], abs=1e-4)
    # at the reference, KL(reference || policy) is 0; a policy moved by +0.5 nats on one token is not
    assert reference_kl([t.ref_logps for t in traces], own, [t.loss_mask for t in traces]) == pytest.approx(0, abs=1e-5)
    moved = [list(lp) for lp in own]
    moved[1][0] += 0.5  # masked out: counts nothing
    assert reference_kl([t.ref_logps for t in traces], moved, [t.loss_mask for t in traces]) == pytest.approx(0, abs=1e-5)
    moved[0][0] += 0.5
    counted = len(traces[0].completion_ids) + sum(traces[1].loss_mask)
    expected = (math.exp(0.5) - 0.5 - 1) / counted
    assert reference_kl([t.ref_logps for t in traces], moved, [t.loss_mask for t in traces]) == pytest.approx(expected, rel=1e-3)


def test_cases_scored_in_one_batch_believe_what_each_alone_believes(engine):
    """The probe scores every case together: the system prompt once, the prompts' rests as
    right-padded rows, each case's own candidates and completions: nothing leaks between rows."""
    lm = engine.lm
    other = Case(id="b-other", question="Fever and neck stiffness. Diagnosis?", answer="meningitis",
                 distractors=["migraine", "sinusitis"])
    prompts = [encode_prompt(lm.tokenizer, build_messages(c)) for c in (CASE, other, MC)]
    shared = _common_prefix(prompts)
    assert 0 < shared < min(map(len, prompts)) and len({len(p) for p in prompts}) > 1  # really padded rows
    assert all(p[:shared] == prompts[0][:shared] for p in prompts) and _common_prefix(prompts[:1]) == 0
    traces = _conclusion_traces(lm, CASE)
    together = beliefs(lm, [other, CASE, MC], completions=[[], traces, []])
    for case, found in zip((other, CASE, MC), together):
        alone = belief(lm, case, completions=traces if case is CASE else ())
        assert found["names"] == alone["names"] and found["probs"] == pytest.approx(alone["probs"], abs=1e-5)
        assert len(found["completion_logps"]) == len(alone["completion_logps"])
        for a, b in zip(found["completion_logps"], alone["completion_logps"]):
            assert a == pytest.approx(b, abs=1e-4)
    with pytest.raises(ValueError, match="must continue its prompt"):
        beliefs(lm, [other], completions=[traces])


def _rows(*updates):
    return [{"kind": "update", "run": 1, "x": u["version"], **u} for u in updates]


def test_the_charts_keep_objectives_apart_and_share_one_version_axis():
    rows = _rows({"version": 1, "algorithm": "dpo", "loss": 0.49, "kl": 0.6, "probe/kl": 0.01},
                 {"version": 2, "algorithm": "grpo", "loss": -0.016, "kl": 0.007, "probe/kl": 0.02,
                  "clip_ratio": 0.1, "reward": 0.5})
    rows.append({"kind": "generation", "run": 1, "x": 0, "version": 0, "acceptance_rate": 0.25})
    figs = charts.all_figures(rows)
    loss = {t.name: (list(t.x), t.yaxis) for t in figs["loss"].data}
    assert loss == {"DPO loss": ([1], "y"), "GRPO loss": ([2], "y2")}  # never one line across objectives
    kl = {t.name: list(t.y) for t in figs["kl"].data}
    assert kl["on the taught probe traces (fixed)"] == [0.01, 0.02]
    assert all("GRPO mean reward" != t.name for f in figs.values() for t in f.data)
    spans = {tuple(f.layout.xaxis.range) for name, f in figs.items() if f.data}
    assert spans == {(-0.35, 2.35)}  # every chart: the same version axis
    assert all(f.layout.legend.y < 0 for f in figs.values())  # legends under the plot, never over it


def test_the_belief_chart_marks_the_answer_and_shows_both_policies(engine):
    ref = belief(engine.lm, CASE, reference=True)
    fig = charts.belief_figure(ref, ref, 0)
    assert [t.name for t in fig.data] == ["reference (v0)", "policy now (v0)"]
    assert sum(label.startswith("✓") for label in fig.data[0].y) == 1
    assert "P(correct)" in fig.layout.title.text
