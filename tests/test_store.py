"""The SQLite store, and the engine's use of it: workspaces, resume, replay."""
import threading
from pathlib import Path

import pytest
import torch

from rlhf_core import store as store_mod
from rlhf_core.engine import Engine
from rlhf_core.generation import SamplingConfig, Trace, sample_traces
from rlhf_core.logprobs import collate, completion_logps
from rlhf_core.store import Store, group_key
from rlhf_core.update import DPOConfig


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
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert s.integrity_check() == "ok"
    s.close()
    again = Store(path)  # reopening applies nothing twice
    assert again.schema_version() == store_mod.SCHEMA_VERSION
    assert again._query("SELECT COUNT(*) FROM schema_version")[0][0] == store_mod.SCHEMA_VERSION
    again.close()


def test_forward_migration_and_newer_file_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.sqlite"
    s = Store(path)
    s.ensure_workspace("w")
    s.close()
    monkeypatch.setattr(store_mod, "_MIGRATIONS", store_mod._MIGRATIONS + ["ALTER TABLE workspaces ADD COLUMN colour TEXT"])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", store_mod.SCHEMA_VERSION + 1)
    s = Store(path)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert "colour" in s.workspace("w")  # the old row survived the migration
    s.close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 1)
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


# ---------------------------------------------------------------------------- the engine with a store


def _samples(engine, case, k=3, seed=0):
    traces = sample_traces(engine.lm, case, SamplingConfig(k=k, max_new_tokens=5, seed=seed, temperature=1.5), engine.version)
    return traces


def _logps(engine, traces):
    b = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], engine.lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        return completion_logps(engine.lm.model, b)


CONFIG = DPOConfig(steps=2, lr=1e-3)


def test_engine_records_and_resumes_exactly(tmp_path, case):
    path = tmp_path / "rlhf.sqlite"
    eng = Engine("tiny-random", device="cpu", store=path, checkpoint_every=3)
    traces = _samples(eng, case)
    m1 = eng.update(traces, [2, 0, 1], CONFIG, annotator="dr-a", case=case, extra_metrics={"acceptance_rate": 0.25})
    traces2 = _samples(eng, case, seed=1)
    eng.update(traces2, [0, 1, 2], CONFIG, annotator="dr-a", case=case)
    assert eng.version == 2 and m1["ranking_id"] and m1["update_id"]
    assert eng.store.latest_checkpoint("default") is None  # every 3 updates only
    # a third ranking committed, then "crash" before its update
    traces3 = _samples(eng, case, seed=2)
    pending = eng.store.record_ranking(
        "default", traces3, [1, 2, 0], "dr-b", case=case, update_config={"algorithm": "dpo", "steps": 2, "lr": 1e-3}
    )
    eng.update(traces3, [1, 2, 0], CONFIG, ranking_id=pending)  # what the crashed run would have done
    expected = _logps(eng, traces)
    hist = eng.history()
    assert [h["version"] for h in hist] == [1, 2, 3] and hist[0]["acceptance_rate"] == 0.25
    assert eng.store.latest_checkpoint("default")["version"] == 3

    # restart with no checkpoint of the first update's state: replay from the reference
    eng.store._conn.execute("UPDATE checkpoints SET deleted = 1")
    eng.store._conn.execute("UPDATE rankings SET status = 'pending' WHERE id = ?", (pending,))
    eng.store._conn.execute("DELETE FROM updates WHERE ranking_id = ?", (pending,))
    again = Engine("tiny-random", device="cpu", store=path, checkpoint_every=3)
    assert again.resume_info["replayed"] == 3 and again.version == 3
    assert torch.allclose(_logps(again, traces), expected, atol=1e-5)
    hist = again.history()
    assert [h["version"] for h in hist] == [1, 2, 3] and all(h["replayed"] for h in hist)
    assert hist[0]["acceptance_rate"] == 0.25  # the charts keep the first run's numbers
    assert again.store.ranking(pending)["status"] == "applied"
    # and a plain restart from the checkpoint replays nothing
    third = Engine("tiny-random", device="cpu", store=path)
    assert third.resume_info["replayed"] == 0 and third.version == 3
    assert third.store.integrity_check() == "ok"


def test_workspaces_switch_and_keep_their_own_policy(tmp_path, case):
    for lora in (False, True):
        path = tmp_path / f"ws-{lora}.sqlite"
        eng = Engine("tiny-random", device="cpu", lora=lora, store=path)
        traces = _samples(eng, case)
        reference = _logps(eng, traces)
        eng.update(traces, [0, 1, 2], DPOConfig(steps=2, lr=1e-2), annotator="a")
        trained = _logps(eng, traces)
        assert not torch.allclose(trained, reference, atol=1e-4)

        info = eng.create_workspace("fresh")
        assert info["version"] == 0 and eng.workspace == "fresh" and eng.version == 0
        assert torch.allclose(_logps(eng, traces), reference, atol=1e-5)  # starts from the reference
        eng.update(traces, [2, 1, 0], DPOConfig(steps=1, lr=1e-2), annotator="b")
        assert eng.version == 1

        eng.switch_workspace("default")
        assert eng.version == 1 and torch.allclose(_logps(eng, traces), trained, atol=1e-5)
        rows = {w["name"]: w for w in eng.workspaces()}
        assert rows["default"]["active"] and rows["fresh"]["rankings"] == 1 and rows["default"]["rankings"] == 1
        assert eng.history("fresh")[0]["version"] == 1 and len(eng.history()) == 1
        with pytest.raises(ValueError, match="no workspace"):
            eng.switch_workspace("nope")
        with pytest.raises(ValueError, match="already exists"):
            eng.create_workspace("fresh")


