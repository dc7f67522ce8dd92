"""The control room's handlers, called directly on tiny-random with a scripted backend
and a database in a temporary folder.

generate -> rank (invalid orders and hard-safety-first refused) -> update
(committed to the database before it runs; version bumps, history grows, charts
get a point) -> checkpoints -> reset, switch and load behind a confirmation ->
restart (history and version continue) -> workspaces, downloads, import,
agreement between annotators and the held-out A/B; plus the named API through
gradio_client, and the in-memory mode without a database.
"""
from __future__ import annotations

import math

import json
import socket
import sqlite3
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import ui_scenario as sc
from ui import batch as batch_module, case_panel, charts, data_tab, eval_tab, generate_tab, metrics_panel, model_tab, rank_tab
from ui.ranking import RankingError, validate_order
from ui.state import ControlRoom, new_session


def make_room(tmp_path, db: str | None = "rlhf.sqlite", **kwargs) -> ControlRoom:
    kwargs.setdefault("checkpoint_every", 10)
    return ControlRoom("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                       checkpoint_dir=tmp_path / "checkpoints", device="cpu",
                       db_path=tmp_path / db if db else None, export_dir=tmp_path / "exports", **kwargs)


@pytest.fixture
def room(tmp_path):
    room = make_room(tmp_path)
    yield room
    # a batch's preparation outlives the test otherwise (a daemon thread in torch at exit aborts)
    room.runner.stop_preparing()
    if room.runner.reference_thread is not None:
        room.runner.reference_thread.join()


@pytest.fixture
def memory_room(tmp_path):
    return make_room(tmp_path, db=None)


def generate(room, session=None, k=4, case_id=sc.CASE.id, budget=16):
    outs = list(generate_tab.generate(room, session or new_session(), case_id, k, 192, 0.8, budget, True))
    return outs, outs[-1]["session"]


def submit(room, session, annotator="Dr Ada", algorithm="DPO", steps=2, comments=(), negatives=False):
    """The update button; ``negatives``: the "train on the traces below the line" box."""
    beta = rank_tab.DEFAULTS[rank_tab.ALGORITHMS[algorithm]].beta
    comments = list(comments) + [""] * (8 - len(comments))
    return list(rank_tab.submit(room, session, annotator, algorithm, beta, room.default_lr(), steps, "", negatives, *comments))


def by_text(batch, text):
    return next(t["trace_id"] for t in batch["traces"] if t["text"] == text)


def test_generate_streams_cards_and_builds_a_rankable_batch(room):
    outs, session = generate(room, k=4)
    assert len(outs) >= 3
    assert any("decoding" in o.get("card0_head", "") for o in outs[1:-1]), "partial texts stream into the cards"
    batch = session["batch"]
    texts = [t["text"] for t in batch["traces"]]
    assert texts == [sc.SAFE, sc.SCRIPTED, sc.HARD, sc.FOURTH]
    assert [t["verdict"]["code"] for t in batch["negatives"]] == ["distractor"]  # below the line
    # the 16-row batch stopped once the 4th distinct accepted trace (row 5) had finished, with the
    # 8 rows done by then: the other 8, still decoding, were dropped unjudged
    assert [t["verdict"]["code"] for t in batch["rejected"]] == ["duplicate", "duplicate", "duplicate"]
    assert batch["report"]["cut_short"] == 8 and batch["report"]["sampled"] == 8
    assert "stopped once K were in hand: 8 sample(s) still reasoning were dropped" in outs[-1]["gen_progress"]
    assert batch["order"][-1] == by_text(batch, sc.HARD), "a hard-safety trace starts at the bottom"
    assert batch["acceptance_rate"] == pytest.approx(0.5)
    final = outs[-1]
    assert all(final[f"card{i}"]["visible"] for i in range(4)) and not final["card4"]["visible"]
    # the cards stand in ranking order: the hard-safety trace's card is last
    assert "✓ accepted" in final["card0_head"] and "hard violation" in final["card3_head"]
    assert [final[f"card{i}_text"] for i in range(4)] == [sc.SAFE, sc.SCRIPTED, sc.FOURTH, sc.HARD]
    assert final["card1_text"] == sc.SCRIPTED  # shown raw in a read-only textbox (inert)
    for key, value in final.items():  # no HTML fragment carries the markup unescaped
        if isinstance(value, str) and key != "card1_text":
            assert "<script" not in value and "<img" not in value, key
    assert "&lt;script&gt;" in final["rejected_html"]  # its duplicates were rejected: escaped there
    assert "Below the line" in final["below_html"] and "infectious mononucleosis" in final["below_html"]
    assert len(final["ranking"]["choices"]) == 4 and final["ranking"]["interactive"]
    assert room.metrics("generation")[-1]["acceptance_rate"] == pytest.approx(0.5)
    assert len(final["chart_acceptance"].data) == 1  # the acceptance chart got its point
    assert room.store.count("traces", "default") == 8  # every trace judged is stored, rejected ones too


def test_rejected_traces_below_the_line_train_under_every_ranked_one(room):
    _, session = generate(room, k=3)
    batch = session["batch"]
    [below] = batch["negatives"]
    assert below["text"] == sc.WRONG and below["trace_id"] not in batch["order"]  # never in the rankable list
    final = submit(room, session, negatives=True)[-1]
    assert room.version == 1 and "1 rejected trace(s) trained below the line" in final["update_status"]
    # what the update did, said apart for the ranked traces and the one below the line
    ratios = [math.exp(x) for x in room.metrics("update")[-1]["trace_logratio"]]
    order = [batch["traces"][i]["trace_id"] for i in range(len(batch["traces"]))]
    ranked = [ratios[order.index(tid)] for tid in batch["order"]]
    assert (f"your first choice is now {ranked[0]:.3g}× as likely, your last {ranked[-1]:.3g}×, "
            f"the traces below the line {ratios[-1]:.3g}×") in final["update_status"]
    [stored] = room.store.rankings("default")
    assert stored["ranked"] == 3 and stored["trace_ids"][-1] == below["trace_id"]
    assert room.metrics("update")[-1]["below_the_line"] == 1
    # a forged "negative" that passed the verifier is refused: it belongs above the line
    _, session = generate(room, k=3)
    forged = {**session, "batch": {**session["batch"], "negatives": [session["batch"]["traces"][0]]}}
    out = submit(room, forged, negatives=True)
    assert "belongs above the line" in out[-1]["_warning"] and room.version == 1


