"""Run every benchmark and rewrite README's performance table.

    pip install -r bench/requirements.txt
    python -m bench [--model smollm2-135m] [--repeats 3] [--no-readme] [--only generate|update|roundtrip]

Results also go to bench/results.json. Benchmarks need a quiet machine: other
processes on the same cores skew every number (ratios less, as both sides of a
comparison run in the same process, one after the other).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import transformers

from . import generate, roundtrip, update
from .common import adapter_label, machine, write_readme_block

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN bench results -->", "<!-- END bench results -->"
PARTS = {"generate": generate, "update": update, "roundtrip": roundtrip}


def _mode(row: dict) -> str:
    return row["mode"] if row["mode"] != "lora" else adapter_label("lora", row.get("adapted_layers"))


def table(gen: dict, upd: list[dict], rt: list[dict]) -> str:
    rows = [
        f"Machine: {machine()}, transformers {transformers.__version__}, model `{gen['model']}` (float32). "
        "Medians; each ratio is from one run with both sides measured back to back.",
        "",
        "| benchmark | ours | anchor | ratio | check |",
        "| --- | --- | --- | --- | --- |",
        f"| generation, K={gen['k']} x {gen['new_tokens']} new tokens, traces ready to rank (incl. their reference "
        f"log-probs) | {gen['ours_tok_s']:.1f} tok/s | {gen['hf_generate_tok_s']:.1f} tok/s (`model.generate`) "
        f"| {gen['speedup']:.2f}x | sampling log-probs vs teacher-forced fp32: max diff "
        f"{gen['sampling_logp_max_abs_diff']:.0e} nats |",
        f"| same, decoding phase only (what `generate` does) | {gen['ours_decode_tok_s']:.1f} tok/s "
        f"| {gen['hf_generate_tok_s']:.1f} tok/s | {gen['speedup_decode']:.2f}x | lean float32 decoder (fastdecode.py) |",
        f"| same, whole call through the model's own forward (`lean_decode=False`) | "
        f"{gen['ours_model_forward_tok_s']:.1f} tok/s | {gen['hf_generate_tok_s']:.1f} tok/s "
        f"| {gen['ours_model_forward_tok_s'] / gen['hf_generate_tok_s']:.2f}x | |",
    ]
    if gen.get("llama_cpp_tok_s"):
        rows.append(
            f"| llama.cpp on the same GGUF file, one stream (its 4-bit kernels; reference point) "
            f"| | {gen['llama_cpp_tok_s']:.1f} tok/s | | not our float32 policy |"
        )
    for u in upd:
        same = abs(u["loss_ours"] - u["loss_trl"]) < 1e-4 and abs(u["logps_chosen_ours"] - u["logps_chosen_trl"]) < 1e-2
        rows.append(
            f"| DPO update, K=4 (6 pairs), {_mode(u)} | {u['ours_update_s']:.2f} s | {u['trl_step_s']:.2f} s "
            f"(TRL `DPOTrainer` step) | {u['speedup']:.1f}x | first-step loss {u['loss_ours']:.4f} vs "
            f"{u['loss_trl']:.4f}, logps/chosen {'equal' if same else 'DIFFER'} |"
        )
        rows.append(
            f"| same, activation checkpointing on | {u['ours_checkpointed_update_s']:.2f} s | {u['trl_step_s']:.2f} s "
            f"| {u['speedup_checkpointed']:.1f}x | bit-identical to the run above (tested) |"
        )
        if u.get("trl_precomputed_step_s"):
            rows.append(
                f"| same, TRL with `precompute_ref_log_probs=True` | {u['ours_update_s']:.2f} s | "
                f"{u['trl_precomputed_step_s']:.2f} s | {u['speedup_vs_precomputed']:.1f}x | ours: "
                f"{u['update_gflop']:.0f} GFLOP, {100 * u['roofline_fraction']:.0f}% of the measured "
                f"{u['gemm_peak_gflops']:.0f} GFLOPS GEMM rate |"
            )
        if u.get("ours_step_s"):
            rows.append(
                f"| same, ours timed to the end of its optimiser step (TRL's step has no post-update KL pass) "
                f"| {u['ours_step_s']:.2f} s | {u['trl_precomputed_step_s']:.2f} s | "
                f"{u['step_speedup_vs_precomputed']:.1f}x | the KL pass: {u['ours_update_s'] - u['ours_step_s']:.2f} s |"
            )
    for r in rt:
        rows.append(
            f"| round trip (ranking submitted -> metrics), {_mode(r)}, {r['steps']} steps, "
            f"checkpointing {'on' if r.get('checkpointed') else 'off'} | {r['roundtrip_s']:.2f} s "
            f"| target < 10 s | | peak RSS during the update {r['peak_rss_gb']:.2f} GiB |"
        )
        if r.get("roundtrip_prepared_s"):
            rows.append(
                f"| same, first step prepared while the clinician reads | {r['roundtrip_prepared_s']:.2f} s "
                f"| target < 10 s | | preparing took {r['prepare_s']:.2f} s before *Submit* |"
            )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--from-results", action="store_true",
                        help="rewrite README's table from bench/results.json (roofline recomputed), running nothing")
    parser.add_argument("--only", choices=PARTS, default=None,
                        help="rerun one part and keep the others from bench/results.json")
    args = parser.parse_args(argv)
    if args.from_results:
        stored = json.loads((ROOT / "bench" / "results.json").read_text())
        for row in stored["update"]:  # FLOPs from the stored counts, as ``bench.update`` counts them today
            row["update_gflop"] = update.step_gflop(row["layer_params"], row["head_params"], row["prompt_tokens"],
                                                    row["completion_tokens"], row["mode"] == "lora", checkpointed=False,
                                                    adapted=row.get("adapted_layers", 1.0))
            row["roofline_fraction"] = row["update_gflop"] / row["ours_update_s"] / row["gemm_peak_gflops"]
        (ROOT / "bench" / "results.json").write_text(json.dumps(stored, indent=2))
        write_readme_block(table(stored["generate"], stored["update"], stored["roundtrip"]), BEGIN, END)
        return
    common = ["--model", args.model, "--repeats", str(args.repeats)]
    results = json.loads((ROOT / "bench" / "results.json").read_text()) if args.only else {}
    for part in [args.only] if args.only else PARTS:
        results[part] = PARTS[part].main(common)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results["generate"], results["update"], results["roundtrip"])
    print(text)
    if not args.no_readme:
        write_readme_block(text, BEGIN, END, append_if_missing=True)


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()  # measure on the allocator the app runs on
    main()
