"""The reward model at work in a workspace: refitted as rankings arrive, it suggests
an order for newly generated traces (never submits one) and keeps its versions.

A version is the head fitted on the workspace's first N rankings; it is saved
(``RewardModel.save``) under the database's folder, ``reward_models/<workspace>/vN``,
with its cross-validated accuracy, so a suggestion can always say how good the
model that made it was.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from .reward_data import rankings_from_store
from .reward_model import RewardConfig, RewardModel, cross_validated, fit

VERSIONS_KEPT = 20  # reward-model versions kept per workspace


class RankingAdvisor:
    """One reward model per workspace of a ``Store``, refitted when its rankings change."""

    def __init__(self, store, config: RewardConfig | None = None, keep: int = VERSIONS_KEPT):
        self.store, self.config, self.keep = store, config or RewardConfig(), keep
        self._lock = threading.Lock()
        self._models: dict[str, tuple[int, RewardModel | None]] = {}  # workspace -> (rankings seen, model)

    def folder(self, workspace: str) -> Path:
        """Where the workspace's reward-model versions are saved: ``reward_models/<workspace>`` by the database."""
        return self.store.folder / "reward_models" / workspace

    def model(self, workspace: str) -> RewardModel | None:
        """The workspace's current reward model (None below ``min_rankings`` rankings
        with features), refitted when a ranking was added since the last call."""
        count = self.store.count("rankings", workspace)
        with self._lock:
            seen, model = self._models.get(workspace, (-1, None))
            if seen == count:
                return model
            data = rankings_from_store(self.store, workspace)
            model = None
            if len(data) >= self.config.min_rankings:
                model = fit(data, self.config)
                model.info.update(version=len(data), cross_validated=cross_validated(data, self.config))
                self._save(workspace, model)
            self._models[workspace] = (count, model)
            return model

    def _save(self, workspace: str, model: RewardModel) -> None:
        folder = self.folder(workspace)
        model.save(folder / f"v{model.info['version']}")
        versions = sorted((p for p in folder.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
        for old in versions[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def versions(self, workspace: str) -> list[dict]:
        """The saved versions of the workspace's reward model, newest first: each manifest's
        ``info`` (version = rankings fitted on, cross-validated accuracy, fit seconds) and
        its folder."""
        found = []
        for folder in self.folder(workspace).glob("v*"):
            try:
                manifest = json.loads((folder / "manifest.json").read_text())
                found.append({**manifest["info"], "head": manifest["config"]["head"], "folder": str(folder)})
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda v: v.get("version", 0), reverse=True)

    def suggest(self, workspace: str, traces: list[dict]) -> dict | None:
        """The reward model's order of ``traces`` (dicts with ``trace_id`` and ``features``),
        best first, with its scores and how good it is; None when there is no model yet
        or a trace has no features it can read."""
        model = self.model(workspace)
        if model is None or len(traces) < 2:
            return None
        scores = model.score_traces([t.get("features") or "" for t in traces])
        if any(s is None for s in scores):
            return None
        ranked = sorted(zip(traces, scores), key=lambda pair: -pair[1])
        cv = model.info["cross_validated"]
        return {"order": [t["trace_id"] for t, _ in ranked],
                "scores": {t["trace_id"]: s for t, s in ranked},
                "reward_model": {"version": model.info["version"], "head": model.config.head,
                                 "pairwise_accuracy": cv["pairwise_accuracy"], "folds": cv.get("folds"),
                                 "heldout_pairs": cv["pairs"]}}