def test_one_accepted_trace_with_negatives_below_the_line_is_enough_to_update(room):
    _, session = generate(room, k=3)
    batch = session["batch"]
    one = {**batch, "traces": batch["traces"][:1], "order": batch["order"][:1]}
    one["order"] = [one["traces"][0]["trace_id"]]
    view = batch_module.ranking_view(one)
    assert "trains it above the 1 rejected" in view["rank_message"]
    assert submit(room, {**session, "batch": one}, negatives=False)[-1].get("_warning")  # alone it cannot be ranked
    final = submit(room, {**session, "batch": one}, negatives=True)[-1]
    assert room.version == 1 and "_warning" not in final


def test_generate_needs_a_case_and_valid_settings(room):
    [out] = list(generate_tab.generate(room, new_session(), None, 4, 192, 0.8, 12, True))
    assert "Pick a case" in out["_warning"]
    [out] = list(generate_tab.generate(room, new_session(), sc.CASE.id, 4, 0, 0.8, 12, True))
    assert "Invalid sampling settings" in out["gen_progress"]


def test_ranking_control_refuses_hard_first_and_keeps_a_permutation(room):
    _, session = generate(room, k=3)
    batch = session["batch"]
    hard = by_text(batch, sc.HARD)
    out = rank_tab.move_up(room, session, hard)
    out = rank_tab.move_up(room, out["session"], hard)  # now second; moving up again would make it first
    assert out.get("session") is None and "cannot be placed first" in out["_warning"]
    safe, scripted = by_text(batch, sc.SAFE), by_text(batch, sc.SCRIPTED)
    assert batch["order"][:2] == [safe, scripted]
    text = {t["trace_id"]: t["text"] for t in batch["traces"]}
    shown = batch_module.cards_view(batch)
    assert [shown[f"card{i}_text"] for i in range(3)] == [text[t] for t in batch["order"]]  # cards in ranking order
    written = [f"note on {t}" for t in batch["order"]]  # the comment boxes as shown, slot by slot
    out = rank_tab.move_down(room, session, safe, *written, *[""] * (batch_module.MAX_CARDS - 3))
    order = out["session"]["batch"]["order"]
    assert order == [scripted, safe, hard] and sorted(order) == sorted(batch["order"])
    assert out["ranking"]["value"] == safe
    # the cards moved: each slot shows the trace of its rank, with its own comment carried along
    assert [out[f"card{i}_text"] for i in range(3)] == [text[t] for t in order]
    assert [out[f"card{i}_comment"]["value"] for i in range(3)] == [f"note on {t}" for t in order]
    assert "#1" in out["card0_head"] and "#2" in out["card1_head"]
    assert rank_tab.comments_by_trace(out["session"]["batch"], [out[f"card{i}_comment"]["value"] for i in range(3)]) \
        == {t: f"note on {t}" for t in order}
    assert "Select a trace" in rank_tab.move_up(room, session, None)["_warning"]


def test_server_side_validation_rejects_invalid_orders(room):
    _, session = generate(room, k=3)
    traces = session["batch"]["traces"]
    a, b, c = (t["trace_id"] for t in traces)
    with pytest.raises(RankingError, match="once"):
        validate_order([a, a, b], traces)
    with pytest.raises(RankingError, match="missing"):
        validate_order([a, b], traces)
    with pytest.raises(RankingError, match="Unknown"):
        validate_order([a, b, "nope"], traces)
    with pytest.raises(RankingError, match="cannot be placed first"):
        validate_order([c, a, b], traces)  # c is the amoxicillin trace (penicillin allergy)
    assert validate_order([b, a, c], traces) == [1, 0, 2]
    bad = {**session, "batch": {**session["batch"], "order": [c, a, b]}}  # a forged order is refused at submit
    out = submit(room, bad)
    assert "cannot be placed first" in out[-1]["_warning"] and room.version == 0


def test_submit_runs_a_dpo_update_and_streams_metrics(room):
    _, session = generate(room, k=3)
    refused = submit(room, session, annotator="  ")
    assert "Enter your name" in refused[-1]["_warning"] and room.version == 0
    outs = submit(room, session, comments=["clear and safe"])
    steps = [o for o in outs if "step" in o.get("update_progress", "")]
    assert len(steps) >= 1, "per-step metrics stream while the update runs"
    final = outs[-1]
    assert room.version == 1 and "v0 → v1" in final["update_status"]
    update = room.metrics("update")[-1]
    assert update["algorithm"] == "dpo" and update["version"] == 1 and update["annotator"] == "Dr Ada"
    assert len(room.metrics("step")) == 2
    loss = final["chart_loss"]
    assert [list(tr.x) for tr in loss.data if tr.mode == "lines+markers"] == [[1]]
    assert any(0 < x < 1 for tr in loss.data for x in tr.x), "per-step points at fractional versions"
    assert len(final["chart_rewards"].data) >= 3 and final["table"][0][0] == "0 → 1"
    [stored] = room.store.rankings("default")
    assert stored["annotator"] == "Dr Ada" and stored["status"] == "applied" and stored["policy_version"] == 0
    assert stored["comments"] == {session["batch"]["order"][0]: "clear and safe"}  # the first card shown
    assert stored["trace_ids"] == session["batch"]["order"] and stored["case_id"] == sc.CASE.id
    assert "stored as ranking #" in final["update_status"] and room.describe()["rankings"] == 1
    # each card says what the update did to its trace: the trainer's log-ratio, as a ratio and per token
    traces, logratio = session["batch"]["traces"], room.metrics("update")[-1]["trace_logratio"]
    for i, trace in enumerate(traces):
        head = final[f"card{i}_head"]
        counted = sum(trace["loss_mask"]) if trace["loss_mask"] else len(trace["completion_ids"])
        assert f"now <b>{math.exp(logratio[i]):.3g}×</b> as likely ({logratio[i] / counted:+.4f} nats/token)" in head
    assert len({final[f"card{i}_head"] for i in range(len(traces))}) == len(traces)
    # submitted: no second update, but the order may still change for a second opinion
    assert final["session"]["batch"]["submitted"] and final["ranking"]["interactive"]
    assert "Record ranking only" in final["rank_message"]
    again = submit(room, final["session"])
    assert "already submitted" in again[-1]["_warning"] and room.version == 1
    # the traces of the next generation record the version they were sampled from
    _, session2 = generate(room, final["session"], k=3)
    assert {t["policy_version"] for t in session2["batch"]["traces"]} == {1}


