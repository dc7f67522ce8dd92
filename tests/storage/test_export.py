"""Exports (TRL pairs, rankings, agreement), import round trips, and the CLI."""
import json
import zipfile

import pytest

from rlhf_core.cli import build_parser, main
from rlhf_core.storage.export import (
    agreement,
    agreement_summary,
    checkpoint_archive,
    export,
    export_file,
    kendall_tau,
    plain_prompt,
)
from rlhf_core.rollout.records import Trace
from rlhf_core.storage.importer import import_file
from rlhf_core.rollout.prompts import build_messages
from rlhf_core.storage.store import Store


def _t(case, text, tid, rationalised=False):
    return Trace(
        case_id=case.id, prompt_ids=[1, 2], completion_ids=[3], text=text, finish_reason="eos",
        old_logps=[-1.0], ref_logps=[-1.0], policy_version=0, rationalised=rationalised, trace_id=tid,
        verdict={"accepted": True, "code": "accepted"}, safety={"score": 0.85, "violations": []},
    )


@pytest.fixture
def filled(tmp_path, case):
    """A store with: a 3-way ranking (one trace rationalised) ranked by two
    annotators, and a 2-way ranking in a second workspace."""
    s = Store(tmp_path / "rlhf.sqlite")
    s.ensure_workspace("default")
    s.create_workspace("other")
    a = _t(case, "Pain moved to the RLQ.\nFinal diagnosis: acute appendicitis", "ta")
    b = _t(case, "Final diagnosis: mesenteric adenitis", "tb")
    c = _t(case, "Hinted: Final diagnosis: appendicitis", "tc", rationalised=True)
    s.record_ranking("default", [a, b, c], [0, 2, 1], "dr-a", comments={"tb": "wrong"}, note="clear case", case=case, uid="r1")
    s.record_ranking("default", [a, b, c], [2, 0, 1], "dr-b", case=case, uid="r2")  # swaps the top two
    s.record_ranking("other", [_t(case, "short", "td"), _t(case, "long answer", "te")], [1, 0], "dr-c", case=case, uid="r3")
    yield s
    s.close()


def test_trl_export_loads_with_datasets_and_has_trl_shape(filled, tmp_path, case):
    out = tmp_path / "prefs.jsonl"
    n = export(filled, "trl", out)
    assert n == 3 + 3 + 1  # K(K-1)/2 pairs per ranking
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 7
    row = ds[0]
    assert row["prompt"] == build_messages(case)
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": "Pain moved to the RLQ.\nFinal diagnosis: acute appendicitis"}]
    assert row["rejected"] == [{"role": "assistant", "content": "Hinted: Final diagnosis: appendicitis"}]
    assert row["annotator"] == "dr-a" and row["case_id"] == case.id and row["rationalised"] is True
    assert (row["chosen_rank"], row["rejected_rank"]) == (1, 2)
    assert not {"images", "image", "tools", "chat_template_kwargs"} & set(ds.column_names)

    try:  # TRL's own reading of the row, when TRL is installed (it is not a requirement)
        from trl.data_utils import is_conversational
    except ImportError:
        pass
    else:
        assert is_conversational(row)

    text = tmp_path / "text.jsonl"
    export(filled, "trl-text", text, workspace="default", exclude_rationalised=True)
    rows = [json.loads(line) for line in text.read_text().splitlines()]
    assert len(rows) == 2 and all(not r["rationalised"] for r in rows)
    assert rows[0]["prompt"] == plain_prompt(build_messages(case)) and rows[0]["prompt"].endswith("Reasoning:\n")
    assert isinstance(rows[0]["chosen"], str) and isinstance(rows[0]["rejected"], str)


def test_rankings_export_and_import_round_trip(filled, tmp_path, case):
    first = tmp_path / "rankings.jsonl"
    assert export(filled, "rankings", first) == 3
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    r1 = rows[0]
    assert [t["trace_id"] for t in r1["traces"]] == ["ta", "tc", "tb"] and r1["traces"][1]["rationalised"]
    assert r1["comments"] == {"tb": "wrong"} and r1["note"] == "clear case" and r1["case"]["id"] == case.id
    assert r1["traces"][0]["verdict"]["accepted"] and r1["traces"][0]["safety"]["score"] == 0.85

    other = Store(tmp_path / "site-b.sqlite")
    counts = import_file(other, first, workspace="pooled")
    assert counts == {"rows": 3, "rankings_added": 3, "rankings_skipped": 0, "traces_added": 5}
    assert import_file(other, first, workspace="pooled")["rankings_added"] == 0  # twice adds nothing
    again = tmp_path / "again.jsonl"
    export(other, "rankings", again)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("workspace", "source", "status")}  # noqa: E731
    assert [strip(json.loads(x)) for x in again.read_text().splitlines()] == [strip(r) for r in rows]
    assert other.integrity_check() == "ok"

    # our own TRL pairs put the K-way rankings back together, and dedupe against them
    pairs = tmp_path / "pairs.jsonl"
    export(filled, "trl", pairs)
    third = Store(tmp_path / "site-c.sqlite")
    assert import_file(third, pairs, workspace="w")["rankings_added"] == 3
    assert [r["trace_ids"] for r in third.rankings("w")] == [r["trace_ids"] for r in filled.rankings()]
    assert import_file(third, first, workspace="w")["rankings_skipped"] == 3
    # the text form too (the prompt stays a plain string)
    text = tmp_path / "text.jsonl"
    export(filled, "trl-text", text)
    assert import_file(third, text, workspace="t")["rankings_added"] == 3


