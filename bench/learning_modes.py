"""Full fine-tuning against LoRA, per update, on the same scripted run (issue: LoRA by default on CPU?).

    python -m bench.learning --updates 8 --eval-samples 0 --png "" --json-out bench/learning_full.json --full
    python -m bench.learning --updates 8 --eval-samples 0 --png "" --json-out bench/learning_lora.json --lora
    python -m bench.learning_modes        # README's block between the "learning modes" markers

(``bench.learning`` also rewrites its own README block on each run; restore it with
``python -m bench.learning --no-run``.)
"""
from __future__ import annotations

import argparse

from .common import load_json, write_readme_block
from .learning import _p

BEGIN, END = "<!-- BEGIN learning modes -->", "<!-- END learning modes -->"


def readme_block(runs: dict[str, dict]) -> str:
    """One row per mode and case group, from the two stored ``bench.learning`` results."""
    first = next(iter(runs.values()))
    lines = [f"Model `{first['model']}`, {first['machine']}: {first['updates']} scripted "
             f"{first['settings']['algorithm'].upper()} updates each, same cases and seeds.", "",
             "| mode | lr | cases | mean P(correct) before | after | improved | Wilcoxon p | median update | KL after (probe) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, r in runs.items():
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
    parser.add_argument("--lora", default="bench/learning_lora.json")
    args = parser.parse_args(argv)
    write_readme_block(readme_block({"full": load_json(args.full), "lora": load_json(args.lora)}), BEGIN, END)


if __name__ == "__main__":
    main()