def test_grpo_update_and_metrics_refresh(room):
    _, session = generate(room, k=3)
    outs = submit(room, session, algorithm="GRPO", steps=1)
    assert room.version == 1 and room.metrics("update")[-1]["algorithm"] == "grpo"
    grpo = [tr for tr in outs[-1]["chart_accuracy"].data if tr.name == "GRPO clipped ratios"]
    assert grpo and list(grpo[0].x) == [1]
    assert [tr.name for tr in outs[-1]["chart_loss"].data if tr.mode == "lines+markers"] == ["GRPO loss"]
    assert metrics_panel.refresh(room, room.revision) == {}  # nothing new: the timer sends nothing
    assert "chart_loss" in metrics_panel.refresh(room, -1)
    defaults = rank_tab.algorithm_changed(room, "GRPO")
    assert defaults["beta"] == 0.04 and defaults["loss_type"]["value"] == "grpo"


def test_the_reference_pass_runs_while_the_clinician_reads_and_not_after_a_switch(room):
    _, session = generate(room, k=3)
    batch = session["batch"]
    trainable = [t["trace_id"] for t in batch["traces"] + batch["negatives"]]
    assert room.engine.store.trace_references(room.workspace, trainable) == {}
    assert generate_tab.prepare_reference(room, session) == {}
    assert set(room.engine.store.trace_references(room.workspace, trainable)) == set(trainable)
    assert submit(room, session, steps=1, negatives=True)[-1]["session"]["batch"]["submitted"]
    _, session = generate(room, session, k=3)
    asked = model_tab.request_switch(room, session, "tiny-random", True)
    list(model_tab.confirm(room, asked["session"], False, ""))
    assert room.runner.prepare_reference(session["batch"]["traces"], session["batch"]["model_key"]) == 0


def test_the_first_steps_gradients_are_prepared_while_the_clinician_reads(tmp_path):
    room = make_room(tmp_path, lora=True)  # prepared for adapters only
    _, session = generate(room, k=3)
    batch = session["batch"]
    generate_tab.prepare_reference(room, session)
    room.runner.reference_thread.join(timeout=60)  # outside the engine queue: Submit need not wait for it
    assert len(room.engine.trainer.prepared) == len(batch["traces"] + batch["negatives"])
    outs = submit(room, session, steps=1, negatives=True)
    trained = len(batch["traces"] + batch["negatives"])
    assert room.metrics("update")[-1]["prepared_traces"] == trained
    assert f"first step prepared while you read, {trained} of {trained} traces" in outs[-1]["update_status"]
    assert room.engine.version == 1
    # policy v1: GRPO's first step reads the reference pass, which the preparation loads from the store
    _, session = generate(room, session, k=3)
    batch = session["batch"]
    trained = len(batch["traces"] + batch["negatives"])
    rank_tab.algorithm_changed(room, "GRPO", session)  # picked before the queued preparation ran,
    generate_tab.prepare_reference(room, session, "DPO")  # which read the radio when it was DPO
    room.runner.reference_thread.join(timeout=60)
    submit(room, session, algorithm="GRPO", steps=1, negatives=True)
    assert room.metrics("update")[-1]["prepared_traces"] == trained
    _, session = generate(room, session, k=3)  # a new batch stops the last one's preparation
    with room.lock:  # the preparation waits for the lock: the stop comes first
        room.runner.prepare_in_background(session["batch"]["traces"], session["batch"]["model_key"])
        room.runner.stop_preparing()
    room.runner.reference_thread.join(timeout=60)
    assert len(room.engine.trainer.prepared) == 0
    room.close()


def test_the_apis_generate_starts_the_reference_pass_its_update_needs(room, monkeypatch):
    from ui import api

    batch = api.api_generate(room, sc.CASE.id, k=3)
    trainable = [t["trace_id"] for t in batch["traces"] + batch["below_the_line"]]
    room.runner.reference_thread.join(timeout=60)
    assert set(room.engine.store.trace_references(room.workspace, trainable)) == set(trainable)
    filled_in_update = []
    reference_pass = room.engine._reference_pass
    monkeypatch.setattr(room.engine, "_reference_pass",
                        lambda traces, **kw: filled_in_update.extend(reference_pass(traces, **kw)) or [])
    order = [t["trace_id"] for t in batch["traces"] if t["can_rank_first"]]
    order += [t["trace_id"] for t in batch["traces"] if not t["can_rank_first"]]
    assert api.api_rank_update(room, batch["batch_id"], order, "api-bot", steps=1)["version"] == 1
    assert filled_in_update == []  # the update found the pass stored: the client did not wait for it


def test_save_load_reset_behind_confirmation(room, tmp_path):
    _, session = generate(room, k=3)
    session = submit(room, session)[-1]["session"]
    assert room.version == 1 and room.unsaved_count() == 1  # checkpoint_every=10: not in a checkpoint yet
    asked = model_tab.request_reset(room, session)
    assert asked["confirm_panel"]["visible"]
    assert "1 ranking update(s) by Dr Ada" in asked["confirm_message"]
    assert "stays in the database" in asked["confirm_message"]
    cancelled = model_tab.cancel(room, asked["session"])
    assert cancelled["session"]["pending"] is None and room.version == 1
    outs = list(model_tab.confirm(room, asked["session"], True, "after-first"))
    assert room.version == 0 and (tmp_path / "checkpoints" / "after-first" / "manifest.json").is_file()
    assert "Saved policy v1" in outs[-1]["model_status"] and room.unsaved_count() == 0
    assert [c["name"] for c in room.policies.checkpoints()] == ["after-first"]
    asked = model_tab.request_load(room, outs[-1]["session"], "after-first")
    assert "nothing is lost" in asked["confirm_message"]
    outs = list(model_tab.confirm(room, asked["session"], False, ""))
    assert room.version == 1 and "Loaded checkpoint after-first" in outs[-1]["model_status"]
    bad = model_tab.save(room, "../escape")
    assert "Could not save" in bad["model_status"]
    # a run boundary: the charts start a new run, the earlier one stays (grey)
    assert room.run == 3 and charts.current_run(room.metrics()) == 1
    assert [c["kind"] for c in room.store.checkpoints("default")] == ["manual", "reset", "loaded"]
    assert len(room.metrics("update")) == 1  # the history is kept across reset and load


