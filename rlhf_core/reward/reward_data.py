"""Clinicians' rankings as reward-model training data, splits, and the scores that judge a reward model.

Pure numpy: a ``RankingSet`` holds, for R rankings of at most K traces each, the
traces' reference features and their ranks (0 = best; traces tied below the
line share the last rank; -1 pads). ``rankings_from_store`` builds one from a
workspace; the metrics compare a reward model's scores with held-out rankings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..rollout.features import decode

MODEL_RANKED = "autopilot"  # ranking source of traces the reward model ranked itself: never trained on


@dataclass
class RankingSet:
    """R rankings of up to K traces, features of width F."""

    features: np.ndarray  # [R, K, F] float32, zeros at padding
    ranks: np.ndarray  # [R, K] int64, 0 = best, equal = tied, -1 = padding
    case_ids: list[str]
    ranking_ids: list[int]
    trace_ids: list[list[str]]  # R lists, aligned with the valid items of each row
    weights: np.ndarray | None = None  # [R] how much each ranking counts (agreement_weight); None: all 1

    def __len__(self) -> int:
        return len(self.case_ids)

    def subset(self, rows) -> "RankingSet":
        """The rankings at indices ``rows``, in that order, as a new ``RankingSet``."""
        rows = list(rows)
        return RankingSet(self.features[rows], self.ranks[rows], [self.case_ids[i] for i in rows],
                          [self.ranking_ids[i] for i in rows], [self.trace_ids[i] for i in rows],
                          None if self.weights is None else self.weights[rows])


def ranks_of(n: int, ranked: int | None) -> list[int]:
    """Ranks of n traces listed best to worst, the ones after ``ranked`` tied below the line."""
    return [i if ranked is None or i < ranked else ranked for i in range(n)]


def agreement_weight(mean_tau: float) -> float:
    """How much a ranking counts when other annotators ranked the same traces: (1 + mean
    Kendall's tau with them) / 2, so 1 when all agree, 0.5 when unrelated, 0 when reversed."""
    return (1.0 + mean_tau) / 2.0


def build_set(rows: list[tuple[str, int, list[str], list[np.ndarray], list[int]]],
              weights: list[float] | None = None) -> RankingSet:
    """A ``RankingSet`` from (case id, ranking id, trace ids, feature vectors, ranks) rows."""
    if not rows:
        return RankingSet(np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.int64), [], [], [])
    widths = {f.shape[0] for _, _, _, feats, _ in rows for f in feats}
    if len(widths) != 1:
        raise ValueError(f"the rankings' features have different widths {sorted(widths)} (traces of different models?)")
    k = max(len(r[2]) for r in rows)
    features = np.zeros((len(rows), k, widths.pop()), np.float32)
    ranks = np.full((len(rows), k), -1, np.int64)
    for i, (_, _, _, feats, rk) in enumerate(rows):
        features[i, : len(feats)] = np.stack(feats)
        ranks[i, : len(rk)] = rk
    return RankingSet(features, ranks, [r[0] for r in rows], [r[1] for r in rows], [list(r[2]) for r in rows],
                      None if weights is None else np.asarray(weights, np.float32))


def rankings_from_store(store, workspace: str) -> RankingSet:
    """Every clinician ranking of ``workspace`` whose traces carry features (a trace
    without them, e.g. an imported one, is left out of its ranking; a ranking left
    with fewer than two ranks is skipped). Rankings the reward model made are not used.
    Where several annotators ranked the same traces (``export.agreement``), each one's
    latest ranking is weighted by ``agreement_weight`` and earlier ones by 0."""
    from ..storage.export import agreement

    rankings = [r for r in store.rankings(workspace) if r["source"] != MODEL_RANKED]
    stored = store.trace_features(workspace, {t for r in rankings for t in r["trace_ids"]})
    shared = {row["group_key"]: row for row in agreement(store, workspace)}
    rows, weights = [], []
    for r in rankings:
        ranks = ranks_of(len(r["trace_ids"]), r["ranked"])
        kept = [(t, rk) for t, rk in zip(r["trace_ids"], ranks) if stored.get(t)]
        if len({rk for _, rk in kept}) < 2:
            continue
        rows.append((r["case_id"], r["id"], [t for t, _ in kept], [decode(stored[t]) for t, _ in kept],
                     [rk for _, rk in kept]))
        group = shared.get(r["group_key"])
        weights.append(1.0 if group is None else
                       agreement_weight(group["mean_tau"]) if r["uid"] in group["ranking_uids"] else 0.0)
    return build_set(rows, weights)