def test_foreign_pair_file_imports_as_two_way_rankings(tmp_path):
    path = tmp_path / "hub-prefs.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "Q1"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"prompt": "Q2", "chosen": "yes", "rejected": "no"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = Store(tmp_path / "db.sqlite")
    assert import_file(s, path, workspace="hub")["rankings_added"] == 2
    assert import_file(s, path, workspace="hub")["rankings_skipped"] == 2
    got = s.rankings("hub")
    assert {r["annotator"] for r in got} == {"import:hub-prefs.jsonl"}
    out = tmp_path / "out.jsonl"
    export(s, "trl", out)
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert back[0]["prompt"] == rows[0]["prompt"] and back[0]["chosen"] == rows[0]["chosen"]
    assert back[1]["prompt"] == [{"role": "user", "content": "Q2"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 1"):
        import_file(s, bad)


def test_kendall_tau_and_agreement(filled, tmp_path):
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [4, 1, 3, 0, 2], [1, 4, 0, 3, 2]
    assert kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau([a.index(i) for i in range(5)], [b.index(i) for i in range(5)]).statistic)
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 3])

    rows = agreement(filled)
    assert len(rows) == 1
    row = rows[0]
    assert row["annotators"] == ["dr-a", "dr-b"] and row["n_traces"] == 3 and row["workspace"] == "default"
    assert row["mean_tau"] == pytest.approx(1 / 3)  # one of three pairs swapped
    assert agreement_summary(rows) == {"groups": 1, "annotator_pairs": 1, "mean_tau": pytest.approx(1 / 3)}
    assert agreement(filled, "other") == []
    out = tmp_path / "agreement.jsonl"
    assert export(filled, "agreement", out) == 1
    assert json.loads(out.read_text())["pairs"][0]["tau"] == pytest.approx(1 / 3)


def test_downloads_and_cli(filled, tmp_path, capsys):
    path = export_file(filled, "trl", workspace="default")
    assert path.parent == filled.folder / "exports" and path.read_text().count("\n") == 6
    assert export_file(filled, "trl", workspace="default") != path  # never overwrites
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "manifest.json").write_text("{}")
    archive = checkpoint_archive(ck, tmp_path / "dl" / "ck.zip")
    assert zipfile.ZipFile(archive).namelist() == ["manifest.json"]
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint_archive(tmp_path)

    help_text = build_parser().format_help()
    for command in ("simulate", "export", "import", "evaluate", "workspaces", "train"):
        assert command in help_text
    db = str(filled.path)
    out = tmp_path / "cli.jsonl"
    assert main(["export", "--db", db, "--format", "rankings", "--out", str(out), "--workspace", "other"]) == 0
    assert out.read_text().count("\n") == 1
    assert main(["import", str(out), "--db", db, "--workspace", "copy"]) == 0
    assert json.loads(capsys.readouterr().out)["rankings_added"] == 1
    assert main(["export", "--db", str(tmp_path / "missing.sqlite"), "--out", str(out)]) == 2
    assert main(["workspaces", "--db", db, "--json"]) == 0
    assert {w["name"] for w in json.loads(capsys.readouterr().out)} == {"default", "other", "copy"}


def test_traces_below_the_line_export_tied_and_import_back_tied(tmp_path, case):
    s = Store(tmp_path / "rlhf.sqlite")
    s.ensure_workspace("default")
    a = _t(case, "Pain moved to the RLQ.\nFinal diagnosis: acute appendicitis", "ta")
    b = _t(case, "Rebound at McBurney's point.\nFinal diagnosis: appendicitis", "tb")
    wrong = [_t(case, "Final diagnosis: mesenteric adenitis", "tw"), _t(case, "Final diagnosis: renal colic", "tx")]
    for w in wrong:
        w.verdict = {"accepted": False, "code": "distractor"}
    s.record_ranking("default", [a, b, *wrong], [0, 1, 2, 3], "dr-a", case=case, uid="r1", ranked=2)
    s.record_ranking("default", [a, b, *wrong], [1, 0, 3, 2], "dr-b", case=case, uid="r2", ranked=2)
    [rec, _] = [json.loads(line) for line in _export_lines(s, "rankings", tmp_path)]
    assert [(t["trace_id"], t["rank"], t["below_the_line"]) for t in rec["traces"]] == [
        ("ta", 1, False), ("tb", 2, False), ("tw", 3, True), ("tx", 3, True)]
    pairs = [json.loads(line) for line in _export_lines(s, "trl", tmp_path)]
    assert {(p["chosen_trace_id"], p["rejected_trace_id"]) for p in pairs if p["ranking_uid"] == "r1"} == {
        ("ta", "tb"), ("ta", "tw"), ("ta", "tx"), ("tb", "tw"), ("tb", "tx")}  # the tied two are never paired
    # agreement compares the traces each annotator ordered, not the tie below the line
    [row] = agreement(s)
    assert row["pairs"][0]["tau"] == -1.0
    for fmt in ("rankings", "trl"):  # both formats come back with the same line
        other = Store(tmp_path / f"{fmt}.sqlite")
        path = tmp_path / f"{fmt}-export.jsonl"
        export(s, fmt, path)
        import_file(other, path)
        assert sorted(r["ranked"] for r in other.rankings("default")) == [2, 2], fmt
        other.close()
    s.close()


def _export_lines(store, fmt, tmp_path):
    path = tmp_path / f"{fmt}.jsonl"
    export(store, fmt, path)
    return path.read_text().splitlines()
