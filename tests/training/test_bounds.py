"""Bounds on every hyper-parameter, the KL guard-rail, and honest "applied" records.

The product's own ranges are checked here, so the suite-wide widening for tiny
models (conftest.TEST_BOUNDS) is removed in this file.
"""
import json
import socket
import threading

import pytest

import ui_scenario as sc
from rlhf_core.training.bounds import BOUNDS_ENV, help_text
from rlhf_core.engine import Engine
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.training.update import DPOConfig, GRPOConfig, OptimConfig, make_config


@pytest.fixture(autouse=True)
def _product_bounds(monkeypatch):
    monkeypatch.delenv(BOUNDS_ENV, raising=False)


@pytest.mark.parametrize("algorithm, kwargs, words", [
    ("dpo", {"lr": 0.1}, "learning rate must be a number in \\[1e-07, 0.001\\], got 0.1"),
    ("dpo", {"lr": 0.0}, "learning rate"),
    ("dpo", {"beta": 1e30}, "beta must be a number in \\[0.01, 10\\]"),
    ("dpo", {"beta": float("nan")}, "beta must be .* got nan"),
    ("grpo", {"beta": float("inf")}, "beta must be .* got inf"),
    ("dpo", {"steps": 2.9}, "steps must be a whole number, got 2.9"),
    ("dpo", {"steps": 0}, "steps must be a whole number in \\[1, 20\\]"),
    ("grpo", {"steps": "3"}, None),  # a form's text is read as the number it spells
    ("grpo", {"steps": "many"}, "steps must be"),
    ("dpo", {"max_kl": 0}, "KL ceiling must be a number in \\(0, 50\\]"),
    ("grpo", {"clip_eps": 1.0}, "clip_eps"),
    ("grpo", {"clip_eps_high": -1}, "clip_eps_high"),
    ("dpo", {"max_grad_norm": True}, "max_grad_norm"),
])
def test_out_of_range_values_are_refused_with_their_range(algorithm, kwargs, words):
    if words is None:
        assert make_config(algorithm, **kwargs).steps == 3
        return
    with pytest.raises(ValueError, match=words):
        make_config(algorithm, **kwargs)


def test_whole_floats_become_integers_and_defaults_pass():
    assert DPOConfig(steps=3.0).steps == 3 and isinstance(DPOConfig(steps=3.0).steps, int)
    assert GRPOConfig().beta == 0.04 and DPOConfig().lr is None and DPOConfig(lr=1e-3).lr == 1e-3


def test_an_administrator_widens_a_range(monkeypatch):
    monkeypatch.setenv(BOUNDS_ENV, '{"lr": [1e-8, 0.5]}')
    assert DPOConfig(lr=0.1).lr == 0.1
    with pytest.raises(ValueError, match="beta"):  # other ranges are untouched
        DPOConfig(beta=100.0)
    monkeypatch.setenv(BOUNDS_ENV, "lr=0.5")
    with pytest.raises(ValueError, match=BOUNDS_ENV):
        DPOConfig()


def test_help_text_comes_from_the_config_with_its_range():
    text = help_text(OptimConfig, "max_kl")
    assert "rolled back" in text and "(0, 50]" in text


def _engine_with_traces(tmp_path, case):
    engine = Engine("tiny-random", device="cpu", store=tmp_path / "db.sqlite")
    traces = sample_traces(engine.lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=0, temperature=1.5), 0)
    return engine, traces


def test_a_rolled_back_update_is_recorded_as_not_applied(tmp_path, case, monkeypatch):
    engine, traces = _engine_with_traces(tmp_path, case)
    monkeypatch.setenv(BOUNDS_ENV, '{"lr": [1e-8, 0.5]}')
    m = engine.update(traces, [0, 1, 2], DPOConfig(steps=3, lr=0.3, max_kl=0.01), annotator="dr-x")
    assert m["rolled_back"] and m["version"] == 0 and engine.version == 0
    [ranking] = engine.store.rankings("default")
    assert ranking["status"] == "failed" and ranking["status_detail"].startswith("rolled back: KL")
    [update] = engine.store.updates("default")
    assert update["metrics"]["rolled_back"] is True
    ok = engine.update(traces, [0, 1, 2], DPOConfig(steps=1, lr=1e-3), annotator="dr-x")
    assert not ok["skipped"] and engine.version == 1
    assert [r["status"] for r in engine.store.rankings("default")] == ["failed", "applied"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    from gradio_client import Client

    from app import build_app, launch

    demo = build_app("tiny-random", cases_dir=sc.write_cases(tmp_path / "cases"), generate_fn=sc.backend(),
                     checkpoint_dir=tmp_path / "ckpt", db_path=tmp_path / "rlhf.sqlite", export_dir=tmp_path / "exports")
    port = _free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, (lambda: Client(f"http://127.0.0.1:{port}/", verbose=False))
    finally:
        demo.close()


def _ranked_order(batch) -> list[str]:
    return ([t["trace_id"] for t in batch["traces"] if t["can_rank_first"]]
            + [t["trace_id"] for t in batch["traces"] if not t["can_rank_first"]])


def test_the_api_refuses_out_of_range_values_and_answers_json(served):
    demo, client = served
    c = client()
    batch = c.predict(case_id=sc.CASE.id, k=3, api_name="/generate")
    for kwargs, words in (({"lr": 0.1}, "learning rate"), ({"beta": 1e30}, "beta"), ({"steps": 2.9}, "whole number")):
        with pytest.raises(Exception, match=words):
            c.predict(batch_id=batch["batch_id"], ranking=_ranked_order(batch), annotator="api", api_name="/rank_update",
                      **kwargs)
    assert demo.room.version == 0 and demo.room.store.count("rankings") == 0  # nothing recorded, nothing trained
    result = c.predict(batch_id=batch["batch_id"], ranking=_ranked_order(batch), annotator="api", steps=1,
                       api_name="/rank_update")
    json.dumps(result, allow_nan=False)
    assert result["version"] == 1


def test_eight_clients_rank_and_update_concurrently_without_loss(served):
    demo, client = served
    clients, rounds = 8, 5
    versions: dict[int, list[int]] = {i: [] for i in range(clients)}
    errors: list[BaseException] = []

    def work(i):
        try:
            c = client()
            for _ in range(rounds):
                batch = c.predict(case_id=sc.CASE.id, k=3, api_name="/generate")
                result = c.predict(batch_id=batch["batch_id"], ranking=_ranked_order(batch), annotator=f"client-{i}",
                                   steps=1, api_name="/rank_update")
                versions[i].append(result["version"])
        except BaseException as err:  # reported below, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    every = sorted(v for vs in versions.values() for v in vs)
    assert every == list(range(1, clients * rounds + 1))  # each update got its own version: none lost, none shared
    assert all(vs == sorted(vs) and len(set(vs)) == len(vs) for vs in versions.values())
    store = demo.room.store
    assert store.count("rankings") == clients * rounds
    assert {r["status"] for r in store.rankings("default")} == {"applied"}
    assert store.integrity_check() == "ok"
