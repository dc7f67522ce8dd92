"""The store's rankings: an order of traces by one annotator, and the update it asks for."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from typing import Any, Iterable, Sequence

from ..clinical.cases import Case
from ..rollout.records import Trace
from .database import _chunks, _dumps, _loads, now
from .trace_rows import _as_trace

RANKING_STATUSES = ("pending", "applied", "recorded", "failed")


def group_key(trace_ids: Iterable[str]) -> str:
    """The key shared by every ranking of the same set of traces."""
    return ",".join(sorted(trace_ids))


def content_id(*parts: Any, prefix: str = "imp-") -> str:
    """A stable id from content (used for imported traces and rankings)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return prefix + digest[:16]


def _normalise_comments(comments: dict | Sequence[str] | None, traces: list[Trace]) -> dict[str, str]:
    if comments is None:
        return {}
    ids = [t.trace_id for t in traces]
    out: dict[str, str] = {}
    if isinstance(comments, dict):
        items = comments.items()
    elif isinstance(comments, (list, tuple)):
        if len(comments) != len(traces):
            raise ValueError(f"{len(comments)} comments for {len(traces)} traces")
        items = enumerate(comments)
    else:
        raise ValueError("comments must be a dict {trace_id: text} or a list aligned with the traces")
    for key, text in items:
        if text is None or not str(text).strip():
            continue
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(ids):
                raise ValueError(f"comment index {key} is out of range")
            key = ids[key]
        if key not in ids:
            raise ValueError(f"comment for unknown trace {key!r}")
        out[str(key)] = str(text).strip()
    return out


