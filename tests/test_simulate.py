"""simulate with a database: SIGKILL mid-run loses no committed ranking, and a restart resumes."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_core.clinical.cases import Case
from rlhf_core.engine import Engine
from rlhf_core.rollout.records import Trace
from rlhf_core.simulate import SimulationSettings, run_simulation, scripted_ranking

ROOT = Path(__file__).resolve().parents[1]


def _simulate_cmd(db: Path, out: Path, updates: int) -> list[str]:
    return [
        sys.executable, "-m", "rlhf_core", "simulate", "--model", "tiny-random", "--device", "cpu",
        "--db", str(db), "--out", str(out), "--updates", str(updates), "--traces", "2",
        "--max-new-tokens", "4", "--budget", "2", "--steps", "12", "--lr", "1e-3", "--negatives", "0",
    ]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _snapshot(db: Path) -> dict:
    """Rankings and their items through a separate read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rankings = conn.execute("SELECT id, uid, annotator, group_key, status, created FROM rankings ORDER BY id").fetchall()
        items = conn.execute("SELECT ranking_id, position, trace_id FROM ranking_items ORDER BY ranking_id, position").fetchall()
        updates = conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
    finally:
        conn.close()
    return {"rankings": rankings, "items": items, "updates": updates}


def test_sigkill_mid_update_loses_no_ranking_and_restart_resumes(tmp_path):
    db, out = tmp_path / "rlhf.sqlite", tmp_path / "metrics.jsonl"
    log = open(tmp_path / "simulate.log", "w+")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(_simulate_cmd(db, out, 50), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    seen = None
    mid_update = False
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            if not db.exists():
                continue
            try:
                snap = _snapshot(db)
            except sqlite3.OperationalError:  # the schema is being created
                continue
            if len(snap["rankings"]) >= 2:
                seen = snap
                # best: the newest ranking is committed and its update is running
                if snap["rankings"][-1][4] == "pending" or len(snap["rankings"]) >= 4:
                    mid_update = snap["rankings"][-1][4] == "pending"
                    break
        assert proc.poll() is None, (tmp_path / "simulate.log").read_text()[-3000:]
        assert seen is not None, "simulate recorded no rankings in time"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    after = _snapshot(db)
    # every ranking seen before the kill is still there, unchanged, with all its traces
    strip = lambda rows: {r[:4] + r[5:] for r in rows}  # noqa: E731 - the status may have moved on
    assert strip(seen["rankings"]) <= strip(after["rankings"])
    assert set(seen["items"]) <= set(after["items"])
    assert all(sum(1 for i in after["items"] if i[0] == r[0]) == 2 for r in after["rankings"])

    conn = sqlite3.connect(db)
    last_version = conn.execute("SELECT MAX(version) FROM updates").fetchone()[0] or 0
    pending = conn.execute("SELECT COUNT(*) FROM rankings WHERE status = 'pending'").fetchone()[0]
    ranked_before = conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]
    conn.close()
    lines_before = out.read_text().count("\n") if out.exists() else 0

    # restart: the latest checkpoint is loaded, a ranking the kill left pending is replayed, and it goes on
    done = subprocess.run(_simulate_cmd(db, out, 1), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    conn = sqlite3.connect(db)
    versions = [v for (v,) in conn.execute("SELECT version FROM updates WHERE superseded = 0 ORDER BY id")]
    assert conn.execute("SELECT COUNT(*) FROM rankings WHERE status = 'pending'").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == ranked_before + 1
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert versions == list(range(1, len(versions) + 1))  # no version lost or repeated
    assert versions[-1] == last_version + pending + 1
    metrics = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(metrics) == lines_before + 1 and metrics[-1]["version"] == versions[-1]
    assert metrics[-1]["update"] == len(versions) - 1  # update numbers continue
    print(f"killed with {len(seen['rankings'])} ranking(s) seen, mid-update={mid_update}, pending={pending}")


def test_scripted_clinician_ranks_consistent_reasoning_above_a_change_of_mind():
    def trace(tokens: int, accepted: bool, earlier: str | None = None, safety: float = 1.0) -> Trace:
        verdict = {"accepted": accepted, **({"earlier_conclusion": earlier} if earlier else {})}
        return Trace(case_id="c", prompt_ids=[1], completion_ids=[2] * tokens, text="", finish_reason="eos",
                     old_logps=[0.0] * tokens, ref_logps=[0.0] * tokens, policy_version=0, verdict=verdict,
                     safety={"score": safety})

    traces = [
        trace(5, accepted=True, earlier="appendicitis"),  # shortest, but its reasoning concluded a distractor
        trace(9, accepted=True, safety=0.5),
        trace(7, accepted=False),
        trace(8, accepted=True),
        trace(6, accepted=True, earlier="appendicitis", safety=0.2),
    ]
    # verified first; consistent before changed-mind; then safer; then shorter
    assert scripted_ranking(traces) == [3, 1, 0, 4, 2]


def test_run_simulation_records_everything_and_continues(tmp_path, case):
    db = tmp_path / "rlhf.sqlite"
    cases = [case, Case(id="t-mi", question="Crushing chest pain and ST elevation. Diagnosis?", answer="myocardial infarction")]
    settings = SimulationSettings(updates=2, traces=2, max_new_tokens=4, budget=2, steps=1, lr=1e-3)
    engine = Engine("tiny-random", device="cpu", store=db, workspace="sim")
    first = run_simulation(engine, settings, cases)
    assert [m["update"] for m in first] == [0, 1] and [m["version"] for m in first] == [1, 2]
    store = engine.store
    assert store.count("rankings", "sim") == 2 and store.count("traces", "sim") >= 4
    assert all(r["status"] == "applied" and r["annotator"] == "simulated-clinician" for r in store.rankings("sim"))
    assert store.latest_checkpoint("sim")["version"] == 2
    hist = engine.workspaces.history()
    assert [h["acceptance_rate"] for h in hist] == [m["acceptance_rate"] for m in first]
    assert {c.id for c in store.cases()} == {m["case_id"] for m in first}

    again = Engine("tiny-random", device="cpu", store=db, workspace="sim")
    assert again.version == 2
    more = run_simulation(again, settings, cases)
    assert [m["update"] for m in more] == [2, 3] and more[-1]["version"] == 4
    assert len(again.workspaces.history()) == 4


def test_simulate_teaches_the_training_split_and_opens_a_workspace_per_model(tmp_path, capsys):
    from rlhf_core.clinical.cases import save_cases_jsonl
    from rlhf_core.cli import main
    from rlhf_core.evaluate import split_cases
    from rlhf_core.storage.store import Store

    cases = [Case(id=f"c{i}", question=f"Case {i}. Diagnosis?", answer="gout", distractors=["pseudogout", "cellulitis"])
             for i in range(10)]
    path = save_cases_jsonl(cases, tmp_path / "cases.jsonl")
    train, heldout = split_cases(cases, 0.2, 0)
    assert train and heldout
    db = tmp_path / "rlhf.sqlite"
    base = ["simulate", "--model", "tiny-random", "--device", "cpu", "--db", str(db), "--cases", str(path),
            "--updates", "3", "--traces", "2", "--max-new-tokens", "4", "--budget", "2", "--steps", "1",
            "--out", str(tmp_path / "m.jsonl")]
    assert main(base) == 0
    store = Store(db)
    taught = {r["case_id"] for r in store.rankings("default")}
    assert taught and taught <= {c.id for c in train}  # held-out cases stay untouched
    assert main(base + ["--split", "heldout", "--lora"]) == 0  # another mode: its own workspace, not an error
    names = {w["name"]: w for w in store.workspaces()}
    assert "tiny-random-lora" in names and names["default"]["mode"] == "full"
    assert {r["case_id"] for r in store.rankings("tiny-random-lora")} <= {c.id for c in heldout}
    store.close()


def test_autopilot_ranks_with_the_clinicians_reward_model_and_says_so(tmp_path, case):
    from dataclasses import replace

    from rlhf_core.reward.reward_data import MODEL_RANKED, rankings_from_store

    cases = [case, Case(id="t-mi", question="Crushing chest pain and ST elevation. Diagnosis?", answer="myocardial infarction")]
    settings = SimulationSettings(updates=2, traces=3, max_new_tokens=4, budget=3, steps=1, lr=1e-3)
    engine = Engine("tiny-random", device="cpu", store=tmp_path / "rlhf.sqlite", workspace="sim")
    with pytest.raises(ValueError, match="autopilot needs at least 5 clinician rankings"):
        run_simulation(engine, replace(settings, autopilot=True), cases)
    run_simulation(engine, replace(settings, updates=5), cases)
    clinicians = len(rankings_from_store(engine.store, "sim"))
    assert clinicians == 5
    auto = run_simulation(engine, replace(settings, autopilot=True), cases)
    assert all(m["autopilot"] and m["reward_model_version"] == 5 for m in auto)
    labelled = engine.store.rankings("sim")[-2:]
    assert {r["source"] for r in labelled} == {MODEL_RANKED}
    assert {r["annotator"] for r in labelled} == {"autopilot (reward model v5)"}
    assert len(rankings_from_store(engine.store, "sim")) == clinicians  # never trained on its own rankings
