"""Full fine-tuning against LoRA, per update, on the same scripted run (issue: LoRA by default on CPU?).

    python -m bench.learning --updates 8 --eval-samples 0 --png "" --json-out bench/learning_full.json --full
    python -m bench.learning --updates 8 --eval-samples 0 --png "" --json-out bench/learning_lora_top.json --lora
    python -m bench.learning_modes        # README's block between the "learning modes" markers

``bench/learning_lora.json`` holds the same run with adapters on every layer at 1e-4 (the
default before the top half), measured with the code of 2026-12-06; it stays in the table.

(``bench.learning`` also rewrites its own README block on each run; restore it with
``python -m bench.learning --no-run``.)
"""
from __future__ import annotations

import argparse

from .common import load_json, write_readme_block
from .learning import _p, mode_label

BEGIN, END = "<!-- BEGIN learning modes -->", "<!-- END learning modes -->"


def readme_block(runs: list[dict]) -> str:
    """One row per mode and case group, from the stored ``bench.learning`` results."""
    first = runs[0]
    lines = [f"Model `{first['model']}`, {first['machine']}: {first['updates']} scripted "
             f"{first['settings']['algorithm'].upper()} updates each, same cases and seeds.", "",
             "| mode | lr | cases | mean P(correct) before | after | improved | Wilcoxon p | median update | KL after (probe) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        mode = mode_label(r)
        kl = r["history"][-1].get("probe/kl")
        for key, name in (("taught", "taught"), ("heldout", "held out")):
            x = r[key]
            lines.append(f"| {mode} | {r['optimisation']['lr']:g} | {name} ({x['n']}) | {x['mean_before']:.4f} | {x['mean_after']:.4f} | "
                         f"{x['improved']}/{x['n']} | {_p(x['wilcoxon_p'])} | {r['update_seconds_median']:.1f} s | "
                         f"{'n/a' if kl is None else f'{kl:.3f}'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", default="bench/learning_full.json")
    parser.add_argument("--lora", default="bench/learning_lora.json", help="LoRA on every layer")
    parser.add_argument("--lora-top", default="bench/learning_lora_top.json", help="LoRA on the top half (the default)")
    args = parser.parse_args(argv)
    runs = [load_json(path) for path in (args.full, args.lora, args.lora_top)]
    write_readme_block(readme_block(runs), BEGIN, END)


if __name__ == "__main__":
    main()
