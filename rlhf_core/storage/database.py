"""The SQLite file under the store: one connection guarded by a lock, write transactions
(``_tx``, ``batch``), the schema's migrations, and where the database keeps its files."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import schema

# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The repository's root folder (the one holding ``rlhf_core``)."""
    return Path(__file__).resolve().parents[2]


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


WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_workspace_name(name: str) -> str:
    """``name`` when it is a valid workspace name, else ValueError."""
    if not isinstance(name, str) or not WORKSPACE_NAME.fullmatch(name):
        raise ValueError(
            f"workspace name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(value: str | None, default: Any = None) -> Any:
    return default if value is None else json.loads(value)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Database:
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
            if version != schema.SCHEMA_VERSION:
                raise ValueError(f"{self.path} has schema version {version}; this code reads {schema.SCHEMA_VERSION}")

    @classmethod
    def temporary(cls):
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
        """Close the connection; a ``temporary`` database's folder is deleted too."""
        with self._lock:
            self._conn.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self):
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
    def batch(self) -> Iterator["Database"]:
        """All writes in the block are one transaction: all of them commit, or (on any
        exception) none. Other threads wait for the lock until it ends, so keep
        parsing and other slow work outside the block."""
        with self._tx():
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        """The schema version of the file (0 before the first migration)."""
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
            if current > schema.SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema version {current}, newer than this code ({schema.SCHEMA_VERSION}); "
                    "upgrade the app to open it"
                )
            for target in range(current + 1, schema.SCHEMA_VERSION + 1):
                with self._tx() as conn:
                    for statement in schema.split_sql(schema.MIGRATIONS[target - 1]):
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
        """The folder holding the database file (and its checkpoints)."""
        return self.path.resolve().parent

    def checkpoint_root(self) -> Path:
        """Where the database's checkpoints go: ``checkpoints/`` beside the file."""
        return self.folder / "checkpoints"

    def checkpoint_dir(self, workspace: str, version: int) -> Path:
        """The folder of the workspace's checkpoint at ``version``: ``checkpoints/<workspace>/v<version>``."""
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

