"""Offline DPO on an export, distributed by accelerate (2 CPU processes)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.training.checkpoint import load_checkpoint
from rlhf_core.engine import Engine
from rlhf_core.storage.export import export
from rlhf_core.rollout.records import Trace
from rlhf_core.rollout.logprobs import collate, completion_logps
from rlhf_core.model.models import load_model
from rlhf_core.rollout.prompts import build_messages, encode_prompt
from rlhf_core.storage.store import Store
from rlhf_core.training.train import batch_logps, main as train_main, pair_batch, read_preferences, tokenize_pair

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def _prefs(tmp_path, case, n_rankings=3) -> Path:
    """An export of a few 3-way rankings over short texts."""
    s = Store(tmp_path / "src.sqlite")
    s.ensure_workspace("default")
    texts = ["Final diagnosis: acute appendicitis", "maybe colic", "no idea at all, sorry"]
    for r in range(n_rankings):
        traces = [
            Trace(case_id=case.id, prompt_ids=[], completion_ids=[], text=f"{t} ({r})", finish_reason="eos",
                  old_logps=[], ref_logps=[], policy_version=0)
            for t in texts
        ]
        s.record_ranking("default", traces, [0, 1, 2], "dr-a", case=case)
    out = tmp_path / "prefs.jsonl"
    assert export(s, "trl", out) == 3 * n_rankings
    s.close()
    return out


def _margin(lm, rows) -> float:
    """Mean (chosen - rejected) log-prob under the policy minus the same under the reference."""
    tok = lm.tokenizer
    total = 0.0
    for row in rows:
        ex = tokenize_pair(tok, row, 4096, 4096)
        batch = pair_batch([ex], tok.pad_token_id, "cpu")
        with torch.no_grad():
            pol = batch_logps(lm.model, batch).sum(-1)
            with lm.reference() as ref_model:
                ref = batch_logps(ref_model, batch).sum(-1)
        total += float((pol[0] - pol[1]) - (ref[0] - ref[1]))
    return total / len(rows)


def test_padded_pair_batch_scores_like_the_unpadded_path(case, tmp_path):
    lm = load_model("tiny-random", device="cpu")
    tok = lm.tokenizer
    other = build_messages(case)
    other[1]["content"] += " Extra words make this prompt longer than the first one."
    rows = [
        {"prompt": build_messages(case), "chosen": [{"role": "assistant", "content": "abc"}], "rejected": [{"role": "assistant", "content": "a much longer answer"}]},
        {"prompt": other, "chosen": "x", "rejected": "yz"},
    ]
    examples = [tokenize_pair(tok, r, 4096, 4096) for r in rows]
    assert examples[0]["prompt_ids"] == encode_prompt(tok, build_messages(case))
    assert examples[0]["chosen_ids"][-1] == tok.eos_token_id
    batch = pair_batch(examples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        got = batch_logps(lm.model, batch)
    for i, ex in enumerate(examples):
        single = collate(ex["prompt_ids"], [ex["chosen_ids"], ex["rejected_ids"]], tok.pad_token_id, "cpu")
        with torch.no_grad():
            want = completion_logps(lm.model, single, share_prompt=False)
        b = len(examples)
        for j, row in enumerate((i, b + i)):
            n = int(single.completion_mask[j].sum())
            assert torch.allclose(got[row, :n], want[j, :n], atol=1e-5)
            assert float(got[row, n:].abs().sum()) == 0.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_preferences(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_process_cpu_run_writes_a_checkpoint_the_app_loads(tmp_path, case):
    data = _prefs(tmp_path, case)
    out = tmp_path / "trained"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    # accelerate runs several CPU processes only through mpirun when given --cpu; its
    # torchrun launcher (--multi_gpu) starts them without MPI, and train.py makes them CPU/gloo.
    cmd = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "rlhf_core.training.train", "--cpu", "--model", "tiny-random", "--data", str(data), "--out", str(out),
        "--epochs", "3", "--batch-size", "2", "--lr", "1e-3", "--beta", "0.5",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["distributed_type"].endswith("MULTI_CPU")
    assert summary["steps"] == 3 * 3  # 9 pairs, 2 per process per step -> 3 steps per epoch

    trainer = load_checkpoint(out, device="cpu")
    assert trainer.version == 9 and trainer.optimizer is not None
    rows = read_preferences(data)
    assert _margin(trainer.lm, rows) > 0.5  # chosen-minus-rejected went up against the reference

    engine = Engine("tiny-random", device="cpu")
    manifest = engine.load(out)  # the app reads it
    assert manifest["extra"]["trained_offline"]["processes"] == 2 and engine.version == 9


def test_single_process_lora_run_registers_in_a_workspace(tmp_path, case):
    data = _prefs(tmp_path, case, n_rankings=1)
    db = tmp_path / "app.sqlite"
    out = tmp_path / "lora-ckpt"
    code = train_main([
        "--model", "tiny-random", "--lora", "--data", str(data), "--out", str(out), "--epochs", "2",
        "--batch-size", "3", "--lr", "5e-3", "--cpu", "--db", str(db), "--workspace", "offline",
        "--metrics-out", str(tmp_path / "m.jsonl"),
    ])
    assert code == 0
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    engine = Engine("tiny-random", device="cpu", lora=True, store=db, workspace="offline")
    assert engine.version == 2 and engine.resume_info["checkpoint"] == str(out.resolve())
    assert _margin(engine.lm, read_preferences(data)) > 0
    assert train_main(["--model", "tiny-random", "--data", str(data), "--out", str(out), "--epochs", "0"]) == 2
    # the workspace holds a LoRA policy: a full fine-tuning run may not be recorded into it
    full = ["--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "full"), "--db", str(db), "--workspace", "offline"]
    assert train_main(full) == 2 and not (tmp_path / "full").exists()
