"""The control room's handlers, called directly on tiny-random with a scripted backend.

generate -> rank (invalid orders and hard-safety-first refused) -> update
(version bumps, history grows, charts get a point) -> checkpoints -> reset,
switch and load behind a confirmation; plus the named API through gradio_client.
"""
from __future__ import annotations

import json
import socket
import threading

import pytest

import ui_scenario as sc
from ui import case_panel, charts, generate_tab, metrics_panel, model_tab, rank_tab
from ui.ranking import RankingError, validate_order
from ui.state import ControlRoom, new_session


@pytest.fixture
def room(tmp_path):
    return ControlRoom("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                       checkpoint_dir=tmp_path / "checkpoints", device="cpu")


def generate(room, session=None, k=4, case_id=sc.CASE.id):
    outs = list(generate_tab.generate(room, session or new_session(), case_id, k, 192, 0.8, 12, True))
    return outs, outs[-1]["session"]


def submit(room, session, annotator="Dr Ada", algorithm="DPO", steps=2, comments=()):
    beta = rank_tab.DEFAULTS[rank_tab.ALGORITHMS[algorithm]].beta
    comments = list(comments) + [""] * (8 - len(comments))
    return list(rank_tab.submit(room, session, annotator, algorithm, beta, room.default_lr(), steps, "", *comments))


def by_text(batch, text):
    return next(t["trace_id"] for t in batch["traces"] if t["text"] == text)


def test_generate_streams_cards_and_builds_a_rankable_batch(room):
    outs, session = generate(room, k=4)
    assert len(outs) >= 3
    assert any("decoding" in o.get("card0_head", "") for o in outs[1:-1]), "partial texts stream into the cards"
    batch = session["batch"]
    texts = [t["text"] for t in batch["traces"]]
    assert texts == [sc.SAFE, sc.SCRIPTED, sc.HARD, sc.FOURTH]
    assert [t["verdict"]["code"] for t in batch["rejected"]] == ["distractor", "duplicate", "duplicate", "duplicate"]
    assert batch["order"][-1] == by_text(batch, sc.HARD), "a hard-safety trace starts at the bottom"
    assert batch["acceptance_rate"] == pytest.approx(0.5)
    final = outs[-1]
    assert all(final[f"card{i}"]["visible"] for i in range(4)) and not final["card4"]["visible"]
    assert "✓ accepted" in final["card0_head"] and "hard violation" in final["card2_head"]
    assert final["card1_text"] == sc.SCRIPTED  # shown raw in a read-only textbox (inert)
    for key, value in final.items():  # no HTML fragment carries the markup unescaped
        if isinstance(value, str) and key != "card1_text":
            assert "<script" not in value and "<img" not in value, key
    assert "&lt;script&gt;" in final["rejected_html"]  # its duplicates were rejected: escaped there
    assert len(final["ranking"]["choices"]) == 4 and final["ranking"]["interactive"]
    assert room.metrics("generation")[-1]["acceptance_rate"] == pytest.approx(0.5)
    assert len(final["chart_acceptance"].data) == 1  # the acceptance chart got its point


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
    out = rank_tab.move_down(room, session, safe)
    order = out["session"]["batch"]["order"]
    assert order == [scripted, safe, hard] and sorted(order) == sorted(batch["order"])
    assert out["ranking"]["value"] == safe and "#1" in out["card1_head"]
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
    record = room.rankings[-1]
    assert record["annotator"] == "Dr Ada" and record["policy_version_sampled"] == 0
    assert record["comments"] == {session["batch"]["traces"][0]["trace_id"]: "clear and safe"}
    assert record["order"] == session["batch"]["order"]
    assert final["session"]["batch"]["submitted"] and not final["ranking"]["interactive"]
    again = submit(room, final["session"])
    assert "already submitted" in again[-1]["_warning"] and room.version == 1
    # the traces of the next generation record the version they were sampled from
    _, session2 = generate(room, final["session"], k=3)
    assert {t["policy_version"] for t in session2["batch"]["traces"]} == {1}


def test_grpo_update_and_metrics_refresh(room):
    _, session = generate(room, k=3)
    outs = submit(room, session, algorithm="GRPO", steps=1)
    assert room.version == 1 and room.metrics("update")[-1]["algorithm"] == "grpo"
    grpo = [tr for tr in outs[-1]["chart_rewards"].data if tr.name == "GRPO mean reward"]
    assert grpo and list(grpo[0].x) == [1]
    assert metrics_panel.refresh(room, room.revision) == {}  # nothing new: the timer sends nothing
    assert "chart_loss" in metrics_panel.refresh(room, -1)
    defaults = rank_tab.algorithm_changed(room, "GRPO")
    assert defaults["beta"] == 0.04 and defaults["loss_type"]["value"] == "grpo"


def test_save_load_reset_behind_confirmation(room, tmp_path):
    _, session = generate(room, k=3)
    session = submit(room, session)[-1]["session"]
    assert room.version == 1 and len(room.unsaved) == 1
    asked = model_tab.request_reset(room, session)
    assert asked["confirm_panel"]["visible"]
    assert "1 ranking update(s) by Dr Ada" in asked["confirm_message"]
    cancelled = model_tab.cancel(room, asked["session"])
    assert cancelled["session"]["pending"] is None and room.version == 1
    outs = list(model_tab.confirm(room, asked["session"], True, "after-first"))
    assert room.version == 0 and (tmp_path / "checkpoints" / "after-first" / "manifest.json").is_file()
    assert "Saved policy v1" in outs[-1]["model_status"] and room.unsaved == []
    assert [c["name"] for c in room.checkpoints()] == ["after-first"]
    asked = model_tab.request_load(room, outs[-1]["session"], "after-first")
    assert "nothing is lost" in asked["confirm_message"]
    outs = list(model_tab.confirm(room, asked["session"], False, ""))
    assert room.version == 1 and "Loaded checkpoint after-first" in outs[-1]["model_status"]
    bad = model_tab.save(room, "../escape")
    assert "Could not save" in bad["model_status"]
    # a run boundary: the charts start a new run, the earlier one stays (grey)
    assert room.run == 3 and charts.current_run(room.metrics()) == 1


def test_switch_model_discards_only_after_confirmation(room):
    _, session = generate(room, k=3)
    asked = model_tab.request_switch(room, session, "tiny-random", True)
    assert "will be discarded" in asked["confirm_message"] and room.describe()["mode"] == "full"
    old_batch = asked["session"]["batch"]
    outs = list(model_tab.confirm(room, asked["session"], False, ""))
    assert room.describe()["mode"] == "lora" and outs[-1]["session"]["batch"] is None
    assert outs[-1]["lr"] == pytest.approx(5e-5)
    # another browser still holding traces of the old model cannot train on them
    stale = submit(room, {**new_session(), "batch": old_batch})
    assert "model was switched" in stale[-1]["_warning"]
    failed = list(model_tab.confirm(room, {**new_session(), "pending": {"action": "switch", "model": "no-such-model", "lora": False}}, False, ""))
    assert "previous policy is still loaded" in failed[-1]["model_status"] and room.describe()["mode"] == "lora"


def test_case_filter_pick_and_upload_errors_are_shown(room, tmp_path):
    assert [v for _, v in case_panel.filter_cases(room, "surgery")["case_picker"]["choices"]] == [sc.OTHER.id]
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


def test_chart_builders_are_pure_and_handle_empty_history():
    figs = charts.all_figures([])
    assert set(figs) == set(charts.CHARTS) and all(len(f.data) == 0 for f in figs.values())
    assert figs["loss"].layout.annotations[0].text.startswith("No updates")
    rows = [{"kind": "update", "run": 1, "x": 1, "version": 1, "version_before": 0, "algorithm": "grpo",
             "loss": 0.1, "kl": 0.01, "reward": 0.5}]
    assert list(charts.rewards_figure(rows).data[0].x) == [1]
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
                     checkpoint_dir=tmp_path / "ckpt")
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
                       checkpoint_dir=tmp_path / "ckpt")
    outs = list(generate_tab.generate(room, new_session(), sc.OTHER.id, 2, 16, 0.8, 2, False))
    final = outs[-1]
    assert final["session"]["batch"]["traces"] == [] and len(final["session"]["batch"]["rejected"]) == 2
    assert "Only 0 trace(s) passed" in final["rank_message"] and not final["ranking"]["interactive"]
    assert "0 rankable of 2 sampled" in final["gen_progress"]
    refused = submit(room, final["session"])
    assert "At least two" in refused[-1]["_warning"]
