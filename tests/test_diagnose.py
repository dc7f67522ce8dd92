"""The diagnosis report: un-hinted acceptance and rejection reasons per case and overall."""
import json

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
