"""Seconds a probe scoring costs after an update, for several probe sizes, on the real model.

    python -m bench.probe [--model smollm2-135m] [--sizes 2x2,3x3,4x4] [--repeats 3] [--json-out F] [--no-run]

Rewrites README's block between the "probe results" markers.

The probe set (``belief.ProbeSet``) is scored after every live update: the taught
cases (each with its fixed KL trace, the best ranked one, sampled here at v0 as
the app samples) and the held-out cases of ``evaluate``'s split. The policy is
the app's CPU default (LoRA on SmolLM2) with its adapter moved off zero, as after
updates (the cost does not depend on the values, the KL does). Reported: the
median of ``probe/seconds`` over the repeats, per size, and the prompt tokens scored.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from rlhf_core.belief import ProbeSet
from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.evaluate import split_cases
from rlhf_core.model.models import load_model
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.prompts import build_messages, encode_prompt

from .common import machine, publish, republish

BEGIN, END = "<!-- BEGIN probe results -->", "<!-- END probe results -->"


def readme_block(result: dict) -> str:
    lines = [f"Probe scoring after an update: model `{result['model']}` ({result['mode']}), {result['machine']}; "
             f"median of {result['repeats']} scorings.", "",
             "| probe (taught + held-out) | seconds per update | prompt tokens | KL trace tokens |",
             "| --- | --- | --- | --- |"]
    for row in result["sizes"]:
        lines.append(f"| {row['taught']} + {row['heldout']} | {row['seconds']:.2f} | {row['prompt_tokens']} | "
                     f"{row['kl_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", default="2x2,3x3,4x4", help="taught x held-out, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default="bench/probe.json")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    if args.no_run:
        return republish(args.json_out, readme_block, BEGIN, END)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",") if size.strip()]
    lm = load_model(args.model, device="cpu", dtype="float32", lora="auto")
    train, heldout = split_cases(load_library(default_cases_dir()))
    taught = {}
    for case in train[: max(t for t, _ in sizes)]:
        taught[case.id] = (case, sample_traces(lm, case, SamplingConfig(k=2, seed=1)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter moved off zero, as after updates
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    rows = []
    for n_taught, n_heldout in sizes:
        probe = ProbeSet(heldout=heldout[:n_heldout], max_taught=n_taught)
        for case, traces in list(taught.values())[:n_taught]:
            probe.teach(case, traces)
        probe.score(lm)  # warm-up
        seconds = [probe.score(lm)["probe/seconds"] for _ in range(args.repeats)]
        cases = probe.taught + probe.heldout
        rows.append({"taught": len(probe.taught), "heldout": len(probe.heldout), "seconds": statistics.median(seconds),
                     "all_seconds": seconds,
                     "prompt_tokens": sum(len(encode_prompt(lm.tokenizer, build_messages(c))) for c in cases),
                     "kl_tokens": sum(len(t.completion_ids) for ts in probe.completions.values() for t in ts)})
        print(rows[-1], flush=True)
    result = {"machine": machine(), "model": args.model, "mode": "LoRA" if lm.lora else "full fine-tuning",
              "repeats": args.repeats, "sizes": rows}
    return publish(result, args.json_out, readme_block, BEGIN, END)


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()
    main()