def _unit_hash(text: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:12], 16) / 16**12


def split(data: RankingSet, by: str = "ranking", heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows), by a hash of each ranking's id or of its case's id
    (``by="case"``: a held-out case's rankings are all held out)."""
    if by not in ("ranking", "case"):
        raise ValueError(f"split by 'ranking' or 'case', got {by!r}")
    keys = [str(i) for i in data.ranking_ids] if by == "ranking" else data.case_ids
    # salted: the same hash as evaluate.split_cases would hold out none of its training cases
    scores = {key: _unit_hash(f"reward-split:{key}", seed) for key in keys}
    chosen = {key for key, h in scores.items() if h < heldout_fraction}
    if not chosen and heldout_fraction > 0 and len(scores) >= 2:  # a small set still gets a held-out side
        chosen = {min(scores, key=scores.get)}
    held = [i for i, key in enumerate(keys) if key in chosen]
    return [i for i, key in enumerate(keys) if key not in chosen], held


def folds(n: int, k: int = 5) -> list[tuple[list[int], list[int]]]:
    """k (train, test) splits of range(n), each row tested once (k capped at n)."""
    k = max(1, min(k, n))
    return [([i for i in range(n) if i % k != f], [i for i in range(n) if i % k == f]) for f in range(k)]


# ---------------------------------------------------------------------- scores


def ranked_pairs(ranks: np.ndarray) -> list[tuple[int, int]]:
    """(better, worse) index pairs of one ranking's valid items with different ranks."""
    valid = [i for i, r in enumerate(ranks) if r >= 0]
    return [(i, j) for i in valid for j in valid if ranks[i] < ranks[j]]


def pairwise_accuracy(scores: np.ndarray, ranks: np.ndarray) -> tuple[float, int]:
    """(share of ranked pairs the scores order as the clinician did, pairs); a tie in
    score counts half. ``scores``/``ranks``: [R, K]."""
    right, n = 0.0, 0
    for s, rk in zip(scores, ranks):
        for i, j in ranked_pairs(rk):
            right += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
            n += 1
    return (right / n if n else float("nan")), n


def mean_kendall_tau(scores: np.ndarray, ranks: np.ndarray) -> float:
    """Mean over rankings of Kendall's tau between scores and the clinician's order,
    over the pairs the clinician ordered ((concordant - discordant) / pairs)."""
    taus = []
    for s, rk in zip(scores, ranks):
        pairs = ranked_pairs(rk)
        if pairs:
            taus.append(sum(np.sign(s[i] - s[j]) for i, j in pairs) / len(pairs))
    return float(np.mean(taus)) if taus else float("nan")


def ranking_scores(scores: np.ndarray, ranks: np.ndarray) -> dict:
    """How well [R, K] ``scores`` order R rankings: pairwise accuracy, mean Kendall's tau, pairs, rankings."""
    accuracy, pairs = pairwise_accuracy(scores, ranks)
    return {"pairwise_accuracy": accuracy, "kendall_tau": mean_kendall_tau(scores, ranks), "pairs": pairs,
            "rankings": len(ranks)}


def calibration(scores: np.ndarray, ranks: np.ndarray, bins: int = 5) -> list[dict]:
    """Predicted P(better) = sigmoid(r_a - r_b) against how often the pair really was
    ordered that way, per bin of the prediction (each pair counted in both directions)."""
    predicted, observed = [], []
    for s, rk in zip(scores, ranks):
        for i, j in ranked_pairs(rk):
            p = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
            predicted += [p, 1 - p]
            observed += [1.0, 0.0]
    predicted, observed = np.array(predicted), np.array(observed)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (predicted >= lo) & ((predicted < hi) | (hi == 1.0))
        if inside.any():
            out.append({"bin": [float(lo), float(hi)], "predicted": float(predicted[inside].mean()),
                        "observed": float(observed[inside].mean()), "pairs": int(inside.sum())})
    return out


def positions_changed(suggested: list[str], final: list[str]) -> int:
    """How many positions of the final order differ from the suggested one."""
    return sum(a != b for a, b in zip(suggested, final)) + abs(len(suggested) - len(final))
