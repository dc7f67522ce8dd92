"""Seconds from *Generate* to K rankable traces, on library cases, with the app's defaults.

    python -m bench.rankable [--model smollm2-135m] [--cases 24] [--batches 4,8,12,16] [--max-new-tokens N] [--json-out F] [--no-run]

Rewrites README's block between the "rankable results" markers.

For each case the rejection sampler runs as the app runs it (``RejectionConfig``
defaults, K = 4, the default conclusion mode): free samples first, then
rationalised ones if too few passed. Reported per run: seconds until the K-th
accepted trace (or the end, when K is never reached), whether rationalisation
was needed, accepted traces per second and decoding tokens/s. The batch sweep
(item "bigger batches where they pay") reruns a subset of the cases with each
decoding batch size, free samples only, and reports accepted traces per second.
Both are run with the weights still the reference's (a first generation) and
with an updated policy (its reference log-probs are left to the traces that get
ranked, as the app does without a reward model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace

from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.rollout.generation import SamplingConfig, sample_stream
from rlhf_core.model.models import load_model
from rlhf_core.rollout.sampler import RejectionConfig, sample_verified_stream

from .common import machine, publish, republish
from .update import gemm_peak_gflops


def time_to_k(lm, case, sampling: SamplingConfig, rejection: RejectionConfig, reference_is_policy: bool) -> dict:
    """One rejection-sampling run, timed to its K-th accepted trace."""

    def generate(c, s, hint):
        return sample_stream(lm, c, s, 0, hint=hint, reference_is_policy=reference_is_policy)

    started = time.perf_counter()
    reached = None
    last = None
    for last in sample_verified_stream(generate, case, sampling, rejection):
        if reached is None and len(last.accepted) >= rejection.k:
            reached = time.perf_counter() - started
    total = time.perf_counter() - started
    report = last.report
    tokens = sum(len(t.completion_ids) for t in last.traces)
    return {
        "case_id": case.id,
        "seconds_to_k": reached,
        "seconds_total": total,
        "reached_k": reached is not None,
        "needed_rationalisation": report.rationalised_sampled > 0,
        "accepted_free": report.accepted,
        "sampled_free": report.sampled,
        "accepted_rationalised": report.rationalised_accepted,
        "sampled_rationalised": report.rationalised_sampled,
        "below_the_line": len(last.negatives),
        "tokens": tokens,
        "tokens_per_second": tokens / total,
    }


def _summary(runs: list[dict]) -> dict:
    times = [r["seconds_to_k"] if r["reached_k"] else r["seconds_total"] for r in runs]
    return {
        "runs": len(runs),
        "median_seconds_to_k": statistics.median(times),
        "share_reaching_k": sum(r["reached_k"] for r in runs) / len(runs),
        "share_without_rationalisation": sum(not r["needed_rationalisation"] for r in runs) / len(runs),
        "free_acceptance": sum(r["accepted_free"] for r in runs) / max(1, sum(r["sampled_free"] for r in runs)),
        "tokens_per_second": sum(r["tokens"] for r in runs) / sum(r["seconds_total"] for r in runs),
    }


def batch_sweep(lm, cases, sampling: SamplingConfig, sizes: list[int], samples: int) -> list[dict]:
    """Accepted (free) traces per second for each decoding batch size, ``samples`` draws per case."""
    rows = []
    for size in sizes:
        rejection = RejectionConfig(k=16, budget=samples, rationalise=False, batch=size, negatives=0)
        accepted = seconds = tokens = 0
        for i, case in enumerate(cases):
            run = time_to_k(lm, case, replace(sampling, k=min(size, 16), seed=1000 + i, reward_features=False),
                           rejection, True)
            accepted += run["accepted_free"]
            seconds += run["seconds_total"]
            tokens += run["tokens"]
        rows.append({"batch": size, "accepted": accepted, "sampled": samples * len(cases), "seconds": seconds,
                     "accepted_per_second": accepted / seconds, "tokens_per_second": tokens / seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


BEGIN, END = "<!-- BEGIN rankable results -->", "<!-- END rankable results -->"


def readme_block(result: dict) -> str:
    """README's table of time-to-K and the batch sweep, from a stored result."""
    rej = result["rejection"]
    lines = [f"Model `{result['model']}`, {result['machine']}; K = {rej['k']}, {rej['budget']} free samples "
             f"(batch {rej['batch']}) then up to {rej['rationalise_budget']} rationalised, "
             f"{result['sampling']['max_new_tokens']} reasoning tokens, default conclusion mode"
             + (f"; GEMM rate {result['gemm_gflops_before']:.0f} GFLOPS before the runs, "
                f"{result['gemm_gflops_after']:.0f} after." if "gemm_gflops_after" in result else "."), "",
             "| policy | cases | median s to K (or to the end) | reached K | no rationalisation needed | free acceptance | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, name in (("first_generation", "v0 (first generation)"), ("after_updates", "updated (reference pass left to the ranked traces)")):
        if label in result:
            m = result[label]["summary"]
            lines.append(f"| {name} | {m['runs']} | {m['median_seconds_to_k']:.1f} | {m['share_reaching_k']:.0%} | "
                         f"{m['share_without_rationalisation']:.0%} | {m['free_acceptance']:.1%} | {m['tokens_per_second']:.0f} |")
    if result.get("batch_sweep"):
        lines += ["", "| decoding batch | accepted / sampled | accepted traces per second | tokens/s |", "| --- | --- | --- | --- |"]
        for row in result["batch_sweep"]:
            lines.append(f"| {row['batch']} | {row['accepted']}/{row['sampled']} | {row['accepted_per_second']:.3f} | "
                         f"{row['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=24, help="library cases, evenly spaced")
    parser.add_argument("--batches", default="4,8,12,16", help="decoding batch sizes to sweep ('' to skip)")
    parser.add_argument("--sweep-cases", type=int, default=4)
    parser.add_argument("--sweep-samples", type=int, default=48, help="per case; 48 divides into every batch size swept")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"reasoning budget (default: the app's, {SamplingConfig.max_new_tokens})")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"decoding batch of the rejection sampler (default: the app's, {RejectionConfig.batch})")
    parser.add_argument("--json-out", default="bench/rankable.json")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    if args.no_run:
        return republish(args.json_out, readme_block, BEGIN, END)
    lm = load_model(args.model, device="cpu", dtype="float32")
    library = load_library(default_cases_dir())
    step = max(1, len(library) // args.cases)
    cases = library[::step][: args.cases]
    sampling = SamplingConfig(seed=1, **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    rejection = RejectionConfig(**({"batch": args.batch} if args.batch else {}))
    # this VM's speed drifts by a third within an hour: its GEMM rate before and after says how fast it ran
    result = {"machine": machine(), "gemm_gflops_before": gemm_peak_gflops(), "model": args.model,
              "sampling": asdict(sampling), "rejection": asdict(rejection)}
    for label, pristine in (("first_generation", True), ("after_updates", False)):
        runs = []
        # as the app samples (ui/runner.py) without a reward model: no reference pass at
        # sampling (at v0 the sampled log-probs are the reference's; afterwards the ranked
        # traces get theirs when the ranking is stored)
        run_sampling = replace(sampling, reward_features=False)
        for i, case in enumerate(cases if pristine else cases[: max(1, len(cases) // 3)]):
            runs.append(time_to_k(lm, case, replace(run_sampling, seed=100 * i), rejection, pristine))
            print(json.dumps(runs[-1]), flush=True)
        result[label] = {"summary": _summary(runs), "runs": runs}
        print(label, json.dumps(result[label]["summary"]), flush=True)
    sizes = [int(x) for x in args.batches.split(",") if x.strip()]
    if sizes:
        result["batch_sweep"] = batch_sweep(lm, library[::max(1, len(library) // args.sweep_cases)][: args.sweep_cases],
                                            sampling, sizes, args.sweep_samples)
    result["gemm_gflops_after"] = gemm_peak_gflops()
    return publish(result, args.json_out, readme_block, BEGIN, END)


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()
    main()