def test_switch_model_discards_only_after_confirmation(room):
    _, session = generate(room, k=3)
    session = submit(room, session, steps=1)[-1]["session"]
    _, session = generate(room, session, k=3)
    asked = model_tab.request_switch(room, session, "tiny-random", True)
    assert "will be discarded" in asked["confirm_message"] and room.describe()["mode"] == "full"
    assert "nothing is lost" in asked["confirm_message"]
    old_batch = asked["session"]["batch"]
    outs = list(model_tab.confirm(room, asked["session"], False, ""))
    assert room.describe()["mode"] == "lora" and outs[-1]["session"]["batch"] is None
    assert outs[-1]["lr"] == pytest.approx(1e-4)
    assert "LoRA adapter on every layer" in outs[-1]["model_info"]
    # "default" holds a full fine-tuned policy: the LoRA model gets a workspace of its own
    assert room.workspace == "tiny-random-lora" and room.version == 0 and room.metrics("update") == []
    assert "workspace tiny-random-lora" in outs[-1]["model_status"]
    # another browser still holding traces of the old model cannot train on them
    stale = submit(room, {**new_session(), "batch": old_batch})
    assert "model or workspace was switched" in stale[-1]["_warning"]
    failed = list(model_tab.confirm(room, {**new_session(), "pending": {"action": "switch", "model": "no-such-model", "lora": False}}, False, ""))
    assert "previous policy is still loaded" in failed[-1]["model_status"] and room.describe()["mode"] == "lora"
    assert room.store.workspace("no-such-model-full") is None  # nothing is created for a model that did not load
    # back to full fine-tuning: its workspace, checkpointed on the way out, comes back at v1
    list(model_tab.confirm(room, {**new_session(), "pending": {"action": "switch", "model": "tiny-random", "lora": False}}, False, ""))
    assert room.workspace == "default" and room.version == 1 and room.engine.resume_info["replayed"] == 0
    assert len(room.metrics("update")) == 1


def test_case_filter_pick_and_upload_errors_are_shown(room, tmp_path):
    surgery = case_panel.filter_cases(room, "surgery")["case_picker"]
    assert [v for _, v in surgery["choices"]] == [sc.OTHER.id]
    assert surgery["info"].startswith("1 of 3 cases (surgery)")  # the counter follows the filter
    assert case_panel.filter_cases(room, case_panel.ALL)["case_picker"]["info"].startswith("3 cases in the library")
    picked = case_panel.pick_case(room, new_session(), sc.CASE.id)
    assert "penicillin" in picked["case_meta"] and picked["session"]["case_id"] == sc.CASE.id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer here"}\n')
    out = case_panel.upload_cases(room, new_session(), str(bad))
    assert "Could not load bad.jsonl" in out["upload_status"] and "line 1" in out["upload_status"]
    good = tmp_path / "more.jsonl"
    good.write_text(json.dumps({"id": "up-1", "question": "<b>Q</b>?", "answer": "gout", "specialty": "rheumatology"}) + "\n")
    out = case_panel.upload_cases(room, new_session(), str(good))
    assert "up-1" in room.cases and out["case_picker"]["value"] == "up-1" and "rheumatology" in out["specialty"]["choices"]
    assert out["vignette"] == "<b>Q</b>?"  # a read-only textbox: inert


