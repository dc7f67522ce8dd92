"""The store's traces: every sampled completion, with what an update needs."""
from __future__ import annotations

import sqlite3
from typing import Any, Iterable

from ..clinical.cases import Case
from ..rollout.records import Trace
from .database import _chunks, _dumps, _loads, now


def _as_trace(t: Trace | dict) -> Trace:
    if isinstance(t, Trace):
        return t
    if isinstance(t, dict):
        return Trace.from_dict(t)
    raise ValueError(f"expected a Trace, got {type(t).__name__}")


class TraceRows:
    """Traces (a part of ``Store``)."""

    def trace_texts(self, workspace: str, trace_ids: Iterable[str]) -> dict[str, str]:
        """{trace id: text} for those of ``trace_ids`` the workspace holds."""
        return {t: r["text"] for t, r in self._trace_columns(workspace, trace_ids, "text").items()}

    def trace_features(self, workspace: str, trace_ids: Iterable[str]) -> dict[str, str]:
        """{trace id: reward-model features (``features.encode``)} for those that have them."""
        return {t: r["features"] for t, r in self._trace_columns(workspace, trace_ids, "features").items() if r["features"]}

    def trace_references(self, workspace: str, trace_ids: Iterable[str]) -> dict[str, tuple[list[float], str]]:
        """{trace id: (reference log-probs, features)} for those of ``trace_ids`` given a
        reference pass since they were sampled (``Engine.prepare_reference``)."""
        rows = self._trace_columns(workspace, trace_ids, "ref_logps", "features")
        return {t: (_loads(r["ref_logps"], []), r["features"]) for t, r in rows.items()
                if r["ref_logps"] and r["ref_logps"] != "[]" and r["features"]}

    def _trace_columns(self, workspace: str, trace_ids: Iterable[str], *columns: str) -> dict[str, Any]:
        """{trace id: its row of ``columns``} for those of ``trace_ids`` the workspace holds."""
        out: dict[str, Any] = {}
        for chunk in _chunks(list(trace_ids), 500):
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT trace_id, {', '.join(columns)} FROM traces "
                                 f"WHERE workspace = ? AND trace_id IN ({marks})", [workspace, *chunk]):
                out[r["trace_id"]] = r
        return out

    # -- traces ---------------------------------------------------------------

    def record_traces(self, workspace: str, traces: Iterable[Trace], case: Case | None = None, source: str = "app") -> int:
        """Store sampled traces (and their case). Existing trace ids are left as they are.
        Returns how many were new."""
        traces = [_as_trace(t) for t in traces]
        with self._tx() as conn:
            self._require_workspace(conn, workspace)
            if case is not None:
                self._insert_case(conn, case)
            return sum(self._insert_trace(conn, workspace, t, source) for t in traces)

    @staticmethod
    def _insert_trace(conn: sqlite3.Connection, workspace: str, t: Trace, source: str) -> int:
        has_tokens = bool(t.prompt_ids)
        cur = conn.execute(
            """INSERT OR IGNORE INTO traces (workspace, trace_id, case_id, text, finish_reason, prompt_ids,
                 completion_ids, old_logps, ref_logps, verdict, safety, sampling, policy_version,
                 rationalised, source, created, loss_mask, conclusion, features)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                workspace, t.trace_id, t.case_id, t.text, t.finish_reason,
                _dumps(list(t.prompt_ids)) if has_tokens else None,
                _dumps(list(t.completion_ids)) if has_tokens else None,
                _dumps(list(t.old_logps)) if has_tokens else None,
                _dumps(list(t.ref_logps)) if has_tokens else None,
                _dumps(t.verdict), _dumps(t.safety), _dumps(t.sampling or {}),
                t.policy_version, int(bool(t.rationalised)), source, now(),
                _dumps(list(t.loss_mask)) if has_tokens and t.loss_mask and 0 in t.loss_mask else None,
                _dumps(t.conclusion), t.features or None,
            ),
        )
        # stored at sampling without features or reference log-probs, computed since (ranked)
        if not cur.rowcount and t.features:
            conn.execute("UPDATE traces SET features = ? WHERE workspace = ? AND trace_id = ? AND features IS NULL",
                         (t.features, workspace, t.trace_id))
        if not cur.rowcount and has_tokens and t.ref_logps:
            conn.execute("UPDATE traces SET ref_logps = ? WHERE workspace = ? AND trace_id = ? AND ref_logps = '[]'",
                         (_dumps(list(t.ref_logps)), workspace, t.trace_id))
        return cur.rowcount

    @staticmethod
    def _row_to_trace(row: sqlite3.Row) -> Trace:
        return Trace(
            case_id=row["case_id"],
            prompt_ids=_loads(row["prompt_ids"], []),
            completion_ids=_loads(row["completion_ids"], []),
            text=row["text"],
            finish_reason=row["finish_reason"] or "",
            old_logps=_loads(row["old_logps"], []),
            ref_logps=_loads(row["ref_logps"], []),
            policy_version=row["policy_version"] if row["policy_version"] is not None else 0,
            rationalised=bool(row["rationalised"]),
            sampling=_loads(row["sampling"], {}),
            trace_id=row["trace_id"],
            verdict=_loads(row["verdict"]),
            safety=_loads(row["safety"]),
            loss_mask=_loads(row["loss_mask"], []),
            conclusion=_loads(row["conclusion"]),
            features=row["features"] or "",
        )

    _LIGHT_COLUMNS = (
        "workspace, trace_id, case_id, text, finish_reason, NULL AS prompt_ids, NULL AS completion_ids, "
        "NULL AS old_logps, NULL AS ref_logps, verdict, safety, sampling, policy_version, rationalised, source, created, "
        "NULL AS loss_mask, conclusion, NULL AS features"
    )

    def traces(self, workspace: str, case_id: str | None = None, light: bool = False) -> list[Trace]:
        """Traces in the order they were stored. ``light``: without token ids and
        log-probs (empty lists), for exports and views."""
        columns = self._LIGHT_COLUMNS if light else "*"
        sql, params = f"SELECT {columns} FROM traces WHERE workspace = ?", [workspace]
        if case_id is not None:
            sql += " AND case_id = ?"
            params.append(case_id)
        return [self._row_to_trace(r) for r in self._query(sql + " ORDER BY created, rowid", params)]

    def trace(self, workspace: str, trace_id: str) -> Trace | None:
        """The workspace's trace ``trace_id``, in full (token ids and log-probs), or None."""
        rows = self._query("SELECT * FROM traces WHERE workspace = ? AND trace_id = ?", (workspace, trace_id))
        return self._row_to_trace(rows[0]) if rows else None

    def count(self, table: str, workspace: str | None = None) -> int:
        """Rows in ``table``, of ``workspace`` when given (cases and workspaces are shared: all of them)."""
        if table not in ("traces", "rankings", "updates", "checkpoints", "cases", "workspaces"):
            raise ValueError(f"unknown table {table!r}")
        if workspace is None or table in ("cases", "workspaces"):
            return int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])
        return int(self._query(f"SELECT COUNT(*) FROM {table} WHERE workspace = ?", (workspace,))[0][0])

