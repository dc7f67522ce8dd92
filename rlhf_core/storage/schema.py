"""The store's schema: its version and the forward migrations that build it, applied in order
when an older file is opened (``Database._migrate``). The tables are described in ``store``."""
from __future__ import annotations

SCHEMA_VERSION = 3

MIGRATIONS: list[str] = [
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
assert len(MIGRATIONS) == SCHEMA_VERSION


def split_sql(script: str) -> list[str]:
    """The statements of a SQL script: split at each ``;``, stripped, empty ones dropped."""
    return [s.strip() for s in script.split(";") if s.strip()]