def test_updates_from_two_sessions_are_serialised(room):
    _, s1 = generate(room, k=3)
    _, s2 = generate(room, k=3)
    errors = []

    def run(session, name):
        try:
            submit(room, session, annotator=name, steps=1)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s, n)) for s, n in ((s1, "A"), (s2, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and room.version == 2
    assert sorted((u["version_before"], u["version"]) for u in room.metrics("update")) == [(0, 1), (1, 2)]
    assert sorted(r["annotator"] for r in room.store.rankings("default", status="applied")) == ["A", "B"]


def test_a_trace_whose_reasoning_first_concluded_another_diagnosis_is_marked_on_its_card_and_label():
    from ui.views import trace_header

    verdict = {"accepted": True, "diagnosis": "acute appendicitis", "code": "accepted", "reason": "concluded"}
    plain = {"text": "Pain moved to the right.", "verdict": verdict, "policy_version": 0}
    changed = {**plain, "verdict": {**verdict, "earlier_conclusion": "ovarian <torsion>"}}
    assert "first concluded another diagnosis" not in trace_header(plain, 0)
    assert "first concluded another diagnosis" not in batch_module.ranking_label(plain, 0, 1)
    card = trace_header(changed, 0)
    assert "first concluded another diagnosis" in card and "ovarian &lt;torsion&gt;" in card and "<torsion>" not in card
    assert "first concluded another diagnosis" in batch_module.ranking_label(changed, 0, 1)
    from ui.api import trace_summary

    assert trace_summary({**changed, "trace_id": "t1"})["earlier_conclusion"] == "ovarian <torsion>"
    assert trace_summary({**plain, "trace_id": "t2"})["earlier_conclusion"] is None
    # the ranking starts with the consistent traces, the changed mind below them, a hard violation last
    from ui.ranking import initial_order

    hard = {**plain, "trace_id": "h", "safety": {"score": 0.2, "violations": [
        {"kind": "allergy", "severity": "hard", "reason": "penicillin to an allergic patient"}]}}
    traces = [hard, {**changed, "trace_id": "c"}, {**plain, "trace_id": "p1"}, {**plain, "trace_id": "p2"}]
    assert initial_order(traces) == ["p1", "p2", "c", "h"]


def test_chart_builders_are_pure_and_handle_empty_history():
    figs = charts.all_figures([])
    assert set(figs) == set(charts.CHARTS) and all(len(f.data) == 0 for f in figs.values())
    assert figs["loss"].layout.annotations[0].text.startswith("No updates")
    rows = [{"kind": "update", "run": 1, "x": 1, "version": 1, "version_before": 0, "algorithm": "grpo",
             "loss": 0.1, "kl": 0.01, "reward": 0.5, "clip_ratio": 0.2}]
    assert list(charts.accuracy_figure(rows).data[0].x) == [1] and not charts.rewards_figure(rows).data
    assert charts.updates_table(rows)[0][:2] == ["0 → 1", "GRPO"]


def test_parse_auth():
    from app import parse_auth

    assert parse_auth(None) is None and parse_auth(" ") is None
    assert parse_auth("alice:s3cret, bob:pw:x") == [("alice", "s3cret"), ("bob", "pw:x")]
    with pytest.raises(ValueError):
        parse_auth("alice")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_named_api_drives_the_loop_headlessly(tmp_path):
    from gradio_client import Client

    from app import build_app, launch

    demo = build_app("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                     checkpoint_dir=tmp_path / "ckpt", db_path=tmp_path / "rlhf.sqlite", export_dir=tmp_path / "exports")
    port = _free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
        assert {"/generate", "/rank_update", "/metrics", "/cases"} <= names
        assert sc.CASE.id in [c["id"] for c in client.predict(specialty="", api_name="/cases")]
        batch = client.predict(case_id=sc.CASE.id, k=3, api_name="/generate")
        order = [t["trace_id"] for t in batch["traces"] if t["can_rank_first"]]
        order += [t["trace_id"] for t in batch["traces"] if not t["can_rank_first"]]
        result = client.predict(batch_id=batch["batch_id"], ranking=order, annotator="api-bot", algorithm="dpo",
                                steps=1, api_name="/rank_update")
        assert result["version"] == 1 and result["version_before"] == 0
        metrics = client.predict(api_name="/metrics")
        assert metrics["model"]["version"] == 1 and len(metrics["updates"]) == 1
        assert metrics["model"]["workspace"] == "default" and metrics["updates"][0]["annotator"] == "api-bot"
        assert demo.room.store.rankings("default")[0]["uid"]  # the API's ranking is in the database
        with pytest.raises(Exception, match="already ranked"):
            client.predict(batch_id=batch["batch_id"], ranking=order, annotator="api-bot", api_name="/rank_update")
    finally:
        demo.close()


def test_login_is_required_when_configured(tmp_path):
    import urllib.error
    import urllib.request

    from gradio_client import Client

    from app import build_app, launch, parse_auth

    demo = build_app("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                     checkpoint_dir=tmp_path / "ckpt")
    port = _free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
           auth=parse_auth("alice:s3cret"))
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info")
        assert denied.value.code in (401, 403)
        client = Client(f"http://127.0.0.1:{port}/", auth=("alice", "s3cret"), verbose=False)
        assert client.predict(api_name="/metrics")["model"]["model"] == "tiny-random"
    finally:
        demo.close()


def test_real_sampling_on_tiny_random_reports_a_shortfall(tmp_path):
    """Without the scripted backend: the engine's own sampler, whose random bytes never verify."""
    room = ControlRoom("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), device="cpu",
                       checkpoint_dir=tmp_path / "ckpt", db_path=tmp_path / "rlhf.sqlite")
    outs = list(generate_tab.generate(room, new_session(), sc.OTHER.id, 2, 16, 0.8, 2, False))
    final = outs[-1]
    batch = final["session"]["batch"]
    assert batch["traces"] == [] and len(batch["negatives"]) + len(batch["rejected"]) == 2
    assert "Only 0 trace(s) passed" in final["rank_message"] and not final["ranking"]["interactive"]
    assert "0 rankable of 2 sampled" in final["gen_progress"]
    for negatives in (False, True):  # rejected traces alone are never a ranking
        refused = submit(room, final["session"], negatives=negatives)
        assert "nothing to rank above the line" in refused[-1]["_warning"]
    assert room.store.count("traces", "default") == 2  # rejected traces are stored too


# --------------------------------------------------------------------------- the database


def _db_rows(path, sql, params=()):
    """Read the database from another connection, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_a_ranking_is_committed_before_its_update_runs(room, tmp_path, monkeypatch):
    db = tmp_path / "rlhf.sqlite"
    _, session = generate(room, k=3)
    seen = []
    train = room.engine.trainer.update

    def spying_update(traces, ranking, config, on_step=None, ranked=None):
        def on_step_seeing_the_db(m):
            if not seen:
                seen.append((_db_rows(db, "SELECT annotator, status FROM rankings"),
                             _db_rows(db, "SELECT COUNT(*) FROM updates")[0][0]))
            on_step(m)

        return train(traces, ranking, config, on_step=on_step_seeing_the_db, ranked=ranked)

    monkeypatch.setattr(room.engine.trainer, "update", spying_update)
    submit(room, session, annotator="Dr Ada")
    assert seen == [([("Dr Ada", "pending")], 0)], "the ranking is durable before the first step"
    assert _db_rows(db, "SELECT annotator, status FROM rankings") == [("Dr Ada", "applied")]
    assert _db_rows(db, "SELECT version FROM updates") == [(1,)]


def test_restart_shows_the_full_history_and_continues_the_version(tmp_path):
    room = make_room(tmp_path)
    _, session = generate(room, k=3)
    session = submit(room, session, annotator="Dr Ada")[-1]["session"]
    _, session = generate(room, session, k=3, case_id=sc.OTHER.id)
    submit(room, session, annotator="Dr Bo", algorithm="GRPO", steps=1)
    assert room.version == 2 and room.store.latest_checkpoint("default") is None  # every 10 updates only

    # a crash (no clean shutdown): the new app replays both rankings from the database
    crashed = make_room(tmp_path)
    assert crashed.engine.resume_info["replayed"] == 2 and crashed.version == 2
    updates = crashed.metrics("update")
    assert [(u["version_before"], u["version"], u["annotator"]) for u in updates] == [(0, 1, "Dr Ada"), (1, 2, "Dr Bo")]
    view = metrics_panel.metrics_view(crashed)
    assert {tr.name: list(tr.x) for tr in view["chart_loss"].data if tr.mode == "lines+markers"} == {
        "DPO loss": [1], "GRPO loss": [2]}  # two objectives, never one line
    assert [list(tr.x) for tr in view["chart_acceptance"].data] == [[0, 1]]  # from the updates' sampling numbers
    assert [row[0] for row in view["table"]] == ["1 → 2", "0 → 1"] and "policy v2" in view["header"]
    # the next update continues the version
    _, session = generate(crashed, k=3)
    submit(crashed, session, annotator="Dr Cy", steps=1)
    assert crashed.version == 3 and [u["version"] for u in crashed.metrics("update")] == [1, 2, 3]

    # a clean shutdown checkpoints, so the next start loads instead of replaying
    assert crashed.close() is not None
    again = make_room(tmp_path)
    assert again.engine.resume_info["replayed"] == 0 and again.version == 3
    assert len(again.metrics("update")) == 3 and again.describe()["rankings"] == 3


def test_lora_by_default_keeps_a_workspace_trained_with_full_fine_tuning(tmp_path, monkeypatch):
    """A database from before LoRA became the CPU default: its trained workspace keeps
    full fine-tuning; an untrained one, and a fresh database, get the default (LoRA here)."""
    from rlhf_core.model import models

    old = make_room(tmp_path, lora=False)
    _, session = generate(old, k=3)
    submit(old, session, steps=1)
    assert old.describe()["mode"] == "full" and old.version == 1
    old.close()
    monkeypatch.setattr(models, "LORA_BY_DEFAULT_FROM", 1)  # tiny-random counts as large
    reopened = make_room(tmp_path)
    assert reopened.describe()["mode"] == "full" and reopened.workspace == "default" and reopened.version == 1
    reopened.close()
    fresh = make_room(tmp_path, db="other.sqlite")
    assert fresh.describe()["mode"] == "lora" and fresh.workspace == "default"
    fresh.close()


def test_a_workspace_keeps_the_adapter_shape_it_was_trained_with(tmp_path):
    """A workspace trained with an adapter on the top half of the layers reopens with that
    adapter (from its checkpoint) and its policy, though the default covers every layer."""
    from rlhf_core.model.models import LoraSettings

    old = make_room(tmp_path, lora=LoraSettings(adapted_layers=0.5), checkpoint_every=1)
    _, session = generate(old, k=3)
    submit(old, session, steps=1)
    trained = {n: p.detach().clone() for n, p in old.engine.lm.model.named_parameters() if p.requires_grad}
    assert "LoRA adapter on the top 1 of 2 layers" in model_tab.model_info_html(old)
    old.close()
    reopened = make_room(tmp_path)
    assert reopened.engine.lm.lora.adapted_layers == 0.5 and reopened.version == 1
    assert reopened.engine.resume_info["replayed"] == 0  # loaded from its checkpoint, not retrained
    now = {n: p for n, p in reopened.engine.lm.model.named_parameters() if p.requires_grad}
    assert now.keys() == trained.keys() and all(torch.equal(now[n], w) for n, w in trained.items())
    reopened.close()
    assert make_room(tmp_path, db="other.sqlite", lora=True).engine.lm.lora.adapted_layers == 1.0  # the default


def test_lora_setting_from_the_environment(monkeypatch):
    from ui.settings import lora_from_env

    for raw, want in (("", None), ("auto", None), ("1", True), ("ON", True), ("0", False), ("off", False)):
        monkeypatch.setenv("RLHF_LORA", raw)
        assert lora_from_env() is want
    monkeypatch.setenv("RLHF_LORA", "maybe")
    with pytest.raises(ValueError, match="RLHF_LORA must be 1, 0 or auto, got 'maybe'"):
        lora_from_env()


def test_workspaces_create_switch_and_isolate_history(room, tmp_path):
    _, session = generate(room, k=3)
    session = submit(room, session)[-1]["session"]
    _, session = generate(room, session, k=3)  # an unsubmitted batch from workspace "default"
    bad = data_tab.create_workspace(room, session, "../nope")
    assert "Could not create workspace" in bad["workspace_status"]
    out = data_tab.create_workspace(room, session, "ward-b")
    assert "Created workspace ward-b" in out["workspace_status"] and out["workspace_confirm_panel"]["visible"]
    assert "will be discarded" in out["workspace_confirm_message"] and room.workspace == "default"
    assert [r[0] for r in out["workspace_table"]] == ["default", "ward-b"]
    cancelled = data_tab.cancel_workspace_switch(room, out["session"])
    assert cancelled["session"]["pending_workspace"] is None and room.workspace == "default"

    outs = list(data_tab.confirm_workspace_switch(room, out["session"]))
    final = outs[-1]
    assert room.workspace == "ward-b" and room.version == 0 and final["session"]["batch"] is None
    assert room.metrics("update") == [] and "workspace ward-b" in final["header"]
    assert all(len(fig.data) == 0 for k, fig in final.items() if k.startswith("chart_"))
    assert [r[-1] for r in final["workspace_table"]] == ["", "●"]
    stale = submit(room, session)  # traces sampled from the other workspace's policy
    assert "workspace was switched" in stale[-1]["_warning"] and room.store.count("rankings", "ward-b") == 0

    _, session = generate(room, final["session"], k=3)
    submit(room, session, annotator="Dr Bo", steps=1)
    assert room.version == 1 and [u["annotator"] for u in room.metrics("update")] == ["Dr Bo"]
    asked = data_tab.request_workspace_switch(room, new_session(), "default")
    back = list(data_tab.confirm_workspace_switch(room, asked["session"]))[-1]
    assert room.workspace == "default" and room.version == 1 and "Now in workspace default" in back["workspace_status"]
    assert [u["annotator"] for u in room.metrics("update")] == ["Dr Ada"]
    # the app remembers the workspace it was in: a restart opens it again
    list(data_tab.confirm_workspace_switch(room, data_tab.request_workspace_switch(room, new_session(), "ward-b")["session"]))
    room.close()
    restarted = make_room(tmp_path)
    assert restarted.workspace == "ward-b" and restarted.version == 1


def _record_second_opinion(room):
    """Dr A records an order without training, Dr B reorders and updates: the same traces, two rankings."""
    _, session = generate(room, k=3)
    batch = session["batch"]
    out = rank_tab.record_only(room, session, "Dr A", False)
    assert "Ranking by Dr A recorded" in out["update_status"] and room.version == 0
    assert out["ranking"]["interactive"] and "Dr A" in out["rank_message"]
    safe = by_text(batch, sc.SAFE)
    moved = rank_tab.move_down(room, out["session"], safe)["session"]  # A C B -> swap the first two
    final = submit(room, moved, annotator="Dr B")[-1]
    assert room.version == 1
    return final["session"]


def test_agreement_appears_after_two_annotators_rank_the_same_group(room):
    assert "No trace group" in data_tab.data_view(room)["agreement_summary"]
    session = _record_second_opinion(room)
    view = data_tab.data_view(room)
    [row] = view["agreement_table"]
    assert row[:3] == [sc.CASE.id, "Dr A, Dr B", 3]
    assert row[3] == "Dr A vs Dr B: +0.33" and row[4] == pytest.approx(1 / 3, abs=1e-3)  # one of three pairs swapped
    assert "1 trace group(s)" in view["agreement_summary"] and "+0.333" in view["agreement_summary"]
    # after the update a third clinician can still give a second opinion on the same traces
    out = rank_tab.record_only(room, session, "Dr C", False)
    assert "recorded" in out["update_status"] and room.version == 1
    [row] = data_tab.data_view(room)["agreement_table"]
    assert row[1] == "Dr A, Dr B, Dr C" and row[3].count("vs") == 3
    assert "Enter your name" in rank_tab.record_only(room, session, " ", False)["_warning"]


def test_exports_download_and_load_with_datasets(room, tmp_path):
    from datasets import load_dataset

    _record_second_opinion(room)
    files = {}
    for key in data_tab.EXPORTS:
        out = data_tab.export_data(room, key, False, False)
        assert "row(s) from workspace default" in out["export_status"], out
        files[key] = out["export_file"]
        assert files[key].startswith(str(tmp_path / "exports"))
    loaded = {k: load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
              for k, path in files.items()}
    assert len(loaded["trl"]) == 2 * 3 and {"prompt", "chosen", "rejected"} <= set(loaded["trl"].column_names)
    assert loaded["trl"][0]["prompt"][0]["role"] == "system" and loaded["trl"][0]["chosen"][0]["role"] == "assistant"
    assert isinstance(loaded["trl-text"][0]["prompt"], str) and len(loaded["trl-text"]) == 6
    assert sorted(loaded["rankings"]["annotator"]) == ["Dr A", "Dr B"]
    assert loaded["agreement"][0]["annotators"] == ["Dr A", "Dr B"]
    out = data_tab.export_data(room, "trl", True, True)
    assert "all workspaces" in out["export_status"] and "rationalised traces left out" in out["export_status"]
    zipped = data_tab.export_checkpoint(room)
    assert "Checkpoint of policy v1" in zipped["export_status"]
    with zipfile.ZipFile(zipped["export_file"]) as z:
        assert "manifest.json" in z.namelist()
        assert json.loads(z.read("manifest.json"))["version"] == 1


def test_import_round_trip_through_the_upload_handler(room, tmp_path):
    _record_second_opinion(room)
    exported = data_tab.export_data(room, "rankings", False, False)["export_file"]
    other = make_room(tmp_path, db="site-b.sqlite")
    out = data_tab.import_rankings(other, exported)
    assert "2 ranking(s) added" in out["import_status"] and other.version == 0  # no training on imports
    assert sorted(r["annotator"] for r in other.store.rankings("default")) == ["Dr A", "Dr B"]
    assert [r[1] for r in out["agreement_table"]] == ["Dr A, Dr B"]
    again = data_tab.import_rankings(other, exported)
    assert "0 ranking(s) added, 2 already there" in again["import_status"]
    # TRL pairs from the same site put the K-way rankings back together: nothing new either
    pairs = data_tab.export_data(room, "trl", False, False)["export_file"]
    assert "0 ranking(s) added" in data_tab.import_rankings(other, pairs)["import_status"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x"}\nnot json\n')
    bad = data_tab.import_rankings(other, str(broken))
    assert "Could not import broken.jsonl" in bad["import_status"] and "line" in bad["import_status"]
    assert str(tmp_path) not in bad["import_status"]  # the server's folders are not shown


def test_eval_handler_returns_a_table_on_tiny_random(room):
    assert "No evaluation yet" in eval_tab.show_last(room)["eval_summary"]
    outs = list(eval_tab.run_eval(room, 2, 8))
    final = outs[-1]
    assert any("Sampling" in o.get("eval_progress", "") for o in outs[:-1])
    assert [r[0] for r in final["eval_table"]] == ["reference", "policy", "policy − reference",
                                                   "P(correct diagnosis), paired"]
    assert final["eval_table"][3][1] == "higher in 0/1 cases"  # same weights: the same beliefs
    assert "what the model believes (teacher-forced, paired" in final["eval_summary"]
    assert final["eval_table"][0][1] == "0/2" and "Wilson" in final["eval_table"][0][3]  # random bytes never verify
    assert "Fisher" in final["eval_table"][2][-1] and "Fisher exact p" in final["eval_text"]
    assert "1 held-out case(s) of 3" in final["eval_summary"] and len(room.last_eval["cases"]) == 1
    assert eval_tab.show_last(room)["eval_table"] == final["eval_table"]
    bad = list(eval_tab.run_eval(room, 0, 8))
    assert "at least 1" in bad[-1]["_warning"]


def test_without_a_database_path_the_session_uses_a_temporary_one_deleted_on_close(memory_room):
    room = memory_room
    db = room.store.path
    _, session = generate(room, k=3)
    final = submit(room, session)[-1]
    assert room.version == 1 and len(room.metrics("update")) == 1 and room.unsaved_count() == 1
    assert not room.describe()["persistent"] and room.store.count("rankings", room.workspace) == 1
    assert "stored as ranking" in final["update_status"]
    assert "Dr Bo recorded" in rank_tab.record_only(room, final["session"], "Dr Bo", False)["update_status"]
    assert "temporary" in data_tab.data_view(room)["data_info"]
    assert Path(data_tab.export_data(room, "trl", False, False)["export_file"]).is_file()
    assert zipfile.is_zipfile(data_tab.export_checkpoint(room)["export_file"])
    asked = model_tab.request_reset(room, final["session"])
    assert "temporary database" in asked["confirm_message"] or "nothing is lost" in asked["confirm_message"]
    room.close()
    assert not db.exists() and not db.parent.exists()


def test_a_restart_serves_at_once_and_replays_in_the_background(tmp_path, monkeypatch):
    room = make_room(tmp_path)
    for annotator in ("Dr Ada", "Dr Bo"):
        _, session = generate(room, k=3)
        submit(room, session, annotator=annotator, steps=1)
    assert room.version == 2 and room.store.latest_checkpoint("default") is None

    from rlhf_core.engine import Engine

    gate = threading.Event()
    real = Engine.apply_ranking

    def slow_apply(self, *args, **kwargs):  # a long replay: each ranking waits for the test
        gate.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "apply_ranking", slow_apply)
    restarted = make_room(tmp_path, background_replay=True)  # returns before any ranking is replayed
    assert restarted.restoring is not None and restarted.version == 0
    header = metrics_panel.metrics_view(restarted)["header"]
    assert "restoring the policy" in header  # the page renders, and says what is happening
    waited = []
    def model_work():
        with restarted.lock:
            waited.append(restarted.version)

    worker = threading.Thread(target=model_work)
    worker.start()  # model work queues behind the replay
    worker.join(0.5)
    assert worker.is_alive()
    gate.set()
    assert restarted.wait_restored(60) and restarted.restoring is None
    worker.join(10)
    assert restarted.version == 2 and waited == [2]
    assert "restoring" not in metrics_panel.metrics_view(restarted)["header"]


def test_the_reward_model_suggests_an_order_and_waits_for_the_clinician(room):
    from rlhf_core.reward.reward_model import RewardConfig

    room.advisor.config = RewardConfig(min_rankings=2, steps=30)
    for annotator in ("Dr A", "Dr B"):
        _, session = generate(room, k=3)
        assert "suggestion" not in session["batch"]  # no reward model yet
        assert "recorded" in rank_tab.record_only(room, session, annotator, False)["update_status"]
    outs, session = generate(room, k=3)
    batch = session["batch"]
    suggestion = batch["suggestion"]
    assert batch["order"] == suggestion["order"] and suggestion["reward_model"]["version"] == 2
    assert "suggested by the reward model (v2, fitted on 2 rankings" in outs[-1]["rank_message"]
    assert all("reward model" in label for label, _ in outs[-1]["ranking"]["choices"])
    assert room.store.count("rankings", "default") == 2  # a suggestion is never submitted on its own
    moved = rank_tab.move_down(room, session, batch["order"][0])["session"]  # the clinician swaps the top two
    final = submit(room, moved, steps=1)[-1]
    assert "Policy updated" in final["_info"]
    stored = room.store.rankings("default")[-1]
    assert stored["trace_ids"][:3] == moved["batch"]["order"]
    assert stored["suggestion"]["order"] == suggestion["order"] and stored["suggestion"]["changed_positions"] == 2
    assert stored["suggestion"]["kendall_tau"] == pytest.approx(1 / 3)
    exported = json.loads(Path(data_tab.export_data(room, "rankings", False, False)["export_file"]).read_text().splitlines()[-1])
    assert exported["suggestion"]["changed_positions"] == 2
    assert [t["reward_score"] for t in exported["traces"][:3]] == [suggestion["scores"][t] for t in moved["batch"]["order"]]
    from rlhf_core.reward.reward_model import RewardModel
    from ui import reward_panel

    view = reward_panel.reward_view(room)  # the Data tab: every version with its held-out accuracy
    assert "Reward model v3 (linear head, fitted on 3 rankings)" in view["reward_summary"]
    assert [row[0] for row in view["reward_table"]] == [3, 2]
    download = reward_panel.export_reward_model(room)["export_file"]
    with zipfile.ZipFile(download) as zf:
        zf.extractall(room.export_dir / "rm")
    assert RewardModel.load(room.export_dir / "rm").info["version"] == 3


def test_groups_the_annotators_dispute_are_queued_for_adjudication():
    rows = [{"case_id": "c1", "annotators": ["A", "B"], "n_traces": 3, "pairs": [{"a": "A", "b": "B", "tau": -1.0}],
             "mean_tau": -1.0},
            {"case_id": "c2", "annotators": ["A", "B"], "n_traces": 3, "pairs": [{"a": "A", "b": "B", "tau": 1.0}],
             "mean_tau": 1.0}]
    html = data_tab.agreement_html(rows)
    assert "To adjudicate: 1 group(s)" in html and "cases c1)" in html and "c2" not in html.split("To adjudicate")[1]
    assert "To adjudicate" not in data_tab.agreement_html(rows[1:])


def test_autopilot_trains_on_unranked_cases_labelled_and_stoppable(room):
    from rlhf_core.reward.reward_model import RewardConfig
    from ui import autopilot_panel

    refused = list(autopilot_panel.run_autopilot(room, 2, "GRPO"))
    assert "needs at least 5 clinician rankings" in refused[-1]["_warning"] and room.version == 0
    room.advisor.config = RewardConfig(min_rankings=2, steps=20)
    for annotator in ("Dr A", "Dr B"):
        _, session = generate(room, k=3)
        rank_tab.record_only(room, session, annotator, False)
    outs = list(autopilot_panel.run_autopilot(room, 2, "GRPO"))
    assert "Autopilot done" in outs[-1]["autopilot_progress"] and room.version == 2
    auto = room.store.rankings("default")[-2:]
    assert {r["source"] for r in auto} == {"autopilot"} and {r["case_id"] for r in auto} == {sc.OTHER.id}
    assert {r["annotator"] for r in auto} == {"autopilot (reward model v2)"}
    assert sum("autopilot (reward model v2)" in map(str, row) for row in outs[-1]["table"]) == 2
    events = room.runner.autopilot(5, "grpo")
    assert next(events)["done"] == 1  # one round done...
    events.close()  # ...then Stop: the current round ends, no other starts
    assert room.version in (3, 4) and room.store.count("rankings", "default") in (5, 6)


def test_a_held_out_case_is_marked_and_trains_only_when_confirmed(room):
    assert room.heldout_ids() == {sc.HELD_OUT.id}  # the Evaluate tab's and the probe's held-out split
    labels = dict((v, label) for label, v in case_panel.case_choices(room))
    assert "held out for evaluation" in labels[sc.HELD_OUT.id] and "held out" not in labels[sc.CASE.id]
    assert "held out for evaluation" in case_panel.pick_case(room, new_session(), sc.HELD_OUT.id)["case_meta"]
    _, session = generate(room, k=3, case_id=sc.HELD_OUT.id)
    first = submit(room, session)[-1]
    assert "held out for evaluation" in first["update_status"] and room.version == 0
    assert room.store.count("rankings", room.workspace) == 0  # refused before anything was stored
    second = submit(room, first["session"])[-1]  # the second press confirms
    assert room.version == 1 and "applied" in second["update_status"]


def test_picking_another_case_clears_the_old_traces(room):
    _, session = generate(room, k=3)
    assert session["batch"]["case_id"] == sc.CASE.id
    same = case_panel.pick_case(room, session, sc.CASE.id)
    assert same["session"]["batch"] is not None and "card0" not in same  # the same case keeps its traces
    other = case_panel.pick_case(room, session, sc.OTHER.id)
    assert other["session"]["batch"] is None and other["session"]["case_id"] == sc.OTHER.id
    assert all(other[f"card{i}"]["visible"] is False for i in range(3)) and other["ranking"]["choices"] == []
    assert set(other) >= set(case_panel.CLEARED_OUTPUTS)
