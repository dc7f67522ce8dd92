"""The SQLite store: schema and migrations, workspaces, traces, rankings, updates, checkpoints
(the engine's use of it: ``test_workspaces.py``)."""
import threading

import pytest

from rlhf_core.storage import schema
from rlhf_core.rollout.records import Trace
from rlhf_core.storage.store import Store, group_key


def _trace(case_id="c1", text="x", tid=None, **kw) -> Trace:
    data = dict(
        case_id=case_id, prompt_ids=[1, 2, 3], completion_ids=[4, 5], text=text, finish_reason="eos",
        old_logps=[-0.1234567890123, -2.5], ref_logps=[-0.3, -1e-9], policy_version=0,
        verdict={"accepted": False, "code": "no_conclusion"}, safety={"score": 1.0},
    )
    data.update(kw)
    if tid:
        data["trace_id"] = tid
    return Trace(**data)


@pytest.fixture
def db(tmp_path):
    s = Store(tmp_path / "rlhf.sqlite")
    s.ensure_workspace("default")
    yield s
    s.close()


def test_pragmas_schema_and_reopen(tmp_path):
    path = tmp_path / "a.sqlite"
    s = Store(path)
    conn = s._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert s.schema_version() == schema.SCHEMA_VERSION
    assert s.integrity_check() == "ok"
    s.close()
    again = Store(path)  # reopening applies nothing twice
    assert again.schema_version() == schema.SCHEMA_VERSION
    assert again._query("SELECT COUNT(*) FROM schema_version")[0][0] == schema.SCHEMA_VERSION
    again.close()


def test_forward_migration_and_newer_file_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.sqlite"
    s = Store(path)
    s.ensure_workspace("w")
    s.close()
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + ["ALTER TABLE workspaces ADD COLUMN colour TEXT"])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 1)
    s = Store(path)
    assert s.schema_version() == schema.SCHEMA_VERSION
    assert "colour" in s.workspace("w")  # the old row survived the migration
    s.close()
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    with pytest.raises(ValueError, match="newer than this code"):
        Store(path)


def test_workspaces_are_validated(db):
    db.create_workspace("site-b", model="tiny-random", mode="full")
    with pytest.raises(ValueError, match="already exists"):
        db.create_workspace("site-b")
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(ValueError, match="not allowed"):
            db.create_workspace(bad)
    with pytest.raises(ValueError, match="mode"):
        db.create_workspace("m", mode="half")
    names = [w["name"] for w in db.workspaces()]
    assert names == ["default", "site-b"]
    with pytest.raises(ValueError, match="no workspace"):
        db.record_traces("nowhere", [_trace()])


def test_traces_round_trip_exactly(db, case):
    t = _trace(case_id=case.id, rationalised=True, sampling={"k": 2})
    assert db.record_traces("default", [t], case) == 1
    assert db.record_traces("default", [t], case) == 0  # already there
    back = db.trace("default", t.trace_id)
    assert back == t  # floats survive JSON exactly
    assert db.case(case.id).to_dict() == case.to_dict()


