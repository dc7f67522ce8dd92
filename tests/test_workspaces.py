"""The engine inside its store: recording, resuming exactly after a crash, workspaces
that keep their own policy, checkpoints that are never swapped (``rlhf_core.workspaces``)."""
from pathlib import Path

import pytest
import torch

from rlhf_core.engine import Engine
from rlhf_core.storage.export import checkpoint_archive, export_file
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.training.update import DPOConfig


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
    # a third ranking committed, then "crash" before its update; its traces were sampled as
    # the app samples an updated policy without a reward model: no reference pass yet
    traces3 = sample_traces(eng.lm, case, SamplingConfig(k=3, max_new_tokens=5, seed=2, temperature=1.5,
                                                         reward_features=False), eng.version)
    assert all(t.ref_logps == [] for t in traces3)
    pending = eng.store.record_ranking(
        "default", traces3, [1, 2, 0], "dr-b", case=case, update_config={"algorithm": "dpo", "steps": 2, "lr": 1e-3}
    )
    eng.update(traces3, [1, 2, 0], CONFIG, ranking_id=pending)  # what the crashed run would have done
    assert all(eng.store.trace("default", t.trace_id).ref_logps == t.ref_logps != [] for t in traces3)
    expected = _logps(eng, traces)
    hist = eng.workspaces.history()
    assert [h["version"] for h in hist] == [1, 2, 3] and hist[0]["acceptance_rate"] == 0.25
    assert eng.store.latest_checkpoint("default")["version"] == 3

    # restart with no checkpoint of the first update's state: replay from the reference
    # (the third ranking's traces as stored before its update: the replay runs their reference pass)
    eng.store._conn.execute("UPDATE traces SET ref_logps = '[]' WHERE trace_id IN (?, ?, ?)",
                            tuple(t.trace_id for t in traces3))
    eng.store._conn.execute("UPDATE checkpoints SET deleted = 1")
    eng.store._conn.execute("UPDATE rankings SET status = 'pending' WHERE id = ?", (pending,))
    eng.store._conn.execute("DELETE FROM updates WHERE ranking_id = ?", (pending,))
    again = Engine("tiny-random", device="cpu", store=path, checkpoint_every=3)
    assert again.resume_info["replayed"] == 3 and again.version == 3
    assert torch.allclose(_logps(again, traces), expected, atol=1e-5)
    hist = again.workspaces.history()
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

        info = eng.workspaces.create("fresh")
        assert info["version"] == 0 and eng.workspace == "fresh" and eng.version == 0
        assert torch.allclose(_logps(eng, traces), reference, atol=1e-5)  # starts from the reference
        eng.update(traces, [2, 1, 0], DPOConfig(steps=1, lr=1e-2), annotator="b")
        assert eng.version == 1

        eng.workspaces.switch("default")
        assert eng.version == 1 and torch.allclose(_logps(eng, traces), trained, atol=1e-5)
        rows = {w["name"]: w for w in eng.workspaces.rows()}
        assert rows["default"]["active"] and rows["fresh"]["rankings"] == 1 and rows["default"]["rankings"] == 1
        assert eng.workspaces.history("fresh")[0]["version"] == 1 and len(eng.workspaces.history()) == 1
        with pytest.raises(ValueError, match="no workspace"):
            eng.workspaces.switch("nope")
        with pytest.raises(ValueError, match="already exists"):
            eng.workspaces.create("fresh")


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
    assert eng.checkpoints.current().is_dir()
    eng.reset()
    restarted = Engine("tiny-random", device="cpu", store=path)
    assert restarted.version == 0 and restarted.resume_info["replayed"] == 0
    assert len(restarted.workspaces.history()) == 3  # the history is kept


def test_engine_without_store_records_in_a_temporary_database(case):
    eng = Engine("tiny-random", device="cpu")
    assert eng.store.is_temporary and eng.describe()["temporary_db"]
    folder = eng.store.folder
    traces = _samples(eng, case)
    m = eng.update(traces, [0, 1, 2], CONFIG)
    assert m["version"] == 1 and m["ranking_id"] and len(eng.workspaces.history()) == 1
    assert eng.store.latest_checkpoint("default") is None  # nothing outlives it: no automatic checkpoint
    eng.workspaces.create("second")
    assert eng.version == 0 and [w["name"] for w in eng.workspaces.rows()] == ["default", "second"]
    eng.workspaces.switch("default")  # the switch checkpoint keeps the first policy
    assert eng.version == 1
    eng.store.close()
    assert not folder.exists()


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
    archive = checkpoint_archive(again.checkpoints.current(), tmp_path / "policy.zip")
    assert archive.is_file()
    export = export_file(again.store, "trl", tmp_path, again.workspace)
    assert export.read_text().count("\n") == 2 * 3


def _weights(engine):
    return {n: p.detach().clone() for n, p in engine.lm.model.named_parameters()}


def test_a_named_checkpoint_is_never_swapped_between_workspaces(tmp_path, case):
    from rlhf_core.training.checkpoint import save_checkpoint

    eng = Engine("tiny-random", device="cpu", store=tmp_path / "rlhf.sqlite", checkpoint_every=100)
    eng.update(_samples(eng, case), [0, 1, 2], CONFIG, annotator="a")
    best = tmp_path / "named" / "best"
    eng.save(best)  # "best" in workspace default, at v1
    at_v1 = _weights(eng)
    eng.workspaces.create("ws2")
    for seed in (1, 2):
        eng.update(_samples(eng, case, seed=seed), [2, 1, 0], CONFIG, annotator="b")
    assert eng.version == 2
    with pytest.raises(ValueError, match="holds workspace default's policy"):
        eng.save(best)
    eng.workspaces.switch("default")
    assert eng.version == 1 and all(torch.equal(at_v1[n], p) for n, p in eng.lm.model.named_parameters())

    # the folder overwritten behind the record's back (another tool, a copy): detected, not loaded;
    # the workspace is rebuilt from its own rankings instead
    eng.workspaces.switch("ws2")
    save_checkpoint(eng.trainer, best)
    info = eng.workspaces.switch("default")
    assert any("overwritten" in p for p in info["skipped_checkpoints"]), info
    assert eng.version == 1 and info["replayed"] == 1
    assert all(torch.allclose(at_v1[n], p, atol=1e-6) for n, p in eng.lm.model.named_parameters())


def test_checkpoint_settings_are_validated_before_the_model_loads():
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        Engine("no-such-model", checkpoint_every=0)
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        Engine("no-such-model", keep_checkpoints=0)