class RankingRows:
    """Rankings (a part of ``Store``)."""

    # -- rankings -------------------------------------------------------------

    def record_ranking(
        self,
        workspace: str,
        traces: Sequence[Trace],
        order: Sequence[int],
        annotator: str,
        *,
        comments: dict | Sequence[str] | None = None,
        note: str = "",
        case: Case | None = None,
        prompt: list[dict] | str | None = None,
        policy_version: int | None = None,
        update_config: dict | None = None,
        uid: str | None = None,
        created: str | None = None,
        source: str = "app",
        ranked: int | None = None,
        suggestion: dict | None = None,
    ) -> int:
        """Store one ranking, committed (fsync'd) before this returns; returns its id.

        ``order`` lists indices into ``traces`` from best to worst and must use
        every trace exactly once; with ``ranked`` only its first ``ranked``
        positions are ordered, the rest are tied below them (rejected traces
        below the line). ``comments`` maps trace ids (or indices into
        ``traces``) to text, or is a list aligned with ``traces``. The traces
        themselves (and ``case``) are stored too if they are not already.
        ``update_config`` (``{"algorithm": ..., **hyper-parameters}``) marks the
        ranking as waiting for that update ("pending") until ``record_update``;
        without it the ranking is "recorded" only. With a ``uid`` that the
        workspace already holds, nothing is written and the existing id is returned.
        ``suggestion``: the order a reward model suggested for these traces (``reward_model``).
        """
        traces = [_as_trace(t) for t in traces]
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError("a ranking needs an annotator name")
        if len(traces) < 2:
            raise ValueError("a ranking needs at least two traces")
        order = [int(i) for i in order]
        if sorted(order) != list(range(len(traces))):
            raise ValueError(f"the order {order} must list every one of the {len(traces)} traces exactly once")
        if ranked is not None and not 1 <= int(ranked) < len(order):
            raise ValueError(f"ranked must leave at least one trace above and one below the line, got {ranked} of {len(order)}")
        ids = [t.trace_id for t in traces]
        if len(set(ids)) != len(ids):
            raise ValueError("a ranking cannot contain the same trace twice")
        case_ids = {t.case_id for t in traces}
        if len(case_ids) != 1:
            raise ValueError(f"all ranked traces must answer the same case, got {sorted(case_ids)}")
        case_id = case_ids.pop()
        if case is not None and case.id != case_id:
            raise ValueError(f"the traces answer case {case_id!r}, not {case.id!r}")
        if update_config is not None and "algorithm" not in update_config:
            raise ValueError("update_config needs an 'algorithm'")
        comment_map = _normalise_comments(comments, traces)
        if prompt is None and case is not None:
            from ..rollout.prompts import build_messages

            prompt = build_messages(case)
        uid = uid or uuid.uuid4().hex
        with self._tx() as conn:
            self._require_workspace(conn, workspace)
            existing = conn.execute("SELECT id FROM rankings WHERE workspace = ? AND uid = ?", (workspace, uid)).fetchone()
            if existing:
                return int(existing[0])
            if case is not None:
                self._insert_case(conn, case)
            if prompt is None:
                row = conn.execute("SELECT data FROM cases WHERE case_id = ?", (case_id,)).fetchone()
                if row is not None:
                    from ..rollout.prompts import build_messages

                    prompt = build_messages(Case.from_dict(json.loads(row["data"])))
            for t in traces:
                self._insert_trace(conn, workspace, t, source)
            cur = conn.execute(
                """INSERT INTO rankings (uid, workspace, case_id, prompt, group_key, annotator, comments, note,
                     policy_version, update_config, status, source, created, ranked, suggestion)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    uid, workspace, case_id, _dumps(prompt), group_key(ids), annotator.strip(),
                    json.dumps(comment_map, ensure_ascii=False), note or "", policy_version,
                    _dumps(update_config), "pending" if update_config is not None else "recorded",
                    source, created or now(), None if ranked is None else int(ranked), _dumps(suggestion),
                ),
            )
            ranking_id = int(cur.lastrowid)
            conn.executemany(
                "INSERT INTO ranking_items (ranking_id, position, workspace, trace_id, input_index) VALUES (?, ?, ?, ?, ?)",
                [(ranking_id, pos, workspace, ids[i], i) for pos, i in enumerate(order)],
            )
        return ranking_id

    def set_ranking_status(self, ranking_id: int, status: str, detail: str | None = None) -> None:
        """Set a ranking's status (one of ``RANKING_STATUSES``) and detail; ValueError for an unknown ranking."""
        if status not in RANKING_STATUSES:
            raise ValueError(f"status must be one of {RANKING_STATUSES}, got {status!r}")
        with self._tx() as conn:
            cur = conn.execute("UPDATE rankings SET status = ?, status_detail = ? WHERE id = ?", (status, detail, ranking_id))
            if cur.rowcount == 0:
                raise ValueError(f"no ranking with id {ranking_id}")

    def _ranking_dicts(self, rows: list[sqlite3.Row]) -> list[dict]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        items: dict[int, list[tuple[int, str, int]]] = {i: [] for i in ids}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for it in self._query(
                f"SELECT ranking_id, position, trace_id, input_index FROM ranking_items WHERE ranking_id IN ({marks})",
                chunk,
            ):
                items[it["ranking_id"]].append((it["position"], it["trace_id"], it["input_index"]))
        out = []
        for r in rows:
            ordered = sorted(items[r["id"]])
            out.append(
                {
                    "id": r["id"],
                    "uid": r["uid"],
                    "workspace": r["workspace"],
                    "case_id": r["case_id"],
                    "prompt": _loads(r["prompt"]),
                    "trace_ids": [tid for _, tid, _ in ordered],  # best to worst
                    "input_indices": [ix for _, _, ix in ordered],
                    "ranked": r["ranked"],  # None: all ordered; else the rest are tied below the line
                    "suggestion": _loads(r["suggestion"]),
                    "group_key": r["group_key"],
                    "annotator": r["annotator"],
                    "comments": _loads(r["comments"], {}),
                    "note": r["note"],
                    "policy_version": r["policy_version"],
                    "update_config": _loads(r["update_config"]),
                    "status": r["status"],
                    "status_detail": r["status_detail"],
                    "source": r["source"],
                    "created": r["created"],
                }
            )
        return out

    def rankings(self, workspace: str | None = None, status: str | None = None) -> list[dict]:
        """Rankings in the order they were recorded; ``trace_ids`` runs best to worst."""
        sql, params = "SELECT * FROM rankings", []
        clauses = []
        if workspace is not None:
            clauses.append("workspace = ?")
            params.append(workspace)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return self._ranking_dicts(self._query(sql + " ORDER BY id", params))

    def ranking(self, ranking_id: int) -> dict | None:
        """The ranking ``ranking_id`` as ``rankings`` gives it, or None."""
        found = self._ranking_dicts(self._query("SELECT * FROM rankings WHERE id = ?", (ranking_id,)))
        return found[0] if found else None

    def ranking_traces(self, ranking_id: int) -> tuple[list[Trace], list[int]]:
        """(traces in the order the update saw them, ranking as indices best to worst)."""
        r = self.ranking(ranking_id)
        if r is None:
            raise ValueError(f"no ranking with id {ranking_id}")
        by_id = {}
        marks = ",".join("?" * len(r["trace_ids"]))
        for row in self._query(
            f"SELECT * FROM traces WHERE workspace = ? AND trace_id IN ({marks})", [r["workspace"], *r["trace_ids"]]
        ):
            by_id[row["trace_id"]] = self._row_to_trace(row)
        k = len(r["trace_ids"])
        traces: list[Trace | None] = [None] * k
        for tid, ix in zip(r["trace_ids"], r["input_indices"]):
            traces[ix] = by_id[tid]
        return traces, list(r["input_indices"])  # type: ignore[return-value]

