"""An engine's workspaces and checkpoints in its ``Store``.

A *workspace* is one named policy with its own history (default ``"default"``).
The engine works inside one and records everything in it (``Engine.update``
commits the ranking, status "pending", before it trains, then records the
update); this module keeps the rest:

* ``Checkpoints``: every ``every`` updates a checkpoint under
  ``<db folder>/checkpoints/<workspace>/v<version>``, recorded in one
  transaction with the update row; only the newest ``keep`` automatic ones stay
  on disk. A temporary database (``Store.temporary``) gets no automatic
  checkpoints: nothing in it outlives the process.
* ``Workspaces``: opening one (at start, or ``switch``) loads its latest
  checkpoint (or the reference when it has none), then *replays* the rankings
  whose updates the checkpoint does not contain -- updates made after it, and
  rankings a crash left pending -- from the traces' stored token ids and
  log-probs with the stored hyper-parameters, so a restart resumes exactly.

Workspaces and memory. Only the active workspace's policy is in memory;
others live in their checkpoints. Switching saves the active one if it has
updates not yet checkpointed, then loads the other's latest checkpoint (its
weights, AdamW state and version). With LoRA a workspace therefore costs one
adapter (plus its AdamW moments) on disk and a few milliseconds to switch, and
the base weights are shared by all workspaces and by the reference. With full
fine-tuning a workspace costs a full copy of the weights and 2x that for AdamW
on disk per kept checkpoint, and switching reads them back (seconds for a
135M model); memory stays at one policy + one frozen reference + one optimiser.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .rollout.conclusion import CONCLUSION_MODES
from .rollout.generation import SamplingConfig
from .rollout.teacher import fill_reference, lacks_reference
from .training.checkpoint import CheckpointError, read_manifest, save_checkpoint, verify_recorded
from .training.update import make_config

if TYPE_CHECKING:  # the engine imports this module
    from .engine import Engine

log = logging.getLogger(__name__)


class Checkpoints:
    """Saving, recording and pruning the active workspace's checkpoints."""

    def __init__(self, engine: "Engine", every: int = 1, keep: int | None = 3):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {keep}")
        self.engine, self.every, self.keep = engine, every, keep
        self.unsaved = 0  # weight-changing updates not in a checkpoint yet

    @property
    def _store(self):
        return self.engine.store

    def after_update(self, ranking_id: int) -> tuple[int, Path, str] | None:
        """Count an update that changed the weights; when one is due, save it (not recorded
        yet: ``Store.record_update`` records it with the update) and return (version, path, uid)."""
        self.unsaved += 1
        if self._store.is_temporary or self.unsaved < self.every:
            return None
        path = self.save_dir(extra={"ranking_id": ranking_id})
        self.unsaved = 0
        return self.engine.version, path, read_manifest(path)["uid"]

    def save_dir(self, extra: dict | None = None) -> Path:
        """Save the policy to the workspace's next checkpoint folder (not recorded)."""
        engine = self.engine
        target = self._store.checkpoint_dir(engine.workspace, engine.version)
        n = 1
        while target.exists() and self._store.path_in_use(target):
            target = target.with_name(f"v{engine.version}.{n}")
            n += 1
        return save_checkpoint(engine.trainer, target, {"workspace": engine.workspace, **(extra or {})})

    def record(self, path: Path | None, kind: str, extra: dict | None = None) -> None:
        """Record ``path`` (None: the reference) as the workspace's latest checkpoint."""
        engine = self.engine
        engine.workspaces.claim()
        if path is not None:
            extra = {**(extra or {}), "checkpoint_uid": read_manifest(path)["uid"]}
        self._store.record_checkpoint(engine.workspace, engine.version, path, kind=kind, extra=extra)
        self.unsaved = 0

    def save_now(self, kind: str, extra: dict | None = None) -> Path:
        """Save and record a checkpoint of the policy as it is."""
        path = self.save_dir(extra)
        self.record(path, kind, extra)
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` automatic checkpoints of the workspace."""
        if self.keep is None:
            return
        auto = [c for c in self._store.checkpoints(self.engine.workspace) if c["kind"] == "auto"]
        for ck in auto[: -self.keep]:
            if ck["path"]:
                shutil.rmtree(ck["path"], ignore_errors=True)
            self._store.mark_checkpoint_deleted(ck["id"])

    def save_pending(self) -> Path | None:
        """Checkpoint the policy if it has updates no checkpoint holds yet (on a clean
        shutdown, or before another engine opens the workspace), as an automatic
        checkpoint (pruned like the others). Returns its path, or None."""
        with self.engine.lock:
            if not self.unsaved:
                return None
            path = self.save_now("auto", {"reason": "pending updates saved"})
            self.prune()
            return path

    def current(self) -> Path:
        """The folder holding the current policy (saved first if it is not checkpointed
        yet), e.g. for a download."""
        engine = self.engine
        with engine.lock:
            latest = self._store.latest_checkpoint(engine.workspace)
            if (latest is not None and latest["path"] is not None and self.unsaved == 0
                    and latest["version"] == engine.version):
                return Path(latest["path"])
            return self.save_now("manual")


class Workspaces:
    """The engine's workspaces: open (load, then replay), switch, create, list, history."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._replay_after: int | None = None
        self._replay_owed = False  # ``open(replay=False)`` left a replay for ``replay_pending``

    @property
    def _store(self):
        return self.engine.store

    def rows(self) -> list[dict]:
        """Every workspace (name, created, model, mode, rankings, traces, updates,
        checkpoint_version, active); the active one also has its live ``version``."""
        rows = self._store.workspaces()
        for row in rows:
            row["active"] = row["name"] == self.engine.workspace
            if row["active"]:
                row["version"] = self.engine.version
        return rows

    def history(self, workspace: str | None = None) -> list[dict]:
        """Chart data: one metrics dict per update of the workspace (default the active one), in order."""
        return self._store.history(workspace or self.engine.workspace)

    def create(self, name: str, description: str = "", switch: bool = True) -> dict:
        """A new workspace whose policy starts from the reference; others are untouched."""
        engine = self.engine
        with engine.lock:
            self._store.create_workspace(name, model=engine.lm.name, mode=engine.mode, description=description)
            if switch:
                return self.switch(name)
            return {"workspace": name, "version": 0, "checkpoint": None, "replayed": 0, "updates": 0, "rankings": 0}

    def switch(self, name: str) -> dict:
        """Make ``name`` the active workspace: the current one is checkpointed if it
        has un-saved updates, then ``name``'s latest checkpoint is loaded."""
        engine = self.engine
        with engine.lock:
            if name == engine.workspace:
                return {**engine.resume_info, "workspace": name, "version": engine.version}
            self.check_compatible(name)
            if engine.checkpoints.unsaved:
                engine.checkpoints.save_now("switch")
            previous = engine.workspace
            engine.workspace = name
            try:
                engine.resume_info = self.open(name)
            except (CheckpointError, OSError) as err:
                engine.workspace = previous
                self.open(previous)
                raise ValueError(f"could not open workspace {name!r}: {err}") from err
            return engine.resume_info

    def conclusion_mode(self, choice: str | None = None) -> str:
        """The active workspace's conclusion mode (``SamplingConfig.conclusion``): ``choice``
        when given (and then saved as the workspace's setting), else the saved one, else the default."""
        engine = self.engine
        if choice is not None:
            SamplingConfig(conclusion=choice)  # validates
            self._store.set_workspace_settings(engine.workspace, conclusion=choice)
            return choice
        saved = self._store.workspace_settings(engine.workspace).get("conclusion")
        return saved if saved in CONCLUSION_MODES else SamplingConfig.conclusion

    def claim(self) -> None:
        """Record the loaded model and mode as the active workspace's."""
        engine = self.engine
        ws = self._store.workspace(engine.workspace)
        if ws is not None and (ws["model"] != engine.lm.name or ws["mode"] != engine.mode):
            self._store.set_workspace_model(engine.workspace, engine.lm.name, engine.mode)

    def check_compatible(self, name: str) -> None:
        """ValueError unless the loaded model and mode can continue workspace ``name``'s policy."""
        engine, store = self.engine, self._store
        ws = store.workspace(name)
        if ws is None:
            raise ValueError(f"no workspace named {name!r}")
        used = store.latest_checkpoint(name) is not None or store.updates(name)
        if used and ws["model"] is not None and (ws["model"] != engine.lm.name or ws["mode"] != engine.mode):
            raise ValueError(
                f"workspace {name!r} holds a {ws['model']} policy trained with "
                f"{'LoRA' if ws['mode'] == 'lora' else 'full fine-tuning'}; the loaded model is {engine.lm.name} "
                f"({'LoRA' if engine.mode == 'lora' else 'full fine-tuning'}). Load that model, or use another workspace."
            )

    def open(self, name: str, replay: bool = True) -> dict:
        """Load the workspace's latest checkpoint (or the reference) and replay what it lacks
        (``replay=False``: leave that to ``replay_pending``). Returns what was done."""
        engine, store = self.engine, self._store
        self.check_compatible(name)
        latest = None
        problems = []
        for ck in reversed(store.checkpoints(name)):  # newest first; a damaged one falls back to an older one
            if ck["path"] is None:
                engine.reset_weights()
                latest = ck
                break
            if not Path(ck["path"]).is_dir():
                continue
            try:
                verify_recorded(ck["path"], ck["version"], ck["extra"].get("checkpoint_uid"))
                engine.load_weights(ck["path"])
            except Exception as err:  # noqa: BLE001 - e.g. files cut short by a power loss, or overwritten
                log.warning("workspace %s: cannot load %s (%s); trying an older checkpoint", name, ck["path"], err)
                problems.append(str(err))
                continue
            latest = ck
            log.info("workspace %s: loaded %s (version %s)", name, ck["path"], engine.version)
            break
        if latest is None:
            engine.reset_weights()
        engine.checkpoints.unsaved = 0
        self._replay_after = latest["after_update_id"] if latest else None
        self._replay_owed = not replay
        replayed = self._replay(name, self._replay_after) if replay else 0
        return {
            "workspace": name,
            "version": engine.version,
            "checkpoint": latest["path"] if latest else None,
            "replayed": replayed,
            "skipped_checkpoints": problems,
            "updates": len(store.updates(name)),
            "rankings": store.count("rankings", name),
        }

    def replay_pending(self, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Run the replay ``open(replay=False)`` left owed (the app serves its page
        meanwhile; model work waits for the engine's lock). ``on_progress(done, total)``."""
        engine = self.engine
        with engine.lock:
            if not self._replay_owed:
                return 0
            self._replay_owed = False
            done = self._replay(engine.workspace, self._replay_after, on_progress)
            engine.resume_info = {**engine.resume_info, "version": engine.version, "replayed": done}
            return done

    def _replay(self, name: str, after_update_id: int | None,
                on_progress: Callable[[int, int], None] | None = None) -> int:
        """Re-run, in order, the updates made after the checkpoint and the rankings
        left pending, from their stored traces and hyper-parameters."""
        store = self._store
        todo: list[tuple[int, dict | None]] = []  # (ranking id, update it replaces)
        seen: set[int] = set()
        for u in store.updates(name, after_id=after_update_id):
            if u["ranking_id"] is not None and u["ranking_id"] not in seen:
                todo.append((u["ranking_id"], u))
                seen.add(u["ranking_id"])
        for r in store.rankings(name, status="pending"):
            if r["id"] not in seen:
                todo.append((r["id"], None))
                seen.add(r["id"])
        done = 0
        for position, (ranking_id, old) in enumerate(todo):
            if on_progress is not None:
                on_progress(position, len(todo))
            done += self._replay_one(ranking_id, old)
        if on_progress is not None:
            on_progress(len(todo), len(todo))
        if done:
            log.info("workspace %s: replayed %d ranking(s); now at version %d", name, done, self.engine.version)
        return done

    def _replay_one(self, ranking_id: int, old: dict | None) -> bool:
        """Replay one ranking (``old``: the update it redoes); False when it cannot be."""
        store = self._store
        traces, ranking = store.ranking_traces(ranking_id)
        stored = store.ranking(ranking_id)
        if any(not t.prompt_ids or not t.completion_ids for t in traces):
            store.set_ranking_status(ranking_id, "failed", "its traces have no token data to train on")
            return False
        # stored before their reference pass ran: the reference is fixed, so run it now
        filled = fill_reference(self.engine.lm, [t for t in traces if lacks_reference(t)])
        if filled:
            store.record_traces(self.engine.workspace, filled)
        if old is not None:
            cfg, extra = dict(old["config"]), {**old["metrics"], "replayed": True}
        else:
            cfg, extra = dict(stored["update_config"]), {"replayed": True}
        algorithm = cfg.pop("algorithm")
        try:
            config = make_config(algorithm, **cfg)
        except (TypeError, ValueError) as err:  # e.g. a value outside today's bounds
            store.set_ranking_status(ranking_id, "failed", f"cannot replay its settings: {err}")
            log.warning("could not replay ranking %s: %s", ranking_id, err)
            return False
        try:
            self.engine.apply_ranking(ranking_id, traces, ranking, config, None, extra,
                                      supersedes=old["id"] if old else None, ranked=stored["ranked"])
        except (ValueError, RuntimeError) as err:
            log.warning("could not replay ranking %s: %s", ranking_id, err)
            return False
        return True
