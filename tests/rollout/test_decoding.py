"""Scoring a stem and its branches for several cached rows in one forward (decoding.score_branches)."""
import pytest
import torch

from rlhf_core.rollout.decoding import score_branches, tree_layout, tree_mask
from rlhf_core.rollout.logprobs import collate, completion_logps


def test_tree_layout_and_mask_let_each_branch_see_the_stem_and_itself_only():
    depth, group, predictor = tree_layout(2, [2, 1])
    assert depth == [0, 1, 2, 3, 2] and group == [-1, -1, 0, 0, 1] and predictor == [-1, 0, 1, 2, 1]
    mask = tree_mask(group, 6).int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 1, 0],  # the second branch does not see the first
                    [0, 0, 0, 0, 0, 1]]  # padding sees only itself


def test_rows_of_different_lengths_score_like_a_forward_of_each_branch(tiny_lm):
    """Two rows of one cache whose own sequences end at different positions (rows of a batch
    that stopped at different steps): every branch scores as prefix + stem + branch would."""
    model, pad = tiny_lm.model, tiny_lm.tokenizer.pad_token_id
    torch.manual_seed(0)
    prefixes = [torch.randint(5, 200, (n,)).tolist() for n in (9, 14)]
    stems = [[prefixes[0][-1], 7, 8], [prefixes[1][-1], 9]]
    branches = [[11, 12, 13], [21], [31, 32]]
    length = max(map(len, prefixes))
    ids = torch.tensor([p + [pad] * (length - len(p)) for p in prefixes])  # right-padded: causal rows stay exact
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    order = torch.tensor([1, 0])  # the rows in another order than the cache's
    kv = [(keys.index_select(0, order), values.index_select(0, order)) for keys, values in kv]
    scored = score_branches(model, kv, [len(prefixes[1]) - 1, len(prefixes[0]) - 1],
                            [stems[1], stems[0]], [branches, branches[1:]], pad)  # each row its own branches
    for (stem_logps, branch_logps), row, own in zip(scored, (1, 0), (branches, branches[1:])):
        assert len(branch_logps) == len(own)
        context = prefixes[row][:-1] + stems[row]
        stem_tail = stems[row][1:]
        with torch.no_grad():
            fresh = completion_logps(model, collate(context, own, pad, "cpu"))
            fresh_stem = completion_logps(model, collate(prefixes[row], [stem_tail], pad, "cpu"))[0]
        assert stem_logps == pytest.approx(fresh_stem[: len(stem_tail)].tolist(), abs=1e-5)
        for b, branch in enumerate(own):
            assert branch_logps[b] == pytest.approx(fresh[b, : len(branch)].tolist(), abs=1e-5)
