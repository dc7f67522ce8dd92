"""The sequence-classification reward model: fine-tuned on K-way rankings with the same loss as
the small head, it learns what the rankings prefer and leaves the policy untouched."""
import numpy as np
import torch

from rlhf_core.model.models import load_model
from rlhf_core.reward.reward_data import build_set, pairwise_accuracy
from rlhf_core.reward.sequence_rm import SequenceRewardConfig, fit_sequence_rm, ranking_token_ids
from rlhf_core.rollout.records import Trace
from rlhf_core.storage.store import Store


def _rankings(prompt: list[int], n: int, first: int = 0):
    """n rankings of 4 completions: the more 7s (the fewer 9s), the better."""
    rows, ids = [], []
    for r in range(first, first + n):
        ids.append([prompt + [7] * k + [9] * (6 - k) for k in (6, 4, 2, 0)])
        rows.append((f"c{r}", r, [f"t{r}-{i}" for i in range(4)], [np.zeros(2, np.float32)] * 4, [0, 1, 2, 3]))
    return build_set(rows), ids


def test_it_learns_the_preference_and_leaves_the_policy_alone():
    lm = load_model("tiny-random", device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train, train_ids = _rankings([1, 2, 3], 10)
    held, held_ids = _rankings([4, 5, 6, 8], 3, first=10)  # other prompts, same preference
    untrained = fit_sequence_rm(lm, train_ids, train, SequenceRewardConfig(lr=1e-9, epochs=1))
    lora = fit_sequence_rm(lm, train_ids, train, SequenceRewardConfig(lr=1e-3, epochs=3))
    full = fit_sequence_rm(lm, train_ids, train, SequenceRewardConfig(lora=False, lr=1e-4, epochs=3))
    accuracy = {name: pairwise_accuracy(m.score_rankings(held_ids, held.ranks.shape), held.ranks)[0]
                for name, m in (("untrained", untrained), ("lora", lora), ("full", full))}
    assert accuracy["lora"] >= 0.9 and accuracy["full"] >= 0.9 and accuracy["untrained"] < 0.9, accuracy
    assert lora.info["trainable_parameters"] < full.info["trainable_parameters"]
    assert lora.info["steps"] == 30 and lora.info["mode"] == "lora"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_ranking_token_ids_are_prompt_plus_completion_from_the_store(tmp_path):
    store = Store(tmp_path / "rlhf.sqlite")
    store.ensure_workspace("w")
    traces = [Trace(case_id="c", prompt_ids=[1, 2], completion_ids=[3 + i], text=f"t{i}", finish_reason="eos",
                    old_logps=[-1.0], ref_logps=[-1.0], policy_version=0, features="") for i in range(3)]
    store.record_traces("w", traces)
    data = build_set([("c", 1, [traces[2].trace_id, traces[0].trace_id], [np.zeros(1, np.float32)] * 2, [0, 1])])
    assert ranking_token_ids(store, "w", data) == [[[1, 2, 5], [1, 2, 3]]]
    store.close()
