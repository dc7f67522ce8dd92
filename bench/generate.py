"""Generation throughput: our sampler against plain `model.generate`.

    python -m bench.generate [--model smollm2-135m] [--k 4] [--tokens 160] [--repeats 3]

Both draw K traces of exactly --tokens new tokens (EOS is ignored so the work is
equal) from the same prompt; tokens/s counts all K rows. Ours is reported two
ways: the whole call (traces ready to rank, including the teacher-forced pass
that stores their reference log-probs, which `generate` does not compute), and
its decoding phase alone (prompt, K rows of tokens and their sampling
log-probs: the work `generate` does). The sampler through the model's own
forward (``lean_decode=False``) is measured too, to show what the lean decoder
adds. The three run interleaved, one round after the other, so a drift in the
machine's speed hits them alike. If llama-cpp-python is installed and the model
comes from a GGUF file, llama.cpp decoding one stream of that file (its own
4-bit kernels) is a reference point.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_stream
from rlhf_core.model.models import gguf_path, load_model, resolve_spec
from rlhf_core.rollout.prompts import build_messages, encode_prompt

from .common import BENCH_CASE, machine, median, save_json


def llama_cpp_tok_s(model_name: str, prompt: list[int], n: int, repeats: int) -> float | None:
    """Tokens/s of llama.cpp sampling one stream of n tokens from the model's GGUF
    file (bench.llama_cpp_ref in its own process), or None where unavailable."""
    path = gguf_path(resolve_spec(model_name))
    if path is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    run = subprocess.run(
        [sys.executable, "-m", "bench.llama_cpp_ref", str(path), json.dumps(prompt), str(n), str(repeats)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    if run.returncode != 0:
        print(f"llama.cpp reference skipped (exit {run.returncode}): {run.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    lm = load_model(args.model)
    tok = lm.tokenizer
    prompt = encode_prompt(tok, build_messages(BENCH_CASE))
    k, n = args.k, args.tokens

    def plain_generate() -> float:
        ids = torch.tensor([prompt] * k, device=lm.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - len(prompt) == n
        return k * n / (time.perf_counter() - started)

    def ours(lean: bool) -> tuple[float, float, list]:
        """(tokens/s of the whole call, tokens/s of its decoding phase, traces)."""
        config = SamplingConfig(k=k, max_new_tokens=n, seed=0, stream_every=n + 1, lean_decode=lean)
        started = time.perf_counter()
        for update in sample_stream(lm, BENCH_CASE, config, ignore_eos=True):
            pass
        assert all(len(t.completion_ids) == n for t in update.traces)
        return k * n / (time.perf_counter() - started), update.tokens_per_second, update.traces

    runs = {"hf": [], "lean": [], "lean_decode": [], "model_forward": []}
    for round_ in range(args.repeats + 1):  # the first round warms up and is dropped
        hf_rate = plain_generate()
        lean_rate, lean_decode_rate, traces = ours(True)
        forward_rate, _, _ = ours(False)
        if round_:
            runs["hf"].append(hf_rate)
            runs["lean"].append(lean_rate)
            runs["lean_decode"].append(lean_decode_rate)
            runs["model_forward"].append(forward_rate)
    # at version 0 the policy is its own reference: the sampling log-probs (from the
    # decoding logits) against the teacher-forced float32 pass measure their exactness
    drift = torch.cat([torch.tensor(t.old_logps) - torch.tensor(t.ref_logps) for t in traces]).abs()
    result = {
        "benchmark": "generate", "model": args.model, "machine": machine(), "k": k, "new_tokens": n,
        "hf_generate_tok_s": median(runs["hf"]),
        "ours_tok_s": median(runs["lean"]),
        "ours_decode_tok_s": median(runs["lean_decode"]),
        "ours_model_forward_tok_s": median(runs["model_forward"]),
        "sampling_logp_max_abs_diff": drift.max().item(),
        "sampling_logp_mean_abs_diff": drift.mean().item(),
        "llama_cpp_tok_s": llama_cpp_tok_s(args.model, prompt, n, args.repeats),
    }
    result["speedup"] = result["ours_tok_s"] / result["hf_generate_tok_s"]
    result["speedup_decode"] = result["ours_decode_tok_s"] / result["hf_generate_tok_s"]
    print(json.dumps(result, indent=2))
    save_json(result, args.json_out)
    return result


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()  # measure on the allocator the app runs on
    main()
