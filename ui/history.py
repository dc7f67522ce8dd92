"""What the charts draw: a workspace's stored updates plus this process's live records.

Updates come from the database (so after a restart the charts show everything);
the per-step points of running updates and the generations nobody ranked yet
exist only in this process and are kept here, bounded. Record kinds
("generation", "step", "update") are described in ``ui.charts``.
"""
from __future__ import annotations

import bisect
import threading
import time
import uuid

from rlhf_core.storage.store import Store

MAX_LIVE_RECORDS = 5000  # in-memory step / generation records kept for the charts
RUN_BOUNDARIES = ("reset", "loaded", "train")  # checkpoint kinds that replace the policy


def stored_history(store: Store, workspace: str) -> tuple[list[dict], int]:
    """(chart records of the workspace's stored updates, the current run number).

    A *run* ends wherever the policy was replaced (a reset, a loaded checkpoint,
    offline training): those checkpoints mark where, so the charts grey out the
    earlier runs exactly as they did live."""
    marks = sorted(c["after_update_id"] or 0 for c in store.checkpoints(workspace, include_deleted=True)
                   if c["kind"] in RUN_BOUNDARIES)
    history = store.history(workspace)
    rankings = None
    rows = []
    for h in history:
        row = {**h, "kind": "update", "run": 1 + bisect.bisect_left(marks, h["update_id"]), "x": h["version"]}
        if row.get("version_before") is None:
            row["version_before"] = h["version"] - (0 if h.get("skipped") else 1)
        if not row.get("annotator") or not row.get("case_id"):  # e.g. written by ``simulate``
            if rankings is None:
                rankings = {r["id"]: r for r in store.rankings(workspace)}
            found = rankings.get(h["ranking_id"])
            if found:
                row["annotator"] = row.get("annotator") or found["annotator"]
                row["case_id"] = row.get("case_id") or found["case_id"]
        rows.append(row)
    return rows, 1 + len(marks)


def generation_from_update(row: dict) -> dict | None:
    """The sampling numbers an update carries, as a chart record (for batches whose
    generation record is not in memory, e.g. after a restart)."""
    rate = row.get("acceptance_rate")
    if not isinstance(rate, (int, float)):
        return None
    version = row.get("sampled_version", row.get("version_before", row["version"]))
    return {"kind": "generation", "run": row["run"], "version": version, "x": version, "case_id": row.get("case_id"),
            "acceptance_rate": rate, "safety_accepted": row.get("safety_accepted"), "safety_all": row.get("safety_all"),
            "generation_id": row.get("generation_id"), "from_update": row.get("update_id")}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class ChartHistory:
    """Chart records per workspace: stored updates (cached until ``changed``) + live ones."""

    def __init__(self, store: Store, limit: int = MAX_LIVE_RECORDS):
        self.store = store
        self.limit = limit
        self._lock = threading.Lock()  # never held during model work
        self._live: list[dict] = []
        self._revision = 0  # bumped whenever the stored history may have changed
        self._cache: tuple | None = None

    def changed(self) -> None:
        """The database's history may have changed (an update, a reset, a switch)."""
        with self._lock:
            self._revision += 1

    def append(self, record: dict) -> None:
        """A live record (it must name its ``workspace``)."""
        with self._lock:
            self._live.append(record)
            if len(self._live) > self.limit:
                del self._live[: len(self._live) - self.limit]

    def stored(self, workspace: str) -> tuple[list[dict], int]:
        """``stored_history`` of ``workspace``, cached until it changes."""
        key = (workspace, self._revision)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        value = stored_history(self.store, workspace)
        self._cache = (key, value)
        return value

    def run(self, workspace: str) -> int:
        """The current run: the charts draw it in colour, earlier ones in grey."""
        return self.stored(workspace)[1]

    def records(self, workspace: str, kind: str | None = None) -> list[dict]:
        """Chart records of ``workspace``: its whole stored history plus live records;
        a generation an update already carries is drawn once."""
        with self._lock:
            live = [r for r in self._live if r.get("workspace") == workspace]
        updates = self.stored(workspace)[0]
        live_ids = {r.get("generation_id") for r in live if r["kind"] == "generation"}
        older = [g for g in map(generation_from_update, updates)
                 if g and (not g["generation_id"] or g["generation_id"] not in live_ids)]
        return [dict(r) for r in updates + older + live if kind is None or r["kind"] == kind]

    def record_generation(self, workspace: str, case_id: str, event, version: int, seconds: float) -> str:
        """Keep a finished sampling's numbers (a ``SamplerEvent``); returns its generation id."""
        report = event.report
        generation_id = uuid.uuid4().hex[:12]
        self.append({
            "kind": "generation", "workspace": workspace, "run": self.run(workspace), "version": version,
            "case_id": case_id, "generation_id": generation_id,
            "acceptance_rate": report.acceptance_rate, "sampled": report.sampled, "accepted": report.accepted,
            "rationalised": report.rationalised_accepted,
            "safety_accepted": _mean([t.safety["score"] for t in event.accepted if t.safety]),
            "safety_all": _mean([t.safety["score"] for t in event.traces if t.safety]),
            "seconds": seconds, "time": time.time(),
        })
        return generation_id

    def generation(self, generation_id: str | None) -> dict | None:
        """The live generation record ``generation_id`` (None when unknown or gone)."""
        if not generation_id:
            return None
        with self._lock:
            for r in reversed(self._live):
                if r["kind"] == "generation" and r.get("generation_id") == generation_id:
                    return dict(r)
        return None