def test_record_ranking_validates(db):
    a, b, c = _trace(text="a"), _trace(text="b"), _trace(text="c")
    with pytest.raises(ValueError, match="exactly once"):
        db.record_ranking("default", [a, b], [0, 0], "ann")
    with pytest.raises(ValueError, match="at least two"):
        db.record_ranking("default", [a], [0], "ann")
    with pytest.raises(ValueError, match="annotator"):
        db.record_ranking("default", [a, b], [0, 1], " ")
    with pytest.raises(ValueError, match="same case"):
        db.record_ranking("default", [a, _trace(case_id="other")], [0, 1], "ann")
    with pytest.raises(ValueError, match="unknown trace"):
        db.record_ranking("default", [a, b], [0, 1], "ann", comments={"nope": "hi"})
    with pytest.raises(ValueError, match="twice"):
        db.record_ranking("default", [a, a], [0, 1], "ann")
    assert db.count("rankings") == 0 and db.count("traces") == 0  # nothing half-written

    rid = db.record_ranking(
        "default", [a, b, c], [2, 0, 1], "dr-a", comments={1: "hedges", c.trace_id: "best"}, note="ok",
        uid="u1", update_config={"algorithm": "dpo", "beta": 0.1},
    )
    assert db.record_ranking("default", [a, b, c], [0, 1, 2], "dr-a", uid="u1") == rid  # same uid: nothing new
    r = db.ranking(rid)
    assert r["trace_ids"] == [c.trace_id, a.trace_id, b.trace_id]  # best to worst
    assert r["comments"] == {b.trace_id: "hedges", c.trace_id: "best"}
    assert r["status"] == "pending" and r["group_key"] == group_key([a.trace_id, b.trace_id, c.trace_id])
    traces, ranking = db.ranking_traces(rid)
    assert [t.trace_id for t in traces] == [a.trace_id, b.trace_id, c.trace_id] and ranking == [2, 0, 1]


def test_updates_history_and_checkpoints(db, tmp_path):
    a, b = _trace(text="a"), _trace(text="b")
    rid = db.record_ranking("default", [a, b], [1, 0], "ann", update_config={"algorithm": "dpo"})
    ck = tmp_path / "checkpoints" / "default" / "v1"
    ck.mkdir(parents=True)
    uid = db.record_update("default", rid, "dpo", {"beta": 0.1}, {"loss": 0.5, "grad_norm": float("nan")}, 1, checkpoint=(1, ck))
    assert db.ranking(rid)["status"] == "applied"
    hist = db.history("default")
    assert hist == [
        {"loss": 0.5, "grad_norm": None, "update_id": uid, "ranking_id": rid, "version": 1, "algorithm": "dpo", "created": hist[0]["created"]}
    ]
    latest = db.latest_checkpoint("default")
    assert latest["path"] == str(ck.resolve()) and latest["after_update_id"] == uid
    assert db._query("SELECT path FROM checkpoints")[0][0] == "checkpoints/default/v1"  # relative to the db
    db.record_checkpoint("default", 2, tmp_path / "gone", kind="manual")
    assert db.latest_checkpoint("default")["version"] == 1  # the newer one is not on disk
    db.mark_checkpoint_deleted(latest["id"])
    assert db.latest_checkpoint("default") is None
    db.record_checkpoint("default", 0, None, kind="reset")
    assert db.latest_checkpoint("default")["kind"] == "reset"
    with pytest.raises(ValueError, match="kind"):
        db.record_checkpoint("default", 0, ck, kind="nope")


def test_concurrent_writers_lose_nothing(db):
    errors = []

    def work(n):
        try:
            for i in range(5):
                db.record_ranking("default", [_trace(text=f"{n}-{i}-a"), _trace(text=f"{n}-{i}-b")], [0, 1], f"ann{n}")
        except Exception as err:  # pragma: no cover - the failure is asserted below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert db.count("rankings") == 20 and db.count("traces") == 40
    # a second process-like connection sees everything committed
    other = Store(db.path, readonly=True)
    assert other.count("rankings") == 20
    with pytest.raises(ValueError, match="read-only"):
        other.ensure_workspace("x")
    other.close()


def test_workspace_for_model(db):
    assert db.workspace_for_model("tiny-random", "full") == "default"  # unused: it will do
    db.set_workspace_model("default", "tiny-random", "full")
    db.record_checkpoint("default", 0, None, kind="reset")
    assert db.workspace_for_model("tiny-random", "full") == "default"
    name = db.workspace_for_model("org/Some Model", "lora")
    assert name == "org-Some-Model-lora" and db.workspace(name)["mode"] == "lora"
    assert db.workspace_for_model("org/Some Model", "lora") == name  # found again


def test_the_store_imports_no_torch():
    """The store, exports and records are plain data: reading a database needs no model code."""
    import subprocess
    import sys

    code = "import sys, rlhf_core.storage.store, rlhf_core.rollout.records; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
