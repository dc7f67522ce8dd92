"""The control room's files beside the database: named checkpoints, downloads, the
workspace to reopen on the next start."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rlhf_core.training.checkpoint import read_manifest

CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ARCHIVES_KEPT = 2  # checkpoint .zip downloads kept in the export folder


def named_checkpoint(directory: Path, name: str) -> Path:
    """Where the checkpoint ``name`` lives; ValueError for a name that is not a plain file name."""
    if not CHECKPOINT_NAME.fullmatch(name or ""):
        raise ValueError("Checkpoint names use letters, digits, '.', '_' and '-' (at most 64, not starting with a dot).")
    return directory / name


def named_checkpoints(directory: Path) -> list[dict]:
    """The readable checkpoints saved under ``directory``, newest first."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                manifest = read_manifest(path)
            except ValueError:
                continue
            found.append({"name": path.name, "model": manifest["base_model"],
                          "mode": "lora" if manifest.get("lora") else "full",
                          "version": manifest["version"], "created": manifest.get("created", "")})
    return sorted(found, key=lambda c: c["created"], reverse=True)


def prune_archives(directory: Path, keep: Path, kept: int = ARCHIVES_KEPT) -> None:
    """Delete all but the ``kept`` newest .zip downloads (never ``keep``)."""
    zips = sorted(directory.glob("*.zip"), key=lambda p: p.stat().st_mtime)
    for old in zips[:-kept]:
        if old != keep:
            old.unlink(missing_ok=True)


def _state_file(db_path: Path) -> Path:
    return db_path.with_name(db_path.stem + ".control-room.json")


def remembered_workspace(db_path: Path) -> str | None:
    """The workspace in use when the app last stopped (None when unknown)."""
    path = _state_file(db_path)
    try:
        return json.loads(path.read_text())["workspace"] if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_workspace(db_path: Path, workspace: str) -> None:
    """The next start opens ``workspace`` (if the model loaded then fits it); best effort."""
    path = _state_file(db_path)
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"workspace": workspace}))
        os.replace(tmp, path)
    except OSError:
        pass
