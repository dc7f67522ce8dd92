"""The listwise reward model: features stored with traces, fitting, evaluation, suggestions."""
import math

import numpy as np
import pytest
import torch

from rlhf_core.rollout import features as feats
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.logprobs import collate
from rlhf_core.reward.reward_data import (build_set, calibration, mean_kendall_tau, pairwise_accuracy, positions_changed,
                                   rankings_from_store, ranks_of, split)
from rlhf_core.reward.reward_model import RewardConfig, RewardModel, cross_validated, evaluate, fit
from rlhf_core.storage.store import Store
from rlhf_core.reward.suggest import RankingAdvisor


def synthetic(n_rankings=120, k=6, width=40, noise=1.0, seed=0, informative=True):
    """Rankings drawn from a Plackett-Luce model whose true reward is linear in the features."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=width)
    rows = []
    for r in range(n_rankings):
        x = rng.normal(size=(k, width)).astype(np.float32)
        s = (x @ w if informative else rng.normal(size=k)) + noise * rng.gumbel(size=k)
        ranks = np.empty(k, int)
        ranks[np.argsort(-s)] = np.arange(k)
        rows.append((f"case-{r % 30}", r, [f"t{r}-{i}" for i in range(k)], list(x), list(ranks)))
    return build_set(rows)


# ------------------------------------------------------------------ features


def test_every_sampled_trace_carries_the_reference_pooled_hidden_states(tiny_lm, case):
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=10, seed=5))
    width = tiny_lm.model.config.hidden_size
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], tiny_lm.tokenizer.pad_token_id, "cpu")
    with tiny_lm.reference() as ref, torch.no_grad():
        hidden = ref.get_decoder()(input_ids=batch.input_ids).last_hidden_state  # a plain full forward
    p = batch.prompt_len
    for i, t in enumerate(traces):
        got = feats.decode(t.features)
        n = len(t.completion_ids)
        states = hidden[i, p - 1 : p + n - 1]  # the states that predict each completion token
        want = torch.cat([states.mean(0), states[-1]]).numpy()
        assert got.shape == (2 * width,)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 storage
    off = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=6, seed=5, reward_features=False))
    assert all(t.features == "" for t in off)


def test_features_survive_the_store_and_refuse_garbage(tmp_path, tiny_lm, case):
    traces = sample_traces(tiny_lm, case, SamplingConfig(k=2, max_new_tokens=6, seed=1))
    store = Store(tmp_path / "db.sqlite")
    store.ensure_workspace("default")
    store.record_traces("default", traces, case)
    assert store.trace_features("default", [t.trace_id for t in traces]) == {t.trace_id: t.features for t in traces}
    assert store.trace("default", traces[0].trace_id).features == traces[0].features
    for bad in ("not base64!", "AAA", feats.encode(torch.tensor([float("nan")]))):
        with pytest.raises(ValueError, match="not a feature vector"):
            feats.decode(bad)


def test_pooling_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    pooled = feats.pool_hidden(hidden, [3, 1])
    assert pooled[0].tolist() == [2.0, 3.0, 4.0, 5.0] and pooled[1].tolist() == [6.0, 7.0, 6.0, 7.0]


# ------------------------------------------------------------------ scores


def test_pairwise_accuracy_tau_and_calibration_by_hand():
    ranks = np.array([[0, 1, 2, -1]])
    scores = np.array([[3.0, 1.0, 2.0, 99.0]])  # pairs (0,1) ok, (0,2) ok, (1,2) wrong; padding ignored
    assert pairwise_accuracy(scores, ranks) == (pytest.approx(2 / 3), 3)
    assert mean_kendall_tau(scores, ranks) == pytest.approx(1 / 3)
    assert pairwise_accuracy(np.array([[1.0, 1.0]]), np.array([[0, 1]]))[0] == 0.5  # a tie counts half
    assert ranks_of(5, 3) == [0, 1, 2, 3, 3] and ranks_of(3, None) == [0, 1, 2]
    bins = calibration(np.array([[2.0, 0.0]]), np.array([[0, 1]]), bins=2)
    p = 1 / (1 + math.exp(-2))
    assert bins == [{"bin": [0.0, 0.5], "predicted": pytest.approx(1 - p), "observed": 0.0, "pairs": 1},
                    {"bin": [0.5, 1.0], "predicted": pytest.approx(p), "observed": 1.0, "pairs": 1}]
    assert positions_changed(["a", "b", "c"], ["a", "c", "b"]) == 2 and positions_changed(["a", "b"], ["a", "b"]) == 0


# ------------------------------------------------------------------ fitting


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_the_head_learns_the_order_behind_held_out_rankings(head):
    data = synthetic()
    train, held = split(data, by="case")
    assert held and not {data.case_ids[i] for i in held} & {data.case_ids[i] for i in train}
    config = RewardConfig(head=head, l2=0.1)  # 40 informative features: little shrinkage needed
    model = fit(data.subset(train), config)
    scores = evaluate(model, data.subset(held))
    assert scores["pairwise_accuracy"] > 0.75 and scores["kendall_tau"] > 0.5
    again = fit(data.subset(train), config)
    np.testing.assert_array_equal(model.score(data.features[held]), again.score(data.features[held]))


def test_cross_validation_does_not_leak_the_rankings_it_scores():
    noise = synthetic(n_rankings=40, width=400, informative=False, seed=3)
    config = RewardConfig(l2=0.0, steps=300, lr=0.05)
    in_sample = evaluate(fit(noise, config), noise)["pairwise_accuracy"]
    held_out = cross_validated(noise, config)["pairwise_accuracy"]
    assert in_sample > 0.9  # 40 x 6 items, 400 features: memorised
    assert abs(held_out - 0.5) < 0.1  # but nothing to learn for rankings it has not seen


def test_a_saved_version_scores_the_same_and_a_bad_folder_is_refused(tmp_path):
    data = synthetic(n_rankings=20)
    model = fit(data, RewardConfig(head="mlp", hidden=8))
    loaded = RewardModel.load(model.save(tmp_path / "v20"))
    np.testing.assert_allclose(loaded.score(data.features), model.score(data.features), rtol=1e-6)
    assert loaded.config.head == "mlp" and loaded.info["rankings"] == 20
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="junk is not a readable reward model"):
        RewardModel.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="head must be one of"):
        RewardConfig(head="transformer")
    with pytest.raises(ValueError, match="no rankings"):
        fit(build_set([]))


# ------------------------------------------------------------------ in a workspace


def test_the_advisor_suggests_once_enough_rankings_have_features(tmp_path, tiny_lm, case):
    store = Store(tmp_path / "db.sqlite")
    store.ensure_workspace("default")
    advisor = RankingAdvisor(store, RewardConfig(min_rankings=3, steps=50), keep=2)
    for seed in range(4):
        traces = sample_traces(tiny_lm, case, SamplingConfig(k=4, max_new_tokens=8, seed=seed))
        dicts = [t.to_dict() for t in traces]
        assert (advisor.suggest("default", dicts) is None) == (seed < 3)
        store.record_ranking("default", traces, [3, 0, 1, 2], "Dr A", case=case, ranked=2 if seed == 1 else None)
    data = rankings_from_store(store, "default")
    assert len(data) == 4 and data.ranks[0].tolist() == [0, 1, 2, 3] and data.ranks[1].tolist() == [0, 1, 2, 2]
    suggestion = advisor.suggest("default", dicts)
    scores = suggestion["scores"]
    assert sorted(suggestion["order"]) == sorted(t["trace_id"] for t in dicts)
    assert [scores[t] for t in suggestion["order"]] == sorted(scores.values(), reverse=True)
    assert suggestion["reward_model"]["version"] == 4 and suggestion["reward_model"]["folds"] == 4
    assert sorted(p.name for p in advisor.folder("default").iterdir()) == ["v3", "v4"]  # 2 kept
    assert advisor.suggest("default", [{**dicts[0], "features": ""}, dicts[1]]) is None


def test_where_annotators_disagree_their_rankings_count_less(tmp_path, tiny_lm, case):
    store = Store(tmp_path / "db.sqlite")
    store.ensure_workspace("default")
    shared = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=1))
    agreed = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=2))
    alone = sample_traces(tiny_lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=3))
    store.record_ranking("default", shared, [0, 1, 2], "Dr A", case=case)
    store.record_ranking("default", shared, [2, 1, 0], "Dr B", case=case)  # reversed: tau -1
    store.record_ranking("default", agreed, [0, 2, 1], "Dr A", case=case)
    store.record_ranking("default", agreed, [0, 1, 2], "Dr B", case=case)  # tau 1/3
    store.record_ranking("default", agreed, [0, 2, 1], "Dr B", case=case)  # replaces Dr B's earlier one: tau 1
    store.record_ranking("default", alone, [1, 0, 2], "Dr A", case=case)
    data = rankings_from_store(store, "default")
    assert data.weights.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    model = fit(data, RewardConfig(steps=20))
    flipped = data.subset(range(len(data)))
    flipped.ranks[[0, 1, 3]] = 2 - flipped.ranks[[0, 1, 3]]  # what the zero-weight rankings say does not matter
    np.testing.assert_array_equal(model.score(data.features[5]), fit(flipped, RewardConfig(steps=20)).score(data.features[5]))
    flipped.ranks[5] = 2 - flipped.ranks[5]  # what a weighted one says does
    assert not np.allclose(model.score(data.features[5]), fit(flipped, RewardConfig(steps=20)).score(data.features[5]))


def test_ranked_traces_sampled_without_features_get_them_when_the_ranking_is_stored(tmp_path, case):
    from rlhf_core.engine import Engine

    engine = Engine("tiny-random", device="cpu", store=tmp_path / "db.sqlite")
    bare = sample_traces(engine.lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=2, reward_features=False),
                         reference_is_policy=True)
    full = sample_traces(engine.lm, case, SamplingConfig(k=3, max_new_tokens=6, seed=2), reference_is_policy=True)
    engine.store.record_traces("default", bare, case)
    assert engine.store.trace_features("default", [t.trace_id for t in bare]) == {}
    engine.record_ranking(bare, [2, 0, 1], "Dr A", case=case)
    stored = engine.store.trace_features("default", [t.trace_id for t in bare])
    for b, f in zip(bare, full):  # the same numbers sampling would have stored
        np.testing.assert_allclose(feats.decode(stored[b.trace_id]), feats.decode(f.features), rtol=1e-2, atol=1e-2)
