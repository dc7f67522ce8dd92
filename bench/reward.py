"""The reward model on the scripted clinician's rankings: our listwise head against
TRL's RewardTrainer, and whether its suggested order saves the clinician work.

    python -m bench.reward [--db runs/reward-bench.sqlite] [--trl-rankings 60] [--no-trl]
                           [--json-out bench/reward.json] [--no-run]

Reads the rankings ``bench.reward_collect`` recorded (the default model's traces,
with the reference features the app stores). Reports, for held-out rankings
(split by ranking and by case): pairwise accuracy, Kendall's tau and
calibration of the linear and MLP heads, fitted with the Plackett-Luce loss,
and their fitting time (also on 200 rankings); TRL's ``RewardTrainer``
(a sequence-classification model from the same weights, full fine-tuning, one
epoch) trained on the exported pairs of the same training rankings, its
accuracy on the same held-out pairs and its wall time. Then the suggested
order: for every ranking after the first 30, a head fitted on the rankings
before it suggests an order; how many positions the scripted clinician's order
differs from it, against a random order (paired Wilcoxon signed-rank test).
Rewrites README's block between the "reward model results" markers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time

import numpy as np

from rlhf_core.reward.reward_data import (calibration, pairwise_accuracy, positions_changed, rankings_from_store,
                                   split)
from rlhf_core.reward.reward_model import RewardConfig, evaluate, fit
from rlhf_core.storage.store import Store

from .common import load_json, machine, save_json, write_readme_block
from .reward_collect import WORKSPACE

BEGIN, END = "<!-- reward model results -->", "<!-- /reward model results -->"


def heads(data, train, held) -> dict:
    out = {}
    for head in ("linear", "mlp"):
        config = RewardConfig(head=head)
        fit(data.subset(train[:5]), config)  # warm-up (first torch call)
        started = time.perf_counter()
        model = fit(data.subset(train), config)
        seconds = time.perf_counter() - started
        scores = model.score(data.features[held])
        out[head] = {**evaluate(model, data.subset(held)), "fit_seconds": seconds,
                     "calibration": calibration(scores, data.ranks[held])}
    return out


def fit_time_at(data, n: int) -> float:
    """Seconds to fit the linear head on ``n`` rankings (the collected ones, repeated to reach n)."""
    rows = list(itertools.islice(itertools.cycle(range(len(data))), n))
    big = data.subset(rows)
    fit(big.subset(rows[:5]))
    return statistics.median(_timed(lambda: fit(big)) for _ in range(3))


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def suggestions(data, start: int = 30, seed: int = 0) -> dict:
    """Positions the clinician changes from the suggested order vs from a random order."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    suggested, random_, kendall_s, kendall_r = [], [], [], []
    for i in range(start, len(data)):
        model = fit(data.subset(range(i)))
        valid = data.ranks[i] >= 0
        ids = np.arange(valid.sum())
        truth = list(ids[np.argsort(data.ranks[i][valid], kind="stable")])
        scores = model.score(data.features[i][valid])
        by_model = list(ids[np.argsort(-scores, kind="stable")])
        shuffled = list(rng.permutation(ids))
        suggested.append(positions_changed(by_model, truth))
        random_.append(positions_changed(shuffled, truth))
        kendall_s.append(_discordant(by_model, truth))
        kendall_r.append(_discordant(shuffled, truth))
    diffs = [s - r for s, r in zip(suggested, random_)]
    test = stats.wilcoxon(suggested, random_, alternative="less") if any(diffs) else None
    return {"rankings": len(suggested), "start": start,
            "mean_positions_changed": {"suggested": statistics.fmean(suggested), "random": statistics.fmean(random_)},
            "mean_pairs_swapped": {"suggested": statistics.fmean(kendall_s), "random": statistics.fmean(kendall_r)},
            "wilcoxon_p": float(test.pvalue) if test is not None else None}


def _discordant(a: list, b: list) -> int:
    pos = {x: i for i, x in enumerate(b)}
    return sum(pos[a[i]] > pos[a[j]] for i in range(len(a)) for j in range(i + 1, len(a)))


