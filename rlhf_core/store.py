"""The embedded database: every case, trace, ranking, update and checkpoint.

Clinicians' rankings are the scarce resource of the product, so the store is
built for durability first:

* one SQLite file (stdlib ``sqlite3``), WAL journal, ``synchronous=FULL`` (a
  committed transaction survives a power cut, not only a process crash),
  foreign keys on, ``busy_timeout`` so the app and a ``simulate`` run can share
  a file;
* every write is one explicit transaction; ``record_ranking`` returns only after
  its transaction (the traces it orders, the case, the ranking and its items) is
  committed, so a ranking is durable *before* the update it asks for starts;
* a ``schema_version`` table and a list of forward migrations, applied in order
  when an older file is opened (a newer file is refused with a clear error).

Layout (schema version 1)
-------------------------
``workspaces``    name PK, created, model, mode ('full' | 'lora'), description.
                  A workspace is one policy with its own history.
``cases``         case_id PK, data (Case.to_dict() JSON), created.
``traces``        (workspace, trace_id) PK, case_id, text, finish_reason,
                  prompt_ids / completion_ids / old_logps / ref_logps (JSON
                  lists, what an update needs; NULL for imported traces),
                  verdict / safety / sampling (JSON), policy_version,
                  rationalised (0/1), source, created.
``rankings``      id PK, uid (stable across exports and imports; UNIQUE per
                  workspace), workspace, case_id, prompt (JSON chat messages or
                  a plain string), group_key (sorted trace ids joined by ","; two
                  annotators of the same trace group share it), annotator,
                  comments (JSON {trace_id: text}), note, policy_version,
                  update_config (JSON of the update to run; NULL = rank only),
                  status ('pending' -> 'applied' | 'failed'; 'recorded' for
                  rank-only and imported rankings), status_detail, source, created.
``ranking_items`` (ranking_id, position) PK -- position 0 is the best --,
                  workspace, trace_id (FK to traces), input_index (the trace's
                  index in the list the update saw, so a replay is exact).
``updates``       id PK, workspace, ranking_id (NULL for offline training),
                  algorithm, config (JSON), metrics (JSON), version (after the
                  update), superseded (0/1: redone by a replay after a crash),
                  created.
``checkpoints``   id PK, workspace, version, path (relative to the database's
                  folder when inside it; NULL for a reset to the reference),
                  kind ('auto' | 'manual' | 'loaded' | 'reset' | 'train' |
                  'switch'), after_update_id (the last update the weights
                  include), deleted (0/1: pruned from disk), extra (JSON), created.
``schema_version`` version, applied.

Paths: the data folder is ``$RLHF_DATA_DIR`` or ``data/`` in the repository;
the database ``$RLHF_DB`` or ``<data>/rlhf.sqlite``; checkpoints live in
``<folder of the database>/checkpoints/<workspace>/v<version>``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .cases import Case
from .records import Trace

SCHEMA_VERSION = 3
DEFAULT_WORKSPACE = "default"
WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RANKING_STATUSES = ("pending", "applied", "recorded", "failed")
CHECKPOINT_KINDS = ("auto", "manual", "loaded", "reset", "train", "switch")

_MIGRATIONS: list[str] = [
    # 0 -> 1: the initial schema
    """
    CREATE TABLE workspaces (
        name        TEXT PRIMARY KEY,
        created     TEXT NOT NULL,
        model       TEXT,
        mode        TEXT CHECK (mode IS NULL OR mode IN ('full', 'lora')),
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE cases (
        case_id TEXT PRIMARY KEY,
        data    TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE traces (
        workspace      TEXT NOT NULL REFERENCES workspaces(name),
        trace_id       TEXT NOT NULL,
        case_id        TEXT NOT NULL,
        text           TEXT NOT NULL,
        finish_reason  TEXT,
        prompt_ids     TEXT,
        completion_ids TEXT,
        old_logps      TEXT,
        ref_logps      TEXT,
        verdict        TEXT,
        safety         TEXT,
        sampling       TEXT,
        policy_version INTEGER,
        rationalised   INTEGER NOT NULL DEFAULT 0 CHECK (rationalised IN (0, 1)),
        source         TEXT NOT NULL DEFAULT 'app',
        created        TEXT NOT NULL,
        PRIMARY KEY (workspace, trace_id)
    );
    CREATE INDEX traces_by_case ON traces(workspace, case_id);
    CREATE TABLE rankings (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        uid            TEXT NOT NULL,
        workspace      TEXT NOT NULL REFERENCES workspaces(name),
        case_id        TEXT NOT NULL,
        prompt         TEXT,
        group_key      TEXT NOT NULL,
        annotator      TEXT NOT NULL,
        comments       TEXT NOT NULL DEFAULT '{}',
        note           TEXT NOT NULL DEFAULT '',
        policy_version INTEGER,
        update_config  TEXT,
        status         TEXT NOT NULL CHECK (status IN ('pending', 'applied', 'recorded', 'failed')),
        status_detail  TEXT,
        source         TEXT NOT NULL DEFAULT 'app',
        created        TEXT NOT NULL,
        UNIQUE (workspace, uid)
    );
    CREATE INDEX rankings_by_group ON rankings(workspace, group_key);
    CREATE INDEX rankings_by_status ON rankings(workspace, status);
    CREATE TABLE ranking_items (
        ranking_id  INTEGER NOT NULL REFERENCES rankings(id),
        position    INTEGER NOT NULL,
        workspace   TEXT NOT NULL,
        trace_id    TEXT NOT NULL,
        input_index INTEGER NOT NULL,
        PRIMARY KEY (ranking_id, position),
        UNIQUE (ranking_id, trace_id),
        FOREIGN KEY (workspace, trace_id) REFERENCES traces(workspace, trace_id)
    );
    CREATE TABLE updates (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        workspace  TEXT NOT NULL REFERENCES workspaces(name),
        ranking_id INTEGER REFERENCES rankings(id),
        algorithm  TEXT NOT NULL,
        config     TEXT NOT NULL,
        metrics    TEXT NOT NULL,
        version    INTEGER NOT NULL,
        superseded INTEGER NOT NULL DEFAULT 0 CHECK (superseded IN (0, 1)),
        created    TEXT NOT NULL
    );
    CREATE INDEX updates_by_workspace ON updates(workspace, id);
    CREATE TABLE checkpoints (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        workspace       TEXT NOT NULL REFERENCES workspaces(name),
        version         INTEGER NOT NULL,
        path            TEXT,
        kind            TEXT NOT NULL,
        after_update_id INTEGER,
        deleted         INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
        extra           TEXT NOT NULL DEFAULT '{}',
        created         TEXT NOT NULL
    );
    CREATE INDEX checkpoints_by_workspace ON checkpoints(workspace, id);
    """,
    # 1 -> 2: the conclusion step (inserted tokens masked out of losses, how each trace
    # concluded), rankings whose last positions are rejected traces tied below the line,
    # and per-workspace settings (the conclusion mode)
    """
    ALTER TABLE traces ADD COLUMN loss_mask TEXT;
    ALTER TABLE traces ADD COLUMN conclusion TEXT;
    ALTER TABLE rankings ADD COLUMN ranked INTEGER;
    ALTER TABLE workspaces ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    """,
    # 2 -> 3: the reward model: each trace's reference features (features.py), and the
    # order a reward model suggested for a ranking (and whether the clinician changed it)
    """
    ALTER TABLE traces ADD COLUMN features TEXT;
    ALTER TABLE rankings ADD COLUMN suggestion TEXT;
    """,
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """``$RLHF_DATA_DIR``, else ``data/`` in the repository (git-ignored)."""
    env = os.environ.get("RLHF_DATA_DIR")
    return Path(env).expanduser() if env else repo_root() / "data"


def default_db_path() -> Path:
    """``$RLHF_DB``, else ``<data folder>/rlhf.sqlite``: the app's database."""
    env = os.environ.get("RLHF_DB")
    return Path(env).expanduser() if env else default_data_dir() / "rlhf.sqlite"


def now() -> str:
    """UTC time as ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_workspace_name(name: str) -> str:
    if not isinstance(name, str) or not WORKSPACE_NAME.fullmatch(name):
        raise ValueError(
            f"workspace name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def group_key(trace_ids: Iterable[str]) -> str:
    """The key shared by every ranking of the same set of traces."""
    return ",".join(sorted(trace_ids))


def content_id(*parts: Any, prefix: str = "imp-") -> str:
    """A stable id from content (used for imported traces and rankings)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return prefix + digest[:16]


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(value: str | None, default: Any = None) -> Any:
    return default if value is None else json.loads(value)


# --------------------------------------------------------------------------- the store


class Store:
    """One SQLite database file. Thread-safe: one connection guarded by a lock
    (Gradio handlers run in threads); other processes may open the same file."""

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False, timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_db_path()
        self.readonly = readonly
        self._scratch: tempfile.TemporaryDirectory | None = None  # set by ``temporary``
        self._lock = threading.RLock()
        self._batch_depth = 0  # > 0 while this thread holds a ``batch`` transaction open
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"database not found: {self.path}")
            uri = f"file:{self.path.resolve().as_posix()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - e.g. a network file system
                raise RuntimeError(f"could not put {self.path} in WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
        else:
            version = self.schema_version()
            if version != SCHEMA_VERSION:
                raise ValueError(f"{self.path} has schema version {version}; this code reads {SCHEMA_VERSION}")

    @classmethod
    def temporary(cls) -> "Store":
        """A database in a new temporary folder, deleted (checkpoints included) on ``close``
        or at exit: the one persistence path for a session that keeps nothing."""
        scratch = tempfile.TemporaryDirectory(prefix="rlhf-session-")
        store = cls(Path(scratch.name) / "rlhf.sqlite")
        store._scratch = scratch
        return store

    @property
    def is_temporary(self) -> bool:
        """True for a ``temporary`` database: nothing in it outlives the process."""
        return self._scratch is not None

    # -- plumbing -------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error).
        Inside ``batch`` it joins the batch's transaction instead."""
        if self.readonly:
            raise ValueError(f"{self.path} is open read-only")
        with self._lock:
            if self._batch_depth:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def batch(self) -> Iterator["Store"]:
        """All writes in the block are one transaction: all of them commit, or (on any
        exception) none. Other threads wait for the lock until it ends, so keep
        parsing and other slow work outside the block."""
        with self._tx():
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1

    def trace_texts(self, workspace: str, trace_ids: Iterable[str]) -> dict[str, str]:
        """{trace id: text} for those of ``trace_ids`` the workspace holds."""
        return self._trace_column(workspace, trace_ids, "text")

    def trace_features(self, workspace: str, trace_ids: Iterable[str]) -> dict[str, str]:
        """{trace id: reward-model features (``features.encode``)} for those that have them."""
        return {t: f for t, f in self._trace_column(workspace, trace_ids, "features").items() if f}

    def _trace_column(self, workspace: str, trace_ids: Iterable[str], column: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for chunk in _chunks(list(trace_ids), 500):
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT trace_id, {column} FROM traces WHERE workspace = ? AND trace_id IN ({marks})",
                                 [workspace, *chunk]):
                out[r["trace_id"]] = r[column]
        return out

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if not exists:
                return 0
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

    def _migrate(self) -> None:
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied TEXT NOT NULL)"
            )
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema version {current}, newer than this code ({SCHEMA_VERSION}); "
                    "upgrade the app to open it"
                )
            for target in range(current + 1, SCHEMA_VERSION + 1):
                with self._tx() as conn:
                    for statement in _split_sql(_MIGRATIONS[target - 1]):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (target, now()))

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` ("ok" when the file is sound) plus a foreign key check."""
        rows = self._query("PRAGMA integrity_check")
        result = "; ".join(str(r[0]) for r in rows)
        if result == "ok" and self._query("PRAGMA foreign_key_check"):
            return "foreign key violations"
        return result

    # -- paths ----------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.path.resolve().parent

    def checkpoint_root(self) -> Path:
        return self.folder / "checkpoints"

    def checkpoint_dir(self, workspace: str, version: int) -> Path:
        return self.checkpoint_root() / check_workspace_name(workspace) / f"v{int(version)}"

    def _store_path(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        try:
            return p.relative_to(self.folder).as_posix()
        except ValueError:
            return str(p)

    def _resolve_path(self, stored: str | None) -> Path | None:
        if stored is None:
            return None
        p = Path(stored)
        return p if p.is_absolute() else self.folder / p

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
        rows = self._query("SELECT data FROM cases WHERE case_id = ?", (case_id,))
        return Case.from_dict(json.loads(rows[0]["data"])) if rows else None

    def cases(self) -> list[Case]:
        return [Case.from_dict(json.loads(r["data"])) for r in self._query("SELECT data FROM cases ORDER BY case_id")]

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
        if not cur.rowcount and t.features:  # stored at sampling without features, computed since (ranked)
            conn.execute("UPDATE traces SET features = ? WHERE workspace = ? AND trace_id = ? AND features IS NULL",
                         (t.features, workspace, t.trace_id))
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
        rows = self._query("SELECT * FROM traces WHERE workspace = ? AND trace_id = ?", (workspace, trace_id))
        return self._row_to_trace(rows[0]) if rows else None

    def count(self, table: str, workspace: str | None = None) -> int:
        if table not in ("traces", "rankings", "updates", "checkpoints", "cases", "workspaces"):
            raise ValueError(f"unknown table {table!r}")
        if workspace is None or table in ("cases", "workspaces"):
            return int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])
        return int(self._query(f"SELECT COUNT(*) FROM {table} WHERE workspace = ?", (workspace,))[0][0])

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
            from .prompts import build_messages

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
                    from .prompts import build_messages

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
        sql = "SELECT * FROM updates WHERE workspace = ?"
        params: list[Any] = [workspace]
        if after_id is not None:
            sql += " AND id > ?"
            params.append(after_id)
        if not include_superseded:
            sql += " AND superseded = 0"
        return [self._update_dict(r) for r in self._query(sql + " ORDER BY id", params)]

    def last_update_id(self, workspace: str) -> int | None:
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
        stored = self._store_path(path)
        return bool(self._query("SELECT 1 FROM checkpoints WHERE path = ? AND deleted = 0", (stored,)))

    def mark_checkpoint_deleted(self, checkpoint_id: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE checkpoints SET deleted = 1 WHERE id = ?", (checkpoint_id,))


# --------------------------------------------------------------------------- helpers


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")


def _as_trace(t: Trace | dict) -> Trace:
    if isinstance(t, Trace):
        return t
    if isinstance(t, dict):
        return Trace.from_dict(t)
    raise ValueError(f"expected a Trace, got {type(t).__name__}")


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
