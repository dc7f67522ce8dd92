"""Hostile and careless files: case uploads and rankings imports.

Every file either loads completely or is refused with one CaseFormatError /
ValueError naming the file (and the line, when there is one); nothing is
half-imported; the database stays intact. The fuzzers are seeded, so a
failure reproduces with the printed seed.
"""
import json
import random
import time

import pytest

from rlhf_core.clinical.cases import MAX_OPTIONS, CaseFormatError, load_cases
from rlhf_core.rollout.conclusion import candidates
from rlhf_core.storage.export import export
from rlhf_core.rollout.records import Trace
from rlhf_core.storage.importer import import_file
from rlhf_core.rollout.prompts import build_messages
from rlhf_core.storage.store import Store, check_workspace_name

CASE = {"id": "c1", "question": "A 60-year-old with crushing chest pain. Diagnosis?", "answer": "myocardial infarction",
        "distractors": ["aortic dissection", "pericarditis"], "safety": {"emergency": True, "red_flags": ["ecg"]}}
MC = {"id": "m1", "question": "Which organism?", "options": ["E. coli", "Klebsiella", "Proteus"], "answer_idx": 1}

HOSTILE_VALUES = [
    None, True, 0, -1, 1e400, float("nan"), 10 ** 30, "", " ", "\u200b\u200d", "\u202e\u2066", "\ufeff", "\x00",
    "\ud800", "A", "Z", "(Q)", "a" * 25_000, "A. " + " " * 30_000 + "x", [], [1, 2], [[[[[[[[[[1]]]]]]]]]], {},
    {"A": "x"}, {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, "|".join("x" * 12),
    "\n".join(f"{chr(65 + i)}. opt {i}" for i in range(12)), "NaN", "Infinity", "1" * 5000, "cafe\u0301",
]
FIELDS = ["id", "question", "answer", "aliases", "distractors", "options", "answer_idx", "specialty", "icd10",
          "difficulty", "safety", "cop", "opa"]


def _dump(value) -> str:
    # allow_nan: the hostile NaN/Infinity must reach the file as a careless writer would put them there
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _hostile_case_file(rng: random.Random, tmp_path, n: int):
    """One malformed or hostile case file (JSON lines, JSON or CSV)."""
    kind = rng.choice(["jsonl", "json", "csv", "raw"])
    records = []
    for _ in range(rng.randint(1, 3)):
        rec = dict(rng.choice([CASE, MC]))
        for _ in range(rng.randint(1, 3)):
            rec[rng.choice(FIELDS)] = rng.choice(HOSTILE_VALUES)
        records.append(rec)
    if kind == "raw":
        chunks = [b"\xef\xbb\xbf" * rng.randint(0, 2), rng.choice([
            _nested(rng.choice([50, 1000, 5000])).encode(), b'{"id": "x", "question": "\xff\xfe", "answer": "y"}',
            b'{"id": 1' + b"9" * 5000 + b', "question": "q", "answer": "a"}',
            b'{"id": "x", "question": NaN, "answer": Infinity}', b'{"id": "x", "safety": ' + _nested(2000).encode() + b"}",
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
        ])]
        path = tmp_path / f"f{n}.jsonl"
        path.write_bytes(b"".join(chunks))
        return path
    if kind == "csv":
        columns = sorted({k for r in records for k in r})
        lines = [",".join(columns)]
        for r in records:
            cells = []
            for c in columns:
                v = r.get(c)
                text = v if isinstance(v, str) else _dump(v) if v is not None else ""
                cells.append('"' + text.replace('"', '""') + '"')
            lines.append(",".join(cells))
        bom = "\ufeff" * rng.randint(0, 2)
        path = tmp_path / f"f{n}.csv"
        path.write_bytes((bom + "\n".join(lines)).encode("utf-8", "surrogatepass"))
        return path
    text = "\n".join(_dump(r) for r in records) if kind == "jsonl" else _dump(records)
    if rng.random() < 0.2:
        text = text[: rng.randint(1, len(text))]  # truncated mid-record
    path = tmp_path / f"f{n}.{kind}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


@pytest.mark.filterwarnings("ignore::rlhf_core.clinical.cases.CaseFormatWarning")
def test_case_file_fuzzer_refuses_cleanly_and_fast(tmp_path):
    rng = random.Random(20261202)
    loaded = refused = 0
    slowest = 0.0
    for n in range(1000):
        path = _hostile_case_file(rng, tmp_path, n)
        started = time.perf_counter()
        try:
            cases = load_cases(path)
        except CaseFormatError as err:
            assert str(path) in str(err), (n, err)
            refused += 1
        else:
            loaded += 1
            for case in cases:  # whatever loads can be prompted, stored and shown
                build_messages(case)
                candidates(case)
                json.dumps(case.to_dict(), ensure_ascii=False).encode("utf-8")
                assert case.id.strip() and case.question.strip() and case.answer.strip()
                assert not case.options or len(case.options) <= MAX_OPTIONS
        slowest = max(slowest, time.perf_counter() - started)
        path.unlink()
    assert refused > 500 and loaded > 20, (refused, loaded)
    assert slowest < 2.0, slowest


def _write_jsonl(path, records):
    path.write_text("\n".join(_dump(r) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("value, words", [
    ("A. " + " " * 200_000 + "x", "characters long"),  # once quadratic: > 20 s
    ("x" * 60_000, "characters long"),
])
def test_long_option_lines_are_refused_before_any_pattern_runs(tmp_path, value, words):
    path = _write_jsonl(tmp_path / "long.jsonl", [{**MC, "options": value}])
    started = time.perf_counter()
    with pytest.raises(CaseFormatError, match=words):
        load_cases(path)
    assert time.perf_counter() - started < 1.0


def test_a_long_whitespace_run_inside_the_limit_parses_in_linear_time(tmp_path, monkeypatch):
    monkeypatch.setattr("rlhf_core.clinical.case_record.MAX_FIELD_CHARS", 400_000)
    path = _write_jsonl(tmp_path / "ws.jsonl", [{**MC, "options": "A. " + " " * 100_000 + "x\nB. y", "answer_idx": 0}])
    started = time.perf_counter()
    [case] = load_cases(path)
    assert case.options == ["x", "y"] and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("raw, words", [
    (_nested(1000), "nested too deeply"),
    ('{"id": "x", "question": "q", "answer": "a", "aliases": ' + _nested(20) + "}", "nested deeper"),
    ('{"id": "x", "question": "q", "answer": 1' + "0" * 5000 + "}", "unusable JSON"),
    ('{"id": "x", "question": "q", "answer": NaN}', "not a usable number"),
    ('{"id": "x", "question": "q", "answer": Infinity}', "not a usable number"),
    ('{"id": "x", "question": "q", "answer": 1e400}', "not a finite number"),
    ('{"id": 12345678901234567890123, "question": "q", "answer": "a"}', "more than 18 digits"),
    ('{"id": "\\u200b\\u200d", "question": "q", "answer": "a"}', None),  # an invisible id: derived one
    ('{"id": "x", "question": "\\u202e\\u2066 ", "answer": "a"}', "question has no visible text"),
    ('{"id": "x", "question": "q", "answer": "\\u200b"}', "missing answer"),
    ('{"id": "x", "question": "q\\ud800", "answer": "a"}', "lone UTF-16 surrogate"),
    ('{"id": "x", "question": "q", "options": ["a","b","c","d","e","f","g","h","i","j","k"], "answer_idx": 0}',
     f"more than the {MAX_OPTIONS}"),
])
def test_hostile_json_values_are_named(tmp_path, raw, words):
    path = tmp_path / "h.jsonl"
    path.write_text(raw + "\n", encoding="utf-8")
    if words is None:
        [case] = load_cases(path)
        assert case.id == "h-L1"
        return
    with pytest.raises(CaseFormatError, match=words) as info:
        load_cases(path)
    assert info.value.path == str(path) and info.value.line == 1


def test_deep_nesting_inside_a_csv_safety_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('id,question,answer,safety\nx,q,a,"' + '{""a"": ' * 1000 + "1" + "}" * 1000 + '"\n')
    with pytest.raises(CaseFormatError, match="row 2: safety is"):
        load_cases(path)


def test_look_alike_ids_are_one_id(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [
        {"id": "caf\u00e9", "question": "q", "answer": "a"},
        {"id": "cafe\u0301", "question": "q2", "answer": "b"}])
    with pytest.raises(CaseFormatError, match="line 2: duplicate id 'café'"):
        load_cases(path)
    path = _write_jsonl(tmp_path / "zw.jsonl", [
        {"id": "case-1", "question": "q", "answer": "a"}, {"id": "case\u200d-1", "question": "q2", "answer": "b"}])
    with pytest.raises(CaseFormatError, match="duplicate id 'case-1'"):
        load_cases(path)


def test_a_doubled_bom_keeps_the_csv_id_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff\ufeffid,question,answer\nmy-id,q,a\n").encode("utf-8"))
    [case] = load_cases(path)
    assert case.id == "my-id"


def test_names_with_a_trailing_newline_are_refused():
    assert check_workspace_name("ward-3") == "ward-3"
    with pytest.raises(ValueError):
        check_workspace_name("ward-3\n")


# --------------------------------------------------------------------------- imports


def _trace(tid, text, case_id="c1"):
    return Trace(case_id=case_id, prompt_ids=[1, 2], completion_ids=[3], text=text, finish_reason="eos",
                 old_logps=[-1.0], ref_logps=[-1.0], policy_version=0, trace_id=tid)


def _our_store(tmp_path) -> Store:
    store = Store(tmp_path / "ours.sqlite")
    store.ensure_workspace("default")
    store.record_ranking("default", [_trace("t1", "our text one"), _trace("t2", "our text two")], [0, 1], "dr-a",
                         prompt="our prompt")
    return store


def _snapshot(store: Store) -> tuple:
    return tuple(store.count(t) for t in ("rankings", "traces", "cases", "workspaces"))


def _ranking_row(uid="r-1", texts=("alpha", "beta"), ids=None, **extra):
    ids = ids or [None] * len(texts)
    return {"ranking_uid": uid, "prompt": "their prompt", "case_id": "their-case", "annotator": "dr-b",
            "traces": [{"trace_id": i, "rank": r + 1, "text": t} for r, (i, t) in enumerate(zip(ids, texts))], **extra}


def test_an_import_is_all_or_nothing(tmp_path):
    store = _our_store(tmp_path)
    before = _snapshot(store)
    rows = [_ranking_row("r-1"), _ranking_row("r-2", ("gamma", "delta")), {"prompt": "x", "chosen": "a"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match="bad.jsonl: line 3"):
        import_file(store, path)
    assert _snapshot(store) == before
    # a failure only the database finds (a ranking repeating one trace) also rolls back everything
    rows = [_ranking_row("r-1"), _ranking_row("r-2", ("same", "same"), ids=["x", "x"])]
    with pytest.raises(ValueError, match="line 2: .*nothing was imported"):
        import_file(store, _write_jsonl(tmp_path / "bad2.jsonl", rows))
    assert _snapshot(store) == before and store.integrity_check() == "ok"


def test_imported_ids_never_bind_to_our_texts(tmp_path):
    store = _our_store(tmp_path)
    path = _write_jsonl(tmp_path / "site-b.jsonl", [_ranking_row("r-b", ("their one", "their two"), ids=["t1", "t2"])])
    assert import_file(store, path)["traces_added"] == 2
    assert store.trace("default", "t1").text == "our text one"
    [theirs] = [r for r in store.rankings("default") if r["uid"] == "r-b"]
    texts = {store.trace("default", tid).text for tid in theirs["trace_ids"]}
    assert texts == {"their one", "their two"}
    out = tmp_path / "pairs.jsonl"
    export(store, "trl-text", out)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {p["prompt"]: (p["chosen"], p["rejected"]) for p in pairs}
    assert by_prompt["their prompt"] == ("their one", "their two")
    assert import_file(store, path)["rankings_added"] == 0  # the same file again adds nothing
    # re-importing our own export binds to our own traces (same id, same text)
    ours = tmp_path / "ours.jsonl"
    export(store, "rankings", ours)
    other = Store(tmp_path / "other.sqlite")
    import_file(other, ours)
    assert import_file(other, ours)["traces_added"] == 0 and other.count("traces") == 4


@pytest.mark.parametrize("change, words", [
    ({"policy_version": [1]}, "policy_version must be an integer"),
    ({"created": float("nan")}, "NaN is not a number JSON allows"),
    ({"traces": [1, 2]}, "traces must be a list of trace objects"),
    ({"traces": [{"rank": 1e400, "text": "a"}, {"rank": 2, "text": "b"}]}, "not a finite number"),
    ({"traces": [{"rank": 1.5, "text": "a"}, {"rank": 2, "text": "b"}]}, "rank must be an integer"),
    ({"prompt": {"x": _nested(3)}}, "prompt must be text"),
    ({"comments": {"t": 5}}, "comments must map"),
    ({"case": {"id": "x", "question": "q"}}, "missing answer"),
])
def test_hostile_import_values_are_one_clear_error(tmp_path, change, words):
    store = _our_store(tmp_path)
    before = _snapshot(store)
    row = {**_ranking_row(), **change}
    text = _dump(row)
    path = tmp_path / "h.jsonl"
    path.write_text(_dump(_ranking_row("ok")) + "\n" + text.replace("Infinity", "1e400") + "\n")
    with pytest.raises(ValueError, match=f"h.jsonl: line 2: .*{words}"):
        import_file(store, path)
    assert _snapshot(store) == before


def _hostile_import_file(rng: random.Random, tmp_path, n: int):
    rows = []
    for i in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            row = _ranking_row(f"r{n}-{i}", (f"a{n}{i}", f"b{n}{i}", f"c{n}{i}"))
        else:
            row = {"prompt": f"p{n}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for _ in range(rng.randint(0, 2)):
            key = rng.choice(["prompt", "chosen", "rejected", "traces", "policy_version", "created", "ranking_uid",
                              "comments", "case", "annotator", "chosen_rank", "chosen_trace_id", "note"])
            row[key] = rng.choice(HOSTILE_VALUES + [[{"text": 1}], [{"rank": "x", "text": "a"}] * 2])
        rows.append(row)
    lines = [_dump(r) for r in rows]
    if rng.random() < 0.15:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([_nested(3000), "[1, 2]", '{"a": 1', "\udcff"]))
    path = tmp_path / f"i{n}.jsonl"
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        raw += b"\n\xff\xfe"
    path.write_bytes(raw)
    return path


def test_import_fuzzer_all_or_nothing(tmp_path):
    rng = random.Random(13)
    store = _our_store(tmp_path)
    imported = refused = 0
    for n in range(500):
        path = _hostile_import_file(rng, tmp_path, n)
        before = _snapshot(store)
        started = time.perf_counter()
        try:
            import_file(store, path, workspace=rng.choice(["default", "pooled"]))
        except ValueError as err:
            assert str(path) in str(err), (n, err)
            assert _snapshot(store) == before, n
            refused += 1
        else:
            imported += 1
        assert time.perf_counter() - started < 2.0, n
        path.unlink()
    assert store.integrity_check() == "ok"
    assert refused > 200 and imported > 50, (refused, imported)


def test_many_pairs_import_in_one_transaction(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    path = _write_jsonl(tmp_path / "pairs.jsonl",
                        [{"prompt": f"case {i % 50}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(2000)])
    assert import_file(store, path)["rankings_added"] == 2000
    assert store.count("rankings") == 2000 and store.count("traces") == 4000