def trl_reward(store, data, train, held, model_name: str, epochs: float, lr: float) -> dict:
    """TRL's RewardTrainer on every (better, worse) pair of the training rankings (the token
    ids the store holds, prompt + completion), scored on the held-out rankings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from rlhf_core.model.models import load_model
    from rlhf_core.reward.reward_data import ranked_pairs

    traces = {t.trace_id: t for t in store.traces(WORKSPACE)}

    def ids(tid):
        t = traces[tid]
        return list(t.prompt_ids) + list(t.completion_ids)

    rows = []
    for r in train:
        for a, b in ranked_pairs(data.ranks[r]):
            rows.append({"chosen_ids": ids(data.trace_ids[r][a]), "rejected_ids": ids(data.trace_ids[r][b])})
    lm = load_model(model_name, device="cpu", dtype="float32")
    config = lm.model.config
    config.num_labels, config.pad_token_id = 1, lm.tokenizer.pad_token_id
    rm = AutoModelForSequenceClassification.from_config(config)
    missing = rm.model.load_state_dict(lm.model.model.state_dict(), strict=False)
    assert not missing.missing_keys, missing
    tokenizer = lm.tokenizer
    del lm
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = TRLRewardConfig(output_dir=out, per_device_train_batch_size=8, num_train_epochs=epochs, learning_rate=lr,
                               bf16=False, report_to="none", logging_steps=10, save_strategy="no", use_cpu=True,
                               max_length=None, dataloader_num_workers=0, disable_tqdm=True,
                               gradient_checkpointing=False)
        trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.train()
    train_seconds = time.perf_counter() - started
    rm.eval()
    scores = np.zeros(data.ranks[held].shape, np.float32)
    with torch.no_grad():
        for row, r in enumerate(held):
            for j, tid in enumerate(data.trace_ids[r]):
                scores[row, j] = rm(input_ids=torch.tensor([ids(tid)])).logits[0, 0].item()
    accuracy, pairs = pairwise_accuracy(scores, data.ranks[held])
    return {"pairwise_accuracy": accuracy, "pairs": pairs, "train_pairs": len(rows), "train_seconds": train_seconds,
            "epochs": epochs, "lr": lr, "mode": "full fine-tuning, sequence classification head"}


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.1%}"


def readme_block(result: dict) -> str:
    head = result["trl_comparison"]
    lines = [
        f"Scripted clinician, {result['rankings']} rankings of {result['k']} traces of SmolLM2-135M-Instruct "
        f"(`python -m bench.reward_collect`, then `python -m bench.reward`; {result['machine']}):",
        "",
        "| held-out split | head | pairwise accuracy | Kendall's tau | pairs | fit |",
        "|---|---|---|---|---|---|",
    ]
    for by in ("ranking", "case"):
        for name, r in result["splits"][by].items():
            lines.append(f"| by {by} | {name} | {_pct(r['pairwise_accuracy'])} | {r['kendall_tau']:+.2f} | {r['pairs']} | "
                         f"{r['fit_seconds'] * 1000:.0f} ms |")
    lines += ["", f"Fitting the linear head on 200 rankings: {result['fit_seconds_200'] * 1000:.0f} ms."]
    for name in ("linear", "mlp"):
        bins = result["splits"]["ranking"][name]["calibration"]
        lines += ["", f"Calibration of the {name} head (held out by ranking; predicted sigmoid(r_a - r_b) vs how often "
                      "the pair went that way): " + ", ".join(f"{b['predicted']:.2f} → {b['observed']:.2f} ({b['pairs']} pairs)"
                                                             for b in bins) + "."]
    if head.get("trl"):
        trl, ours = head["trl"], head["linear"]
        lines += ["", f"Against TRL's `RewardTrainer` on the same {head['train_rankings']} training rankings "
                      f"({trl['train_pairs']} exported pairs, {trl['mode']}, {trl['epochs']:g} epoch), held out by ranking: "
                      f"TRL {_pct(trl['pairwise_accuracy'])} in {trl['train_seconds']:.0f} s, "
                      f"our linear head {_pct(ours['pairwise_accuracy'])} in {ours['fit_seconds'] * 1000:.0f} ms "
                      f"({trl['pairs']} held-out pairs)."]
    s = result["suggestions"]
    lines += ["", f"Suggested order, rankings {s['start'] + 1}-{s['start'] + s['rankings']} (each suggested by a head "
                  f"fitted on the rankings before it): the scripted clinician changes "
                  f"{s['mean_positions_changed']['suggested']:.2f} of {result['k']} positions "
                  f"(swaps {s['mean_pairs_swapped']['suggested']:.2f} pairs) against "
                  f"{s['mean_positions_changed']['random']:.2f} ({s['mean_pairs_swapped']['random']:.2f}) from a random "
                  f"order; Wilcoxon signed-rank p = {s['wilcoxon_p']:.3g}." if s["wilcoxon_p"] is not None else ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default="runs/reward-bench.sqlite")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trl-rankings", type=int, default=60, help="rankings TRL and the head are compared on")
    parser.add_argument("--trl-epochs", type=float, default=1.0)
    parser.add_argument("--trl-lr", type=float, default=1e-5)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--json-out", default="bench/reward.json")
    parser.add_argument("--no-run", action="store_true", help="rewrite README's block from --json-out only")
    args = parser.parse_args(argv)
    if args.no_run:
        result = load_json(args.json_out)
        write_readme_block(readme_block(result), BEGIN, END, append_if_missing=True)
        return result
    store = Store(args.db)
    data = rankings_from_store(store, WORKSPACE)
    result = {"machine": machine(), "rankings": len(data), "k": int((data.ranks >= 0).sum(axis=1).max()),
              "splits": {}, "fit_seconds_200": fit_time_at(data, 200)}
    for by in ("ranking", "case"):
        train, held = split(data, by=by)
        result["splits"][by] = heads(data, train, held)
    result["suggestions"] = suggestions(data)
    subset = data.subset(range(min(args.trl_rankings, len(data))))
    train, held = split(subset, by="ranking")
    result["trl_comparison"] = {"train_rankings": len(train), "heldout_rankings": len(held),
                                **heads(subset, train, held)}
    if not args.no_trl:
        result["trl_comparison"]["trl"] = trl_reward(store, subset, train, held, args.model, args.trl_epochs, args.trl_lr)
    save_json(result, args.json_out)
    print(json.dumps(result, indent=2))
    write_readme_block(readme_block(result), BEGIN, END, append_if_missing=True)
    return result


if __name__ == "__main__":
    main()
