"""The store's history: updates (with their metrics, for the charts) and checkpoints."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from .database import now

CHECKPOINT_KINDS = ("auto", "manual", "loaded", "reset", "train", "switch")


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON (NaN and infinities become null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class HistoryRows:
    """Updates and checkpoints (a part of ``Store``)."""

    # -- updates --------------------------------------------------------------

    def record_update(
        self,
        workspace: str,
        ranking_id: int | None,
        algorithm: str,
        config: dict,
        metrics: dict,
        version: int,
        *,
        checkpoint: tuple[int, str | os.PathLike] | None = None,
        supersedes: int | None = None,
    ) -> int:
        """Record a finished update (and, in the same transaction, the ranking
        becoming "applied", a checkpoint of the result, and a replaced update
        becoming superseded). Returns the update id."""
        with self._tx() as conn:
            self._require_workspace(conn, workspace)
            if ranking_id is not None:
                row = conn.execute("SELECT workspace FROM rankings WHERE id = ?", (ranking_id,)).fetchone()
                if row is None:
                    raise ValueError(f"no ranking with id {ranking_id}")
                if row["workspace"] != workspace:
                    raise ValueError(f"ranking {ranking_id} belongs to workspace {row['workspace']!r}, not {workspace!r}")
            cur = conn.execute(
                """INSERT INTO updates (workspace, ranking_id, algorithm, config, metrics, version, created)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (workspace, ranking_id, algorithm, json.dumps(config), json.dumps(_jsonable(metrics)), int(version), now()),
            )
            update_id = int(cur.lastrowid)
            if ranking_id is not None and metrics.get("skipped"):
                # trained on but the weights are unchanged (every step skipped, or rolled back): not "applied"
                conn.execute("UPDATE rankings SET status = 'failed', status_detail = ? WHERE id = ?",
                             (str(metrics.get("skip_reason") or "no step applied"), ranking_id))
            elif ranking_id is not None:
                conn.execute("UPDATE rankings SET status = 'applied', status_detail = NULL WHERE id = ?", (ranking_id,))
            if supersedes is not None:
                conn.execute("UPDATE updates SET superseded = 1 WHERE id = ? AND workspace = ?", (supersedes, workspace))
            if checkpoint is not None:
                ck_version, ck_path, *ck_uid = checkpoint
                conn.execute(
                    """INSERT INTO checkpoints (workspace, version, path, kind, after_update_id, extra, created)
                       VALUES (?, ?, ?, 'auto', ?, ?, ?)""",
                    (workspace, int(ck_version), self._store_path(ck_path), update_id,
                     json.dumps({"checkpoint_uid": ck_uid[0]} if ck_uid else {}), now()),
                )
        return update_id

    @staticmethod
    def _update_dict(r: sqlite3.Row) -> dict:
        return {
            "id": r["id"],
            "workspace": r["workspace"],
            "ranking_id": r["ranking_id"],
            "algorithm": r["algorithm"],
            "config": json.loads(r["config"]),
            "metrics": json.loads(r["metrics"]),
            "version": r["version"],
            "superseded": bool(r["superseded"]),
            "created": r["created"],
        }

    def updates(self, workspace: str, after_id: int | None = None, include_superseded: bool = False) -> list[dict]:
        """The workspace's updates, oldest first: only those after ``after_id`` when given, superseded
        ones only with ``include_superseded``."""
        sql = "SELECT * FROM updates WHERE workspace = ?"
        params: list[Any] = [workspace]
        if after_id is not None:
            sql += " AND id > ?"
            params.append(after_id)
        if not include_superseded:
            sql += " AND superseded = 0"
        return [self._update_dict(r) for r in self._query(sql + " ORDER BY id", params)]

    def last_update_id(self, workspace: str) -> int | None:
        """The id of the workspace's latest update (superseded or not), or None."""
        row = self._query("SELECT MAX(id) FROM updates WHERE workspace = ?", (workspace,))[0]
        return row[0]

    def history(self, workspace: str) -> list[dict]:
        """The workspace's chart data: one metrics dict per (non-superseded) update, in
        order, each with ``update_id``, ``ranking_id``, ``version``, ``algorithm`` and ``created``."""
        out = []
        for u in self.updates(workspace):
            m = dict(u["metrics"])
            m.update(update_id=u["id"], ranking_id=u["ranking_id"], version=u["version"], algorithm=u["algorithm"], created=u["created"])
            out.append(m)
        return out

    # -- checkpoints ----------------------------------------------------------

    def record_checkpoint(
        self,
        workspace: str,
        version: int,
        path: str | os.PathLike | None,
        kind: str = "manual",
        after_update_id: int | None | str = "latest",
        extra: dict | None = None,
    ) -> int:
        """Record that ``path`` holds the workspace's policy at ``version`` (``path``
        None: the policy is the reference). ``after_update_id`` defaults to the
        workspace's latest update: the weights include everything recorded so far."""
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
        if path is None and kind != "reset":
            raise ValueError("only a 'reset' checkpoint may have no path")
        with self._tx() as conn:
            self._require_workspace(conn, workspace)
            if after_update_id == "latest":
                after_update_id = conn.execute("SELECT MAX(id) FROM updates WHERE workspace = ?", (workspace,)).fetchone()[0]
            cur = conn.execute(
                """INSERT INTO checkpoints (workspace, version, path, kind, after_update_id, extra, created)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (workspace, int(version), None if path is None else self._store_path(path), kind,
                 after_update_id, json.dumps(extra or {}), now()),
            )
            return int(cur.lastrowid)

    def _checkpoint_dict(self, r: sqlite3.Row) -> dict:
        return {
            "id": r["id"],
            "workspace": r["workspace"],
            "version": r["version"],
            "path": None if r["path"] is None else str(self._resolve_path(r["path"])),
            "kind": r["kind"],
            "after_update_id": r["after_update_id"],
            "deleted": bool(r["deleted"]),
            "extra": json.loads(r["extra"]),
            "created": r["created"],
        }

    def checkpoints(self, workspace: str, include_deleted: bool = False) -> list[dict]:
        """The workspace's checkpoint records, oldest first (deleted ones only with ``include_deleted``)."""
        sql = "SELECT * FROM checkpoints WHERE workspace = ?" + ("" if include_deleted else " AND deleted = 0")
        return [self._checkpoint_dict(r) for r in self._query(sql + " ORDER BY id", (workspace,))]

    def latest_checkpoint(self, workspace: str) -> dict | None:
        """The newest usable checkpoint: not pruned, and (unless it is a reset) still on disk."""
        for ck in reversed(self.checkpoints(workspace)):
            if ck["path"] is None or Path(ck["path"]).is_dir():
                return ck
        return None

    def checkpoint_owners(self, path: str | os.PathLike) -> set[str]:
        """Workspaces whose live checkpoint records name ``path``."""
        stored = self._store_path(path)
        return {r[0] for r in self._query("SELECT DISTINCT workspace FROM checkpoints WHERE path = ? AND deleted = 0",
                                          (stored,))}

    def path_in_use(self, path: str | os.PathLike) -> bool:
        """Whether a checkpoint record not marked deleted names ``path``."""
        stored = self._store_path(path)
        return bool(self._query("SELECT 1 FROM checkpoints WHERE path = ? AND deleted = 0", (stored,)))

    def mark_checkpoint_deleted(self, checkpoint_id: int) -> None:
        """Mark a checkpoint record deleted (its folder pruned); it stays in the history."""
        with self._tx() as conn:
            conn.execute("UPDATE checkpoints SET deleted = 1 WHERE id = ?", (checkpoint_id,))


# --------------------------------------------------------------------------- helpers


