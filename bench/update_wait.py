"""How long a clinician waits after *Submit*, at the app's defaults, with nothing prepared,
with the reference pass prepared while they read (``Engine.prepare_reference``), and with
the first step's gradients prepared too (``prepared.prepare_in_turns``).

    python -m bench.update_wait [--model smollm2-135m] [--cases 10] [--algorithm dpo|grpo] [--json-out F] [--no-run]

Rewrites README's block between the "update wait" markers (``--algorithm grpo``: the
"update wait grpo" markers, results in bench/update_wait_grpo.json).

Per training-split case: rejection-sample a batch as the control room does (the app's
``SamplingConfig`` without reward features, ``RejectionConfig``: K = 4 rankable and up to
4 below the line), then time ``Engine.update`` with the default DPO config and the app's
probe (2 taught + 2 held-out cases) on the scripted ranking. Cases take the three arms in
turn; what an arm prepares is timed apart (it runs while the clinician reads). The first
update (at version 0, where sampling's pass gives the reference log-probs for free) is left
out of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

from rlhf_core.belief import ProbeSet
from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.engine import Engine
from rlhf_core.evaluate import split_cases
from rlhf_core.rollout.generation import SamplingConfig
from rlhf_core.rollout.records import Trace
from rlhf_core.rollout.sampler import RejectionConfig
from rlhf_core.simulate import scripted_ranking
from rlhf_core.training.prepared import prepare_in_turns
from rlhf_core.training.update import make_config

from .common import adapter_label, machine, publish, republish

MARKERS = {"dpo": ("<!-- BEGIN update wait -->", "<!-- END update wait -->"),
           "grpo": ("<!-- BEGIN update wait grpo -->", "<!-- END update wait grpo -->")}
ARMS = {"at_submit": "nothing", "prepared": "the reference pass",
        "first_step": "the reference pass and the first step's gradients (now)"}


def readme_block(result: dict) -> str:
    lines = [f"Clinician's wait after *Submit*: model `{result['model']}` ({result['mode']}), {result['machine']}; "
             f"{result['settings']}; medians over {result['n_per_arm']} updates per arm (after version 0).", "",
             "| prepared while the clinician reads | wait (update returns) | of which training | probe "
             "| other (reference pass, storage) | time preparing |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arm, name in ARMS.items():
        a = result[arm]
        prep = f"{a['prepare_s']:.1f} s" if a.get("prepare_s") is not None else "-"
        lines.append(f"| {name} | {a['wait_s']:.1f} s | {a['trainer_s']:.1f} s | {a['probe_s']:.1f} s "
                     f"| {a['other_s']:.1f} s | {prep} |")
    return "\n".join(lines)


def _medians(rows: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rows) for k in ("wait_s", "trainer_s", "probe_s")}
    out["other_s"] = statistics.median(r["wait_s"] - r["trainer_s"] - r["probe_s"] for r in rows)
    prepared = [r["prepare_s"] for r in rows if r["prepare_s"] is not None]
    out["prepare_s"] = statistics.median(prepared) if prepared else None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=10, help="updates in all, the first at version 0 (3n + 1: even arms)")
    parser.add_argument("--algorithm", choices=sorted(MARKERS), default="dpo")
    parser.add_argument("--json-out", default=None, help="default: bench/update_wait.json (DPO), update_wait_grpo.json")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    json_out = args.json_out or ("bench/update_wait.json" if args.algorithm == "dpo" else "bench/update_wait_grpo.json")
    begin, end = MARKERS[args.algorithm]
    config = make_config(args.algorithm)
    if args.no_run:
        return republish(json_out, readme_block, begin, end)
    engine = Engine(args.model, lora="auto", device="cpu", dtype="float32")
    train, heldout = split_cases(load_library(default_cases_dir()))
    engine.probe = ProbeSet(heldout=heldout[:2], max_taught=2)
    rows = []
    for i, case in enumerate(train[: args.cases]):
        result = engine.sample_verified(case, SamplingConfig(reward_features=False, seed=i), RejectionConfig())
        shown = [t.to_dict() for t in [*result.accepted, *result.negatives]]  # what the browser holds
        arm = list(ARMS)[i % len(ARMS)]
        started, prepare_s, read = time.perf_counter(), None, [Trace.from_dict(t) for t in shown]
        if arm != "at_submit":
            engine.prepare_reference(read)  # fills these objects (GRPO's preparation reads them)
        if arm == "first_step":
            prepare_in_turns(engine.trainer, engine.lock, read, algorithm=args.algorithm)
        if arm != "at_submit":
            prepare_s = time.perf_counter() - started
        traces = [Trace.from_dict(t) for t in shown]
        accepted = len(result.accepted)
        order = scripted_ranking(traces[:accepted]) + list(range(accepted, len(traces)))
        started = time.perf_counter()
        metrics = engine.update(traces, order, config, case=case, ranked=accepted if result.negatives else None)
        rows.append({"case": case.id, "arm": arm, "version": metrics["version"], "traces": len(traces),
                     "prepared_traces": metrics["prepared_traces"], "prepare_s": prepare_s,
                     "wait_s": time.perf_counter() - started, "trainer_s": metrics["seconds"],
                     "probe_s": metrics.get("probe/seconds") or 0.0})
        print(rows[-1], flush=True)
    later = rows[1:]
    result = {"machine": machine(), "model": args.model, "mode": adapter_label(engine.mode, engine.lm.lora and engine.lm.lora.adapted_layers),
              "settings": f"{args.algorithm.upper()} {config.steps} steps, up to {RejectionConfig().k} ranked + "
                          f"{RejectionConfig().negatives} below the line, probe 2 + 2",
              "n_per_arm": min(sum(r["arm"] == arm for r in later) for arm in ARMS),
              **{arm: _medians([r for r in later if r["arm"] == arm]) for arm in ARMS}, "rows": rows}
    return publish(result, json_out, readme_block, begin, end)


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()
    main()
