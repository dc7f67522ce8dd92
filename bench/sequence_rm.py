"""The small reward head against a full sequence-classification reward model, on the same rankings.

    python -m bench.sequence_rm --db DB [--workspace W] [--model smollm2-135m] [--full] [--json-out F] [--no-run]

Rewrites README's block between the "sequence reward model results" markers.

Both are fitted with the Plackett-Luce loss on the training rankings of one split
(``reward_data.split`` by ranking) and scored on the held-out rankings: the linear
head on the stored reference features (``reward_model.fit``), the sequence
classifier by fine-tuning the model's backbone (``reward.sequence_rm``, LoRA by
default) on the traces' token ids. Any database with clinician rankings will do,
e.g. the one ``bench.autopilot`` or ``bench.reward_collect`` leaves behind.
"""
from __future__ import annotations

import argparse
import json
import time

from rlhf_core.model.models import load_model
from rlhf_core.reward.reward_data import ranking_scores, rankings_from_store, split
from rlhf_core.reward.reward_model import RewardConfig, fit
from rlhf_core.reward.sequence_rm import SequenceRewardConfig, fit_sequence_rm, ranking_token_ids
from rlhf_core.storage.store import Store

from .common import machine, publish, republish

BEGIN, END = "<!-- BEGIN sequence reward model results -->", "<!-- END sequence reward model results -->"


def _scores(name: str, scores, data, seconds: float) -> dict:
    return {"model": name, **ranking_scores(scores, data.ranks), "fit_seconds": seconds}


def readme_block(result: dict) -> str:
    """README's summary of a run, from its stored result."""
    lines = [f"{result['train_rankings']} training and {result['heldout_rankings']} held-out rankings (split by ranking) "
             f"of `{result['model']}` traces (workspace `{result['source'].rsplit(':', 1)[-1]}`); {result['machine']}:", "",
             "| reward model | held-out pairwise accuracy | Kendall's tau | pairs | fit |", "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        fit_time = f"{row['fit_seconds'] * 1000:.0f} ms" if row["fit_seconds"] < 1 else f"{row['fit_seconds']:.0f} s"
        lines.append(f"| {row['model']} | {row['pairwise_accuracy']:.1%} | {row['kendall_tau']:+.2f} | {row['pairs']} | "
                     f"{fit_time} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=False)
    parser.add_argument("--workspace", default="clinician")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="fine-tune every backbone weight instead of LoRA")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 for LoRA, 1e-5 for full fine-tuning")
    parser.add_argument("--json-out", default="bench/sequence_rm.json")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    if args.no_run:
        return republish(args.json_out, readme_block, BEGIN, END)
    if not args.db:
        parser.error("--db is required unless --no-run")
    store = Store(args.db, readonly=True)
    data = rankings_from_store(store, args.workspace)
    train, held = split(data, by="ranking")
    train_set, held_set = data.subset(train), data.subset(held)
    fit(train_set.subset(range(min(5, len(train_set)))), RewardConfig())  # warm-up: torch's first call, as bench.reward
    started = time.perf_counter()
    head = fit(train_set, RewardConfig())
    head_seconds = time.perf_counter() - started
    rows = [_scores("linear head on reference features", head.score(held_set.features), held_set, head_seconds)]
    lm = load_model(args.model, device="cpu", dtype="float32")
    lr = args.lr or (1e-5 if args.full else 1e-4)
    config = SequenceRewardConfig(lora=not args.full, lr=lr, epochs=args.epochs)
    seq = fit_sequence_rm(lm, ranking_token_ids(store, args.workspace, train_set), train_set, config)
    held_ids = ranking_token_ids(store, args.workspace, held_set)
    rows.append(_scores(f"sequence classifier ({seq.info['mode']}, {seq.info['trainable_parameters']:,} trained "
                        f"parameters, {args.epochs} epochs, lr {lr:g})",
                        seq.score_rankings(held_ids, held_set.ranks.shape), held_set, seq.info["seconds"]))
    result = {"machine": machine(), "model": args.model, "source": f"{args.db}:{args.workspace}",
              "train_rankings": len(train), "heldout_rankings": len(held), "rows": rows}
    print(json.dumps(result, indent=2))
    return publish(result, args.json_out, readme_block, BEGIN, END)


if __name__ == "__main__":
    main()
