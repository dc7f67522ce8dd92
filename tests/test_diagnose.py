"""The diagnosis report: un-hinted acceptance and rejection reasons per case and overall."""
import json

import pytest

from rlhf_core.clinical.cases import Case, save_cases_jsonl
from rlhf_core.cli import main
from rlhf_core.diagnose import diagnose, format_report
from rlhf_core.rollout.generation import SamplingConfig

FREE = Case(id="free", question="RLQ pain and fever. Diagnosis?", answer="acute appendicitis",
            distractors=["renal colic", "ovarian torsion"])
MC = Case(id="mc", question="Chest pain. Diagnosis?", answer="Pulmonary embolism",
          options=["Pneumonia", "Pulmonary embolism", "Pneumothorax"], answer_idx=1)


def test_report_counts_every_sample_once_per_case_and_kind(tiny_lm):
    report = diagnose(tiny_lm, [FREE, MC], samples=3, sampling=SamplingConfig(max_new_tokens=6), seed=1,
                      with_traces=True)
    assert [r["case_id"] for r in report["cases"]] == ["free", "mc"]
    assert [r["kind"] for r in report["cases"]] == ["free_text", "multiple_choice"]
    for row in report["cases"]:
        assert row["sampled"] == 3 == len(row["traces"])
        assert row["accepted"] + sum(row["rejected_by_reason"].values()) == 3
        assert sum(row["conclusion_triggers"].values()) == 3
        assert row["concluded"] == 3  # the constrained conclusion always gives the verifier a line to judge
        assert 0 <= row["belief_at_conclusion"] <= 1
    overall = report["overall"]
    assert overall["sampled"] == 6 and overall["cases"] == 2
    assert overall["accepted"] == report["free_text"]["accepted"] + report["multiple_choice"]["accepted"]
    assert overall["acceptance"] == overall["accepted"] / 6
    # tiny-random writes a few random bytes: a right conclusion has no reasoning before it
    assert all(t["verdict"]["code"] != "accepted" for r in report["cases"] for t in r["traces"])
    table = format_report(report)
    assert "overall" in table and "multiple_choice" in table and "free" in table


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    cases = save_cases_jsonl([FREE, MC], tmp_path / "cases.jsonl")
    out = tmp_path / "report.json"
    assert main(["diagnose", "--model", "tiny-random", "--device", "cpu", "--cases", str(cases), "--samples", "2",
                 "--max-new-tokens", "4", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "free" in printed and "mc" in printed and "rejections:" in printed
    report = json.loads(out.read_text())
    assert report["overall"]["sampled"] == 4 and report["settings"]["conclusion"] == "constrained"
    assert main(["diagnose", "--model", "tiny-random", "--device", "cpu", "--cases", str(cases), "--samples", "2",
                 "--max-new-tokens", "4", "--conclusion", "free", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["overall"]["concluded"] == 0  # random bytes never write a conclusion of their own


def _concluded(reasoning: str, chosen: str, probs: list[float], names: list[str]):
    from types import SimpleNamespace

    from rlhf_core.rollout.sampler import judge

    text = f"{reasoning}\nFinal diagnosis: {chosen}"
    return SimpleNamespace(text=text, rationalised=False, verdict=judge(text, FREE), conclusion={
        "constrained": True, "candidates": names, "probabilities": probs, "chosen_text": chosen})


REASONING = ("Key findings: right lower quadrant pain with fever and rebound tenderness in a young adult. "
             "Differential: appendicitis, renal colic, ovarian torsion. The localised peritonism and fever "
             "favour inflammation of the appendix over a stone or torsion.")


def test_the_expected_outcome_counts_the_chance_the_conclusion_draw_gave_the_right_answer():
    from rlhf_core.diagnose import _accepting_share, _chance_of_an_accepted_trace

    def _acceptance_chance(case, trace):  # the width of its accepting share
        return _accepting_share(case, trace)[1]

    names = ["renal colic", "acute appendicitis", "ovarian torsion"]
    wrong = _concluded(REASONING, "renal colic", [0.5, 0.2, 0.3], names)
    assert wrong.verdict["code"] == "distractor"
    assert _acceptance_chance(FREE, wrong) == 0.2  # the right answer had a 20% chance at this conclusion
    right = _concluded(REASONING, "acute appendicitis", [0.5, 0.2, 0.3], names)
    assert right.verdict["accepted"] and _acceptance_chance(FREE, right) == 0.2
    # a trace whose reasoning the degenerate filter rejects had no chance, whatever it concluded
    bare = _concluded("Pain.", "renal colic", [0.1, 0.8, 0.1], names)
    assert _acceptance_chance(FREE, bare) == 0.0
    # a conclusion the model wrote itself (free mode) counts what happened
    free = _concluded(REASONING, "acute appendicitis", [], [])
    assert _acceptance_chance(FREE, free) == 1.0
    assert _chance_of_an_accepted_trace([0.5, 0.5]) == 0.75 and _chance_of_an_accepted_trace([]) == 0.0


def test_with_evenly_spread_codes_the_chance_of_an_accepted_trace_is_the_union_of_arcs():
    from rlhf_core.diagnose import _accepting_share, _chance_of_an_accepted_trace_in, _chance_with_codes

    # two rows, each accepted on half its CDF: independent draws give 3/4; codes half a turn
    # apart make one of them land on the accepting half whatever the offset
    assert _chance_with_codes([(0.0, 0.5), (0.0, 0.5)], [0.0, 0.5]) == pytest.approx(1.0)
    assert _chance_with_codes([(0.0, 0.5), (0.0, 0.5)], [0.0, 0.0]) == pytest.approx(0.5)  # the same code: one arc
    # (low, width) shares: an arc that wraps past 1 ([0.9, 1.2)) and one inside its wrapped part ([0.1, 0.2))
    assert _chance_with_codes([(0.0, 0.3), (0.1, 0.1)], [0.1, 0.0]) == pytest.approx(0.3)
    assert _chance_with_codes([(0.0, 0.3), (0.1, 0.1)], [0.1, 0.5]) == pytest.approx(0.4)  # [0.6, 0.7) apart
    assert _chance_with_codes([(0.2, 0.0)], [0.4]) == 0.0 and _chance_with_codes([], []) == 0.0
    assert _chance_with_codes([(0.0, 1.0)], [0.3]) == 1.0
    names = ["renal colic", "acute appendicitis", "ovarian torsion"]
    # the correct candidate holds [0.5, 0.7) of each row's CDF; codes 0.25 apart, four rows
    rows = [_concluded(REASONING, "renal colic", [0.5, 0.2, 0.3], names) for _ in range(4)]
    for j, t in enumerate(rows):
        t.conclusion["code"] = j / 4
    def chance():
        return _chance_of_an_accepted_trace_in([_accepting_share(FREE, t) for t in rows],
                                               [t.conclusion["code"] for t in rows])

    assert chance() == pytest.approx(0.8)  # 4 arcs of 0.2, disjoint
    for t in rows:
        t.conclusion["code"] = None  # drawn independently: 1 - 0.8^4
    assert chance() == pytest.approx(1 - 0.8**4)


def test_the_report_counts_accepted_traces_whose_reasoning_first_concluded_another_candidate():
    from rlhf_core.diagnose import _case_row, _summary

    names = ["renal colic", "acute appendicitis", "ovarian torsion"]
    changed = _concluded(REASONING + " The most likely diagnosis is renal colic.", "acute appendicitis", [0.5, 0.2, 0.3], names)
    right = _concluded(REASONING, "acute appendicitis", [0.5, 0.2, 0.3], names)
    for t in (changed, right):
        t.completion_ids, t.finish_reason = [1, 2], "conclusion"
    row = _case_row(FREE, [changed, right])
    assert row["accepted"] == 2 and row["accepted_changing_mind"] == 1
    assert _summary([row])["accepted_changing_mind"] == 1


def test_the_report_gives_the_expected_outcomes_beside_the_observed(tiny_lm):
    report = diagnose(tiny_lm, [FREE, MC], samples=3, sampling=SamplingConfig(max_new_tokens=6), seed=1)
    for row in report["cases"]:
        assert row["expected_accepted"] == 0.0  # no reasoning before any conclusion: no chance at all
        assert row["chance_of_an_accepted_trace"] == 0.0
    assert report["overall"]["expected_acceptance"] == 0.0
    assert "expected over the conclusion draws" in format_report(report)
