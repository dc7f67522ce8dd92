"""Held-out split, statistics, and the reference-vs-policy comparison on tiny-random."""
import json

import pytest

from rlhf_core.clinical.cases import Case, save_cases_jsonl
from rlhf_core.cli import main
from rlhf_core.engine import Engine
from rlhf_core.evaluate import (
    compare_policies,
    format_table,
    heldout_comparison,
    newcombe_interval,
    split_cases,
    two_proportion_tests,
    wilson_interval,
)
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.training.update import DPOConfig


def _cases(n, prefix="c"):
    return [Case(id=f"{prefix}{i}", question=f"Case {i}: fever. Diagnosis?", answer="influenza") for i in range(n)]


def test_split_is_deterministic_and_stable_when_cases_are_added():
    cases = _cases(200)
    train, held = split_cases(cases, 0.2, seed=0)
    assert len(train) + len(held) == 200 and 20 <= len(held) <= 60
    assert split_cases(cases, 0.2, seed=0) == (train, held)
    assert split_cases(list(reversed(cases)), 0.2)[1] == list(reversed(held))  # order does not matter
    more = cases + _cases(50, prefix="new")
    held_more = {c.id for c in split_cases(more, 0.2)[1]}
    assert {c.id for c in held} <= held_more  # adding cases moves nobody
    assert {c.id for c in split_cases(cases, 0.2, seed=1)[1]} != {c.id for c in held}
    assert len(split_cases(_cases(2), 0.2)[1]) == 1  # never empty
    assert split_cases(_cases(5), 0.0)[1] == []
    with pytest.raises(ValueError):
        split_cases(cases, 1.0)


def test_statistics_match_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 0) == (0.0, 1.0)
    # Newcombe (1998), example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=1e-3) and hi == pytest.approx(0.3339, abs=1e-3)
    t = two_proportion_tests(9, 10, 2, 10)
    assert t["fisher_p"] == pytest.approx(0.005477, rel=1e-3) and t["chi2_p"] < 0.05
    zero = two_proportion_tests(0, 10, 0, 10)
    assert zero["fisher_p"] == 1.0 and zero["chi2_p"] == 1.0


@pytest.mark.parametrize("lora", [False, True])
def test_compare_policies_samples_the_reference_for_the_reference_arm(case, lora):
    engine = Engine("tiny-random", device="cpu", lora=lora)
    cases = [case, Case(id="t2", question="Chest pain. Diagnosis?", answer="myocardial infarction")]
    kw = dict(max_new_tokens=3, seed=3, keep_texts=True)
    before = compare_policies(engine, cases, 2, **kw)
    # same weights, same seeds: the two arms draw the same traces
    assert [r["text"] for r in before["traces"]["reference"]] == [r["text"] for r in before["traces"]["policy"]]
    traces = sample_traces(engine.lm, case, SamplingConfig(k=3, max_new_tokens=5, seed=0, temperature=1.5))
    for _ in range(2):  # max_kl: the guard-rail out of the way (lr 5e-2 on a random model moves it by ~1e6 nats)
        engine.update(traces, [0, 1, 2], DPOConfig(steps=3, lr=5e-2, max_kl=1e9))
    progress = []
    after = compare_policies(engine, cases, 2, on_progress=progress.append, **kw)
    assert [r["text"] for r in after["traces"]["reference"]] == [r["text"] for r in before["traces"]["reference"]]
    assert [r["text"] for r in after["traces"]["policy"]] != [r["text"] for r in before["traces"]["policy"]]
    assert len(progress) == 4 and progress[-1]["done"] == 4
    assert after["policy_version"] == 2 and after["reference"]["n"] == 4 and after["policy"]["n"] == 4
    # tiny-random writes random bytes: the verifier accepts nothing, so no difference
    assert after["reference"]["rate"] == 0 and after["tests"]["fisher_p"] == 1.0
    assert after["reference"]["ci"][0] == 0.0 and after["reference"]["ci"][1] > 0.3
    assert 0 <= after["policy"]["safety_mean"] <= 1
    json.dumps({k: v for k, v in after.items() if k != "traces"})  # plain JSON
    table = format_table(after)
    assert "reference" in table and "Fisher exact p" in table and "t2" in table
    # the paired likelihood A/B: same weights, identical beliefs; after the updates, the policy's differ
    same, moved = before["likelihood"], after["likelihood"]
    assert all(r["reference"] == r["policy"] for r in same["per_case"]) and same["p_correct"]["wilcoxon_p"] is None
    assert [r["reference"] for r in moved["per_case"]] == pytest.approx([r["reference"] for r in same["per_case"]])
    assert any(abs(r["policy"] - r["reference"]) > 1e-4 for r in moved["per_case"])
    assert moved["p_correct"]["n"] == 2 and 0 <= moved["p_correct"]["wilcoxon_p"] <= 1
    assert "P(correct diagnosis), teacher-forced, paired over 2 case(s)" in table


def test_paired_tests_by_hand():
    from rlhf_core.evaluate import paired_tests

    out = paired_tests([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert out["improved"] == 6 and out["mean_change"] == pytest.approx(0.1)
    assert out["sign_test_p"] == pytest.approx(2 / 64) and out["wilcoxon_p"] == pytest.approx(0.03125)


def test_heldout_comparison_and_cli(tmp_path, case):
    engine = Engine("tiny-random", device="cpu")
    cases = _cases(6)
    result = heldout_comparison(engine, cases, samples=1, max_new_tokens=3)
    assert result["split"]["total"] == 6 and result["cases"] == [c.id for c in split_cases(cases)[1]]

    traces = sample_traces(engine.lm, case, SamplingConfig(k=2, max_new_tokens=4, seed=0, temperature=1.5))
    engine.update(traces, [1, 0], DPOConfig(steps=1, lr=1e-2))
    ckpt = engine.save(tmp_path / "ckpt")
    path = save_cases_jsonl([case] + cases, tmp_path / "cases.jsonl")
    out = tmp_path / "eval.json"
    code = main([
        "evaluate", "--checkpoint", str(ckpt), "--cases", str(path), "--samples", "2", "--heldout-only",
        "--max-new-tokens", "3", "--json-out", str(out), "--db", str(tmp_path / "none.sqlite"), "--device", "cpu",
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-random" and data["policy_version"] == 1 and data["checkpoint"] == str(ckpt)
    assert data["cases"] == [c.id for c in split_cases([case] + cases)[1]]
    assert set(data["tests"]) >= {"fisher_p", "chi2", "chi2_p", "odds_ratio", "safety_welch_p"}
