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
from __future__ import annotations

from .database import WORKSPACE_NAME, Database, check_workspace_name, default_data_dir, default_db_path, now, repo_root
from .history_rows import CHECKPOINT_KINDS, HistoryRows
from .ranking_rows import RANKING_STATUSES, RankingRows, content_id, group_key
from .schema import SCHEMA_VERSION
from .trace_rows import TraceRows
from .workspace_rows import DEFAULT_WORKSPACE, WorkspaceRows

__all__ = [
    "Store", "DEFAULT_WORKSPACE", "WORKSPACE_NAME", "SCHEMA_VERSION", "RANKING_STATUSES", "CHECKPOINT_KINDS",
    "check_workspace_name", "group_key", "content_id", "default_data_dir", "default_db_path", "now", "repo_root",
]


class Store(WorkspaceRows, TraceRows, RankingRows, HistoryRows, Database):
    """The embedded database: one SQLite file (``Database``) and its tables, each group of
    them in its own module (workspaces and cases, traces, rankings, updates and checkpoints)."""