def test_engine_checks_model_of_workspace_and_records_load_reset(tmp_path, case):
    path = tmp_path / "rlhf.sqlite"
    eng = Engine("tiny-random", device="cpu", store=path, keep_checkpoints=1)
    traces = _samples(eng, case)
    eng.update(traces, [0, 1, 2], CONFIG, annotator="a")
    eng.update(traces, [0, 2, 1], CONFIG, annotator="a")
    kept = [c for c in eng.store.checkpoints("default", include_deleted=True)]
    assert [c["deleted"] for c in kept] == [True, False]  # only the newest automatic one stays
    assert not (tmp_path / "checkpoints" / "default" / "v1").exists()
    with pytest.raises(ValueError, match="full fine-tuning"):
        Engine("tiny-random", device="cpu", lora=True, store=path)

    saved = eng.save(tmp_path / "elsewhere")
    eng.update(traces, [1, 0, 2], CONFIG, annotator="a")
    assert eng.version == 3
    eng.load(saved)  # back to version 2; a restart must come back here too
    assert Engine("tiny-random", device="cpu", store=path).version == 2
    assert eng.checkpoint().is_dir()
    eng.reset()
    restarted = Engine("tiny-random", device="cpu", store=path)
    assert restarted.version == 0 and restarted.resume_info["replayed"] == 0
    assert len(restarted.history()) == 3  # the history is kept


def test_engine_without_store_is_unchanged(case):
    eng = Engine("tiny-random", device="cpu")
    assert eng.store is None and "workspace" not in eng.describe()
    traces = _samples(eng, case)
    m = eng.update(traces, [0, 1, 2], CONFIG)
    assert m["version"] == 1 and "ranking_id" not in m
    with pytest.raises(ValueError, match="no database"):
        eng.workspaces()


def test_damaged_checkpoint_falls_back_and_replays(tmp_path, case):
    path = tmp_path / "rlhf.sqlite"
    eng = Engine("tiny-random", device="cpu", store=path, keep_checkpoints=None)
    traces = _samples(eng, case)
    eng.update(traces, [0, 1, 2], CONFIG, annotator="a", case=case)
    eng.update(traces, [2, 1, 0], CONFIG, annotator="a")  # the case is known from the first
    expected = _logps(eng, traces)
    latest = Path(eng.store.latest_checkpoint("default")["path"])
    (latest / "model.safetensors").write_bytes(b"cut short")  # e.g. a power loss mid-write
    again = Engine("tiny-random", device="cpu", store=path)
    assert again.resume_info["checkpoint"].endswith("v1") and again.resume_info["replayed"] == 1
    assert again.version == 2 and torch.allclose(_logps(again, traces), expected, atol=1e-5)
    # downloads
    archive = again.checkpoint_archive(tmp_path / "policy.zip")
    assert archive.is_file()
    export = again.export_file("trl")
    assert export.read_text().count("\n") == 2 * 3


def test_workspace_for_model(db):
    assert db.workspace_for_model("tiny-random", "full") == "default"  # unused: it will do
    db.set_workspace_model("default", "tiny-random", "full")
    db.record_checkpoint("default", 0, None, kind="reset")
    assert db.workspace_for_model("tiny-random", "full") == "default"
    name = db.workspace_for_model("org/Some Model", "lora")
    assert name == "org-Some-Model-lora" and db.workspace(name)["mode"] == "lora"
    assert db.workspace_for_model("org/Some Model", "lora") == name  # found again


def _weights(engine):
    return {n: p.detach().clone() for n, p in engine.lm.model.named_parameters()}


def test_a_named_checkpoint_is_never_swapped_between_workspaces(tmp_path, case):
    from rlhf_core.checkpoint import save_checkpoint

    eng = Engine("tiny-random", device="cpu", store=tmp_path / "rlhf.sqlite", checkpoint_every=100)
    eng.update(_samples(eng, case), [0, 1, 2], CONFIG, annotator="a")
    best = tmp_path / "named" / "best"
    eng.save(best)  # "best" in workspace default, at v1
    at_v1 = _weights(eng)
    eng.create_workspace("ws2")
    for seed in (1, 2):
        eng.update(_samples(eng, case, seed=seed), [2, 1, 0], CONFIG, annotator="b")
    assert eng.version == 2
    with pytest.raises(ValueError, match="holds workspace default's policy"):
        eng.save(best)
    eng.switch_workspace("default")
    assert eng.version == 1 and all(torch.equal(at_v1[n], p) for n, p in eng.lm.model.named_parameters())

    # the folder overwritten behind the record's back (another tool, a copy): detected, not loaded;
    # the workspace is rebuilt from its own rankings instead
    eng.switch_workspace("ws2")
    save_checkpoint(eng.trainer, best)
    info = eng.switch_workspace("default")
    assert any("overwritten" in p for p in info["skipped_checkpoints"]), info
    assert eng.version == 1 and info["replayed"] == 1
    assert all(torch.allclose(at_v1[n], p, atol=1e-6) for n, p in eng.lm.model.named_parameters())
