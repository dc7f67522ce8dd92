"""Round trip: from submitting a ranking to the updated metrics being ready for
the UI (one default DPO update on K=4 traces), and the peak resident memory of
the process during that update, for full fine-tuning and for LoRA.

    python -m bench.roundtrip [--model smollm2-135m] [--mode full|lora|both] [--checkpoint on|off|both] [--repeats 3]

Each mode (and checkpointing setting) runs in its own subprocess so one
run's memory does not count against another. Peak memory is the process's high-water mark (VmHWM) reset
just before the update (Linux /proc/self/clear_refs), so it measures the
update, not the one-off model load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import save_json


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(model: str, mode: str, repeats: int, tokens: int, checkpointed: bool) -> dict:
    from rlhf_core.engine import Engine
    from rlhf_core.rollout.generation import SamplingConfig, sample_traces
    from rlhf_core.training.prepared import prepare_in_turns
    from rlhf_core.training.update import DPOConfig

    from .common import BENCH_CASE, machine, median

    engine = Engine(model, lora=mode == "lora", device="cpu")
    traces = sample_traces(engine.lm, BENCH_CASE, SamplingConfig(k=4, max_new_tokens=tokens, seed=0), ignore_eos=True)
    times, peaks, baseline, prepared_times, prepare_times = [], [], [], [], []
    for _ in range(repeats):
        import gc

        engine.reset_weights()  # every update starts from the reference (none is rolled back)
        gc.collect()
        baseline.append(_vm("VmRSS"))
        _reset_peak()
        start = time.perf_counter()
        metrics = engine.update(traces, [0, 1, 2, 3], DPOConfig(checkpoint_activations=checkpointed))
        times.append(time.perf_counter() - start)
        peaks.append(_vm("VmHWM"))
        # the same update with its first step prepared while the clinician reads (adapters only)
        engine.reset_weights()
        start = time.perf_counter()
        if prepare_in_turns(engine.trainer, engine.lock, traces) == len(traces):
            prepare_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.update(traces, [0, 1, 2, 3], DPOConfig(checkpoint_activations=checkpointed))
            prepared_times.append(time.perf_counter() - start)
    return {
        "benchmark": "roundtrip", "mode": mode, "checkpointed": checkpointed, "model": model, "machine": machine(),
        "adapted_layers": engine.lm.lora.adapted_layers if engine.lm.lora is not None else None,
        "completion_tokens": [len(t.completion_ids) for t in traces], "steps": metrics["steps"],
        "roundtrip_s": median(times), "peak_rss_gb": max(peaks), "rss_before_update_gb": median(baseline),
        "roundtrip_prepared_s": median(prepared_times) if prepared_times else None,
        "prepare_s": median(prepare_times) if prepare_times else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--checkpoint", choices=["on", "off", "both"], default="both",
                        help="activation checkpointing in the update (default: measure both)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.mode, args.repeats, args.tokens, args.checkpoint == "on")))
        return []
    results = []
    for mode in (["full", "lora"] if args.mode == "both" else [args.mode]):
        for ck in (["off", "on"] if args.checkpoint == "both" else [args.checkpoint]):
            out = subprocess.run(
                [sys.executable, "-m", "bench.roundtrip", "--child", "--model", args.model, "--mode", mode,
                 "--repeats", str(args.repeats), "--tokens", str(args.tokens), "--checkpoint", ck],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1], indent=2), flush=True)
    save_json(results, args.json_out)
    return results


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()  # measure on the allocator the app runs on
    main()
