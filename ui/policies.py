"""The control room's policy administration: the model registry and model switches, reset,
named checkpoints, workspaces, exports, downloads and imports. Each call that touches the
weights takes the room's one lock."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core.model.models import REGISTRY, availability
from rlhf_core.storage.export import agreement, checkpoint_archive, export_file
from rlhf_core.storage.importer import import_file

from .files import named_checkpoint, named_checkpoints, prune_archives, remember_workspace

if TYPE_CHECKING:  # the room builds its policy manager
    from .state import ControlRoom


class PolicyManager:
    """Models, checkpoints, workspaces, exports and imports of the room's policy."""

    def __init__(self, room: "ControlRoom"):
        self.room = room

    def models(self) -> list[dict]:
        """The registry with each model's state: loaded, available, downloadable or unavailable."""
        room = self.room
        rows = []
        for name, spec in REGISTRY.items():
            state, why = availability(name)
            if name == room.engine.lm.name:
                state, why = "loaded", f"{room.engine.mode} on {room.engine.describe()['device']}"
            rows.append({"model": name, "state": state, "why": why, "description": spec.description})
        return rows

    def switch_model(self, model: str, lora: bool) -> dict:
        """Load another model (the old one stays until the new one has loaded). The current
        policy is checkpointed first and the new model opens a workspace it can use: the
        current one when it fits, else its own (``Store.workspace_for_model``)."""
        room = self.room
        with room.lock:
            old = room.engine
            old.checkpoints.save_pending()
            room.engine = room.new_engine(model, lora, old.workspace)
            remember_workspace(room.store.path, room.workspace)
            room.build_probe()
            room.policy_replaced(epoch=True)
            return room.describe()

    def reset(self) -> dict:
        room = self.room
        with room.lock:
            room.engine.reset()
            room.policy_replaced()
            return room.describe()

    def checkpoint_path(self, name: str) -> Path:
        room = self.room
        return named_checkpoint(room.checkpoint_dir, name)

    def save(self, name: str) -> Path:
        room = self.room
        path = self.checkpoint_path(name)
        with room.lock:
            out = room.engine.save(path, extra={"rankings": room.ranking_count(), "run": room.run,
                                                "workspace": room.workspace})
            room.changed()
            return out

    def load(self, name: str) -> dict:
        room = self.room
        path = self.checkpoint_path(name)
        with room.lock:
            manifest = room.engine.load(path)
            room.policy_replaced()
            return manifest

    def checkpoints(self) -> list[dict]:
        """Saved checkpoints under ``checkpoint_dir``, newest first."""
        room = self.room
        return named_checkpoints(room.checkpoint_dir)


    # ------------------------------------------------------------ workspaces
    def workspaces(self) -> list[dict]:
        room = self.room
        return room.engine.workspaces.rows()

    def create_workspace(self, name: str) -> dict:
        """A new, empty workspace for the loaded model (not switched to)."""
        room = self.room
        name = (name or "").strip()
        with room.lock:
            room.engine.workspaces.create(name, switch=False)
        room.changed()
        return room.store.workspace(name)

    def switch_workspace(self, name: str) -> dict:
        """Make ``name`` the active workspace (its latest checkpoint is loaded, what it
        lacks replayed); the current one is checkpointed first if it needs it."""
        room = self.room
        with room.lock:
            info = room.engine.workspaces.switch(name)
            remember_workspace(room.store.path, room.workspace)
            room.build_probe()
            room.changed(persisted=True)
            return info

    def agreement(self) -> list[dict]:
        room = self.room
        return agreement(room.store, room.workspace)

    # --------------------------------------------------------------- exports
    def export(self, fmt: str, exclude_rationalised: bool = False, all_workspaces: bool = False) -> Path:
        """Write an export (trl | trl-text | rankings | agreement) for a download."""
        room = self.room
        return export_file(room.store, fmt, room.export_dir, None if all_workspaces else room.workspace,
                           exclude_rationalised)

    def checkpoint_archive(self) -> Path:
        """A .zip of the current policy's checkpoint, for a download (saved first if needed)."""
        room = self.room
        with room.lock:
            engine = room.engine
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{room.workspace}-v{engine.version}-{stamp}-{uuid.uuid4().hex[:6]}"
            path = checkpoint_archive(engine.checkpoints.current(), room.export_dir / f"{name}.zip")
            room.changed()  # a save may have cleared the "not in a checkpoint" count
        prune_archives(room.export_dir, keep=path)
        return path

    def import_rankings(self, path: str | Path, annotator: str | None = None) -> dict:
        """Import a rankings export or a TRL pair file into the active workspace (the policy
        is not updated; the rankings count for exports and the agreement view)."""
        room = self.room
        counts = import_file(room.store, path, room.workspace, annotator or None)
        room.changed(persisted=True)
        return counts
