"""The store's workspaces (one named policy each, with its settings) and its cases."""
from __future__ import annotations

import json
import re
import sqlite3
from typing import Any, Iterable

from ..clinical.cases import Case
from .database import _loads, check_workspace_name, now

DEFAULT_WORKSPACE = "default"


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")


class WorkspaceRows:
    """Workspaces and cases (a part of ``Store``)."""

    # -- workspaces -----------------------------------------------------------

    def create_workspace(self, name: str, model: str | None = None, mode: str | None = None, description: str = "") -> dict:
        """A new, empty workspace (its policy starts at the reference). Raises if it exists."""
        check_workspace_name(name)
        _check_mode(mode)
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO workspaces (name, created, model, mode, description) VALUES (?, ?, ?, ?, ?)",
                    (name, now(), model, mode, description or ""),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"workspace {name!r} already exists") from None
        return self.workspace(name)

    def ensure_workspace(self, name: str = DEFAULT_WORKSPACE) -> dict:
        """The workspace ``name``, created empty when it does not exist."""
        check_workspace_name(name)
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO workspaces (name, created) VALUES (?, ?)", (name, now()))
        return self.workspace(name)

    def set_workspace_model(self, name: str, model: str, mode: str) -> None:
        """Remember which base model and mode the workspace's policy is trained in."""
        _check_mode(mode)
        with self._tx() as conn:
            cur = conn.execute("UPDATE workspaces SET model = ?, mode = ? WHERE name = ?", (model, mode, name))
            if cur.rowcount == 0:
                raise ValueError(f"no workspace named {name!r}")

    def workspace_settings(self, name: str) -> dict:
        """The workspace's own settings (e.g. ``{"conclusion": "free"}``); {} when none."""
        ws = self.workspace(name)
        if ws is None:
            raise ValueError(f"no workspace named {name!r}")
        return _loads(ws.get("settings"), {}) or {}

    def set_workspace_settings(self, name: str, **settings: Any) -> dict:
        """Merge ``settings`` into the workspace's (JSON values); returns them all."""
        with self._tx() as conn:
            row = conn.execute("SELECT settings FROM workspaces WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ValueError(f"no workspace named {name!r}")
            merged = {**(_loads(row["settings"], {}) or {}), **settings}
            conn.execute("UPDATE workspaces SET settings = ? WHERE name = ?", (json.dumps(merged), name))
        return merged

    def workspace(self, name: str) -> dict | None:
        """The workspace's row as a dict, or None when there is none of that name."""
        rows = self._query("SELECT * FROM workspaces WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    def workspaces(self) -> list[dict]:
        """Every workspace with its counts and current (latest recorded) version, by creation."""
        rows = self._query(
            """
            SELECT w.*,
              (SELECT COUNT(*) FROM rankings r WHERE r.workspace = w.name) AS rankings,
              (SELECT COUNT(*) FROM traces t WHERE t.workspace = w.name) AS traces,
              (SELECT COUNT(*) FROM updates u WHERE u.workspace = w.name AND u.superseded = 0) AS updates,
              (SELECT u.version FROM updates u WHERE u.workspace = w.name AND u.superseded = 0
                 ORDER BY u.id DESC LIMIT 1) AS last_update_version,
              (SELECT c.version FROM checkpoints c WHERE c.workspace = w.name AND c.deleted = 0
                 ORDER BY c.id DESC LIMIT 1) AS checkpoint_version
            FROM workspaces w ORDER BY w.created, w.name
            """
        )
        return [dict(r) for r in rows]

    def workspace_for_model(self, model: str, mode: str, preferred: str = DEFAULT_WORKSPACE) -> str:
        """A workspace that can hold a ``model`` policy in ``mode``: ``preferred`` when it
        is new, unused or already that model's; else the first workspace of that model
        and mode; else a new one named after them (e.g. when the app switches models)."""
        _check_mode(mode)
        candidates = [preferred] + [w["name"] for w in self.workspaces() if w["name"] != preferred]
        for name in candidates:
            ws = self.workspace(name)
            if ws is None:
                if name == preferred:
                    self.ensure_workspace(name)
                    return name
                continue
            used = self.count("updates", name) or self.checkpoints(name)
            if (ws["model"], ws["mode"]) == (model, mode) or (name == preferred and not used):
                return name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{mode}").strip("-.")[:56] or "workspace"
        name, n = base, 1
        while self.workspace(name) is not None:
            n += 1
            name = f"{base}-{n}"
        self.create_workspace(name, model=model, mode=mode)
        return name

    def _require_workspace(self, conn: sqlite3.Connection, name: str) -> None:
        if not conn.execute("SELECT 1 FROM workspaces WHERE name = ?", (name,)).fetchone():
            raise ValueError(f"no workspace named {name!r}; create it first")

    # -- cases ----------------------------------------------------------------

    def record_cases(self, cases: Iterable[Case]) -> int:
        """Store cases by id (the first stored content of an id is kept). Returns how many were new."""
        cases = list(cases)
        for c in cases:
            if not isinstance(c, Case):
                raise ValueError(f"expected a Case, got {type(c).__name__}")
        with self._tx() as conn:
            return sum(self._insert_case(conn, c) for c in cases)

    @staticmethod
    def _insert_case(conn: sqlite3.Connection, case: Case) -> int:
        cur = conn.execute(
            "INSERT OR IGNORE INTO cases (case_id, data, created) VALUES (?, ?, ?)",
            (case.id, json.dumps(case.to_dict(), ensure_ascii=False), now()),
        )
        return cur.rowcount

    def case(self, case_id: str) -> Case | None:
        """The stored case ``case_id``, or None."""
        rows = self._query("SELECT data FROM cases WHERE case_id = ?", (case_id,))
        return Case.from_dict(json.loads(rows[0]["data"])) if rows else None

    def cases(self) -> list[Case]:
        """Every stored case, by id."""
        return [Case.from_dict(json.loads(r["data"])) for r in self._query("SELECT data FROM cases ORDER BY case_id")]

