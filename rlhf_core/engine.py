"""One object per running app: the loaded policy, its trainer, and the calls the
UI and the headless loop make (sample verified traces, update, save, load, reset).

Generation and updates share ``lock`` so two callers never interleave a
sampling run with an update of the weights it is reading.

Persistence (optional: pass ``store=``)
---------------------------------------
With a ``Store`` attached the engine works inside one *workspace* (a named
policy with its own history; default ``"default"``) and records everything:

* ``sample`` stores every trace it draws (accepted, rejected, rationalised)
  with its case;
* ``update`` first commits the ranking (with the update it asks for, status
  "pending"), then trains, then records the update, and every
  ``checkpoint_every`` updates a checkpoint under
  ``<db folder>/checkpoints/<workspace>/v<version>``, in one transaction with
  the update row; only the newest ``keep_checkpoints`` automatic checkpoints
  stay on disk;
* opening a workspace (at start, or ``switch_workspace``) loads its latest
  checkpoint (or the reference when it has none) and then *replays* the
  rankings whose updates the checkpoint does not contain -- updates made after
  it, and rankings a crash left pending -- from the traces' stored token ids
  and log-probs with the stored hyper-parameters, so a restart resumes exactly.

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
import os
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from .cases import Case
from .belief import ProbeSet
from .checkpoint import CheckpointError, load_into, read_manifest, save_checkpoint, verify_recorded
from .conclusion import CONCLUSION_MODES
from .generation import SamplingConfig, Trace, reference_pass, sample_stream
from .models import DEFAULT_MODEL, LoadedModel, LoraSettings, load_model
from .sampler import RejectionConfig, SamplerEvent, SamplerResult, sample_verified_stream
from .update import DPOConfig, GRPOConfig, PolicyTrainer, make_config

log = logging.getLogger(__name__)


class Engine:
    """The policy being taught, and everything that reads or changes it."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        lora: LoraSettings | bool | None = None,
        device: str | None = None,
        dtype: str | None = None,
        *,
        store=None,
        workspace: str | None = None,
        checkpoint_every: int = 1,
        keep_checkpoints: int | None = 3,
        resume: bool = True,
        lock: threading.RLock | None = None,
    ):
        """``store``: a ``Store`` or a database path (None: nothing is persisted).
        ``workspace``: the one to open (created if missing; default "default").
        ``checkpoint_every``: save the policy every N updates (replay covers the rest).
        ``keep_checkpoints``: automatic checkpoints kept per workspace (None: all).
        ``resume``: replay rankings the latest checkpoint does not contain.
        ``lock``: the lock held for every use of the weights (default: a new one; an app
        hands its one lock to every engine it creates)."""
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if keep_checkpoints is not None and keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {keep_checkpoints}")
        self.lock = lock or threading.RLock()
        self.trainer = PolicyTrainer(load_model(model, device=device, dtype=dtype, lora=lora))
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self._since_checkpoint = 0  # weight-changing updates not in a checkpoint yet
        self._pristine = True  # the weights are the freshly loaded reference
        self.resume_info: dict = {}
        self.probe: ProbeSet | None = None  # scored after every live update (belief.py)
        if store is not None and not hasattr(store, "record_ranking"):
            from .store import Store

            store = Store(store)
        self.store = store
        from .store import DEFAULT_WORKSPACE, check_workspace_name

        self.workspace = check_workspace_name(workspace or DEFAULT_WORKSPACE)
        if self.store is not None:
            self.store.ensure_workspace(self.workspace)
            self.resume_info = self._open_workspace(self.workspace, replay=resume)

    def attach_store(self, store, workspace: str | None = None, *, preferred: str | None = None, resume: bool = True) -> dict:
        """Attach a database to an engine built without one (e.g. once the model has
        loaded, so its workspace can depend on it) and open a workspace: ``workspace``
        (created if missing), or when None the one ``Store.workspace_for_model`` picks
        for the loaded model, starting from ``preferred``. Returns ``resume_info``."""
        if self.store is not None:
            raise ValueError("this engine already has a database attached")
        from .store import DEFAULT_WORKSPACE, Store, check_workspace_name

        if not hasattr(store, "record_ranking"):
            store = Store(store)
        with self.lock:
            if workspace is None:
                workspace = store.workspace_for_model(self.lm.name, self.mode, preferred or DEFAULT_WORKSPACE)
            check_workspace_name(workspace)
            store.ensure_workspace(workspace)
            previous, self.workspace, self.store = self.workspace, workspace, store
            try:
                self.resume_info = self._open_workspace(workspace, replay=resume)
            except BaseException:
                self.store, self.workspace = None, previous
                raise
            return self.resume_info

    @property
    def lm(self) -> LoadedModel:
        return self.trainer.lm

    @property
    def version(self) -> int:
        return self.trainer.version

    @property
    def is_reference(self) -> bool:
        """The weights are still exactly the reference's (nothing applied since load or reset)."""
        return self._pristine

    @property
    def mode(self) -> str:
        return "lora" if self.lm.lora is not None else "full"

    def conclusion_mode(self, choice: str | None = None) -> str:
        """The workspace's conclusion mode (``SamplingConfig.conclusion``): ``choice``
        when given (and then saved as the workspace's setting), else the saved one,
        else the default."""
        if choice is not None:
            SamplingConfig(conclusion=choice)  # validates
            if self.store is not None:
                self.store.set_workspace_settings(self.workspace, conclusion=choice)
            return choice
        if self.store is not None:
            saved = self.store.workspace_settings(self.workspace).get("conclusion")
            if saved in CONCLUSION_MODES:
                return saved
        return SamplingConfig.conclusion

    def describe(self) -> dict:
        lm = self.lm
        info = {
            "model": lm.name,
            "mode": self.mode,
            "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "version": self.version,
            "trainable_parameters": sum(p.numel() for p in lm.trainable_parameters),
        }
        if self.store is not None:
            info.update(workspace=self.workspace, db=str(self.store.path))
        return info

    # -- sampling -------------------------------------------------------------

    def generate_batch(self, case: Case, config: SamplingConfig, hint: str | None = None):
        """One batch of raw traces (the ``generate`` callable the sampler expects).
        While the weights are still the reference's, no reference pass is needed."""
        return sample_stream(self.lm, case, config, self.version, hint=hint, reference_is_policy=self._pristine)

    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces for a case, streaming progress.
        With a store, every trace drawn is recorded before the final event is yielded."""
        with self.lock:
            for event in sample_verified_stream(self.generate_batch, case, sampling, rejection):
                if event.phase == "done" and self.store is not None:
                    self.store.record_traces(self.workspace, event.traces, case)
                yield event

    def sample_verified(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> SamplerResult:
        """Non-streaming ``sample`` (records traces like it)."""
        last = None
        for last in self.sample(case, sampling, rejection):
            pass
        return SamplerResult(last.accepted, last.traces, last.report, last.negatives)

    # -- rankings and updates -------------------------------------------------

    def record_ranking(
        self,
        traces: list[Trace],
        ranking: list[int],
        annotator: str,
        comments: dict | list | None = None,
        note: str = "",
        case: Case | None = None,
        ranked: int | None = None,
        suggestion: dict | None = None,
    ) -> int:
        """Store a ranking without updating the policy (e.g. a second annotator of
        the same traces, for the agreement view). Returns the ranking id."""
        store = self._require_store()
        with self.lock:
            self._fill_features(traces)
            return store.record_ranking(
                self.workspace, traces, ranking, annotator, comments=comments, note=note, case=case,
                policy_version=self.version, ranked=ranked, suggestion=suggestion,
            )

    def update(
        self,
        traces: list[Trace],
        ranking: list[int],
        config: DPOConfig | GRPOConfig,
        on_step: Callable[[dict], None] | None = None,
        *,
        annotator: str | None = None,
        comments: dict | list | None = None,
        note: str = "",
        case: Case | None = None,
        extra_metrics: dict | None = None,
        ranking_id: int | None = None,
        ranked: int | None = None,
        suggestion: dict | None = None,
        source: str = "app",
    ) -> dict:
        """Apply one ranking (best to worst indices into ``traces``; with ``ranked``
        the positions after the first ``ranked`` are tied below the line).

        With a store the ranking is committed first (by ``annotator``, default
        "unknown"; or pass the ``ranking_id`` of one already recorded), then the
        update runs and is recorded with ``extra_metrics`` (e.g. the sampler's
        acceptance rate, so the charts have it). The returned metrics then carry
        ``ranking_id`` and ``update_id``.
        """
        with self.lock:
            if self.store is None:
                metrics = self.trainer.update(traces, ranking, config, on_step=on_step, ranked=ranked)
                metrics["ranked"] = ranked
                metrics.update(self._probe_metrics(traces, case))
                for key, value in (extra_metrics or {}).items():
                    metrics.setdefault(key, value)
                self._pristine = self._pristine and metrics["skipped"]
                return metrics
            if ranking_id is None:
                self._fill_features(traces)
                ranking_id = self.store.record_ranking(
                    self.workspace, traces, ranking, annotator or "unknown", comments=comments, note=note,
                    case=case, policy_version=self.version, update_config=_config_dict(config), ranked=ranked,
                    suggestion=suggestion, source=source,
                )
            else:
                found = self.store.ranking(ranking_id)
                if found is None or found["workspace"] != self.workspace:
                    raise ValueError(f"ranking {ranking_id} is not in workspace {self.workspace!r}")
                ranked = found["ranked"]
            return self._apply(ranking_id, traces, ranking, config, on_step, extra_metrics or {}, ranked=ranked,
                               case=case, live=True)

    def _fill_features(self, traces: list[Trace]) -> None:
        """Give ranked traces that lack them their reward-model features (one reference pass per
        prompt): sampling skips the pass while the policy is the reference and no reward model
        needs them yet, so what a clinician ranks is still learnable later."""
        missing: dict[tuple, list[Trace]] = {}
        for t in traces:
            if not t.features and t.completion_ids and t.prompt_ids:
                missing.setdefault(tuple(t.prompt_ids), []).append(t)
        for prompt, group in missing.items():
            _, features = reference_pass(self.lm, list(prompt), [t.completion_ids for t in group], features=True,
                                         reference_is_policy=self._pristine)
            for t, f in zip(group, features):
                t.features = f

    def _probe_metrics(self, traces: list[Trace], case: Case | None) -> dict:
        """The probe set scored now (and the ranked case taught to it); {} without one."""
        if self.probe is None:
            return {}
        if case is not None:
            self.probe.teach(case, traces)
        return self.probe.score(self.lm)

    def _apply(
        self, ranking_id, traces, ranking, config, on_step, extra: dict, supersedes: int | None = None,
        ranked: int | None = None, case: Case | None = None, live: bool = False,
    ) -> dict:
        store = self.store
        try:
            metrics = self.trainer.update(traces, ranking, config, on_step=on_step, ranked=ranked)
            metrics["ranked"] = ranked
            if live:  # a replay keeps the probe figures recorded when the update first ran
                metrics.update(self._probe_metrics(traces, case))
        except Exception as err:
            store.set_ranking_status(ranking_id, "failed", f"{type(err).__name__}: {err}")
            raise
        for key, value in extra.items():  # the trainer's own numbers win (a replay passes the old ones)
            metrics.setdefault(key, value)
        metrics["ranking_id"] = ranking_id
        checkpoint = None
        if not metrics["skipped"]:
            self._pristine = False
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                path = self._save_dir(extra={"ranking_id": ranking_id})
                checkpoint = (self.version, path, read_manifest(path)["uid"])
                self._since_checkpoint = 0
        self._claim_workspace()
        metrics["update_id"] = store.record_update(
            self.workspace, ranking_id, config.algorithm, _config_dict(config), metrics, self.version,
            checkpoint=checkpoint, supersedes=supersedes,
        )
        if checkpoint is not None:
            self._prune()
        return metrics

    # -- checkpoints ----------------------------------------------------------

    def save(self, directory, extra: dict | None = None):
        """Save the policy to ``directory``; with a store it becomes the workspace's latest
        checkpoint. A folder another workspace's record names is never overwritten."""
        with self.lock:
            if self.store is not None:
                others = sorted(self.store.checkpoint_owners(directory) - {self.workspace})
                if others:
                    raise ValueError(f"the checkpoint {Path(directory).name!r} holds workspace "
                                     f"{', '.join(others)}'s policy; save under another name")
            path = save_checkpoint(self.trainer, directory, extra)
            if self.store is not None:
                self._claim_workspace()
                self.store.record_checkpoint(self.workspace, self.version, path, kind="manual",
                                             extra={"checkpoint_uid": read_manifest(path)["uid"]})
                self._since_checkpoint = 0
            return path

    def load(self, directory) -> dict:
        """Load a checkpoint into the policy; with a store a copy is kept as the
        workspace's latest checkpoint, so a restart comes back to it."""
        with self.lock:
            manifest = load_into(self.trainer, directory)
            self._pristine = False
            if self.store is not None:
                self._checkpoint_now("loaded", {"loaded_from": str(Path(directory).resolve())})
            return manifest

    def reset(self) -> None:
        """Make the policy equal to the reference again; the version returns to 0."""
        with self.lock:
            self._reset_weights()
            if self.store is not None:
                self.store.record_checkpoint(self.workspace, 0, None, kind="reset")
                self._since_checkpoint = 0

    def _reset_weights(self) -> None:
        if not self._pristine:
            self.lm.reset_to_reference()
        self.trainer.reset()
        self._pristine = True

    def _save_dir(self, extra: dict | None = None) -> Path:
        """Save the policy to the workspace's next checkpoint folder (not recorded)."""
        target = self.store.checkpoint_dir(self.workspace, self.version)
        n = 1
        while target.exists() and self.store.path_in_use(target):
            target = target.with_name(f"v{self.version}.{n}")
            n += 1
        return save_checkpoint(self.trainer, target, {"workspace": self.workspace, **(extra or {})})

    def _checkpoint_now(self, kind: str, extra: dict | None = None) -> Path:
        path = self._save_dir(extra)
        self._claim_workspace()
        self.store.record_checkpoint(self.workspace, self.version, path, kind=kind,
                                     extra={**(extra or {}), "checkpoint_uid": read_manifest(path)["uid"]})
        self._since_checkpoint = 0
        return path

    def _prune(self) -> None:
        """Delete all but the newest ``keep_checkpoints`` automatic checkpoints of the workspace."""
        if self.keep_checkpoints is None:
            return
        auto = [c for c in self.store.checkpoints(self.workspace) if c["kind"] == "auto"]
        for ck in auto[: -self.keep_checkpoints]:
            if ck["path"]:
                shutil.rmtree(ck["path"], ignore_errors=True)
            self.store.mark_checkpoint_deleted(ck["id"])

    @property
    def unsaved_updates(self) -> int:
        """Weight-changing updates since the last checkpoint (with a store, a restart
        replays them; without one they are lost unless saved)."""
        return self._since_checkpoint

    def save_pending(self) -> Path | None:
        """With a store: checkpoint the policy if it has updates no checkpoint holds yet
        (on a clean shutdown, or before another engine opens the workspace), as an
        automatic checkpoint (pruned like the others). Returns its path, or None."""
        if self.store is None:
            return None
        with self.lock:
            if not self._since_checkpoint:
                return None
            path = self._checkpoint_now("auto", {"reason": "pending updates saved"})
            self._prune()
            return path

    def checkpoint(self) -> Path:
        """The folder holding the current policy (saved first if it is not
        checkpointed yet), e.g. for a download."""
        store = self._require_store()
        with self.lock:
            latest = store.latest_checkpoint(self.workspace)
            fresh = (
                latest is not None
                and latest["path"] is not None
                and self._since_checkpoint == 0
                and latest["version"] == self.version
            )
            if fresh:
                return Path(latest["path"])
            return self._checkpoint_now("manual")

    def checkpoint_archive(self, out=None) -> Path:
        """A .zip of the current policy's checkpoint (for a download button)."""
        from .export import checkpoint_archive

        return checkpoint_archive(self.checkpoint(), out)

    def export_file(self, fmt: str, exclude_rationalised: bool = False, all_workspaces: bool = False, directory=None) -> Path:
        """Write an export (``trl`` | ``trl-text`` | ``rankings`` | ``agreement``) of the
        active workspace (or of all) to a new file and return its path (for a download button)."""
        from .export import export_file

        workspace = None if all_workspaces else self.workspace
        return export_file(self._require_store(), fmt, directory, workspace, exclude_rationalised)

    def import_file(self, path, annotator: str | None = None) -> dict:
        """Import a ``rankings`` export or a TRL pair file into the active workspace
        (see ``export.import_file``); the policy is not updated. Returns counts."""
        from .importer import import_file

        return import_file(self._require_store(), path, self.workspace, annotator)

    # -- workspaces -----------------------------------------------------------

    def _require_store(self):
        if self.store is None:
            raise ValueError("no database attached: create the Engine with store=PATH to use workspaces and history")
        return self.store

    def _claim_workspace(self) -> None:
        ws = self.store.workspace(self.workspace)
        if ws is not None and (ws["model"] != self.lm.name or ws["mode"] != self.mode):
            self.store.set_workspace_model(self.workspace, self.lm.name, self.mode)

    def _check_compatible(self, name: str) -> None:
        ws = self.store.workspace(name)
        if ws is None:
            raise ValueError(f"no workspace named {name!r}")
        used = self.store.latest_checkpoint(name) is not None or self.store.updates(name)
        if used and ws["model"] is not None and (ws["model"] != self.lm.name or ws["mode"] != self.mode):
            raise ValueError(
                f"workspace {name!r} holds a {ws['model']} policy trained with "
                f"{'LoRA' if ws['mode'] == 'lora' else 'full fine-tuning'}; the loaded model is {self.lm.name} "
                f"({'LoRA' if self.mode == 'lora' else 'full fine-tuning'}). Load that model, or use another workspace."
            )

    def _open_workspace(self, name: str, replay: bool = True) -> dict:
        """Load the workspace's latest checkpoint (or the reference) and replay what it lacks."""
        store = self.store
        self._check_compatible(name)
        latest = None
        problems = []
        for ck in reversed(store.checkpoints(name)):  # newest first; a damaged one falls back to an older one
            if ck["path"] is None:
                self._reset_weights()
                latest = ck
                break
            if not Path(ck["path"]).is_dir():
                continue
            try:
                verify_recorded(ck["path"], ck["version"], ck["extra"].get("checkpoint_uid"))
                load_into(self.trainer, ck["path"])
            except Exception as err:  # noqa: BLE001 - e.g. files cut short by a power loss, or overwritten
                log.warning("workspace %s: cannot load %s (%s); trying an older checkpoint", name, ck["path"], err)
                problems.append(str(err))
                self._pristine = False
                continue
            self._pristine = False
            latest = ck
            log.info("workspace %s: loaded %s (version %s)", name, ck["path"], self.version)
            break
        if latest is None:
            self._reset_weights()
        self._since_checkpoint = 0
        self._replay_after = latest["after_update_id"] if latest else None
        self._replay_owed = not replay
        replayed = self._replay(name, self._replay_after) if replay else 0
        return {
            "workspace": name,
            "version": self.version,
            "checkpoint": latest["path"] if latest else None,
            "replayed": replayed,
            "skipped_checkpoints": problems,
            "updates": len(store.updates(name)),
            "rankings": store.count("rankings", name),
        }

    def replay_pending(self, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Run the replay ``attach_store(resume=False)`` left owed (the app serves its
        page meanwhile; model work waits for ``lock``). ``on_progress(done, total)``."""
        with self.lock:
            if not getattr(self, "_replay_owed", False):
                return 0
            self._replay_owed = False
            done = self._replay(self.workspace, self._replay_after, on_progress)
            self.resume_info = {**self.resume_info, "version": self.version, "replayed": done}
            return done

    def _replay(self, name: str, after_update_id: int | None,
                on_progress: Callable[[int, int], None] | None = None) -> int:
        """Re-run, in order, the updates made after the checkpoint and the rankings
        left pending, from their stored traces and hyper-parameters."""
        store = self.store
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
            traces, ranking = store.ranking_traces(ranking_id)
            ranked = store.ranking(ranking_id)["ranked"]
            if any(not t.prompt_ids or not t.completion_ids for t in traces):
                store.set_ranking_status(ranking_id, "failed", "its traces have no token data to train on")
                continue
            if old is not None:
                cfg = dict(old["config"])
                extra = {**old["metrics"], "replayed": True}
            else:
                cfg = dict(store.ranking(ranking_id)["update_config"])
                extra = {"replayed": True}
            algorithm = cfg.pop("algorithm")
            try:
                config = make_config(algorithm, **cfg)
            except (TypeError, ValueError) as err:  # e.g. a value outside today's bounds
                store.set_ranking_status(ranking_id, "failed", f"cannot replay its settings: {err}")
                log.warning("could not replay ranking %s: %s", ranking_id, err)
                continue
            try:
                self._apply(ranking_id, traces, ranking, config, None, extra, supersedes=old["id"] if old else None, ranked=ranked)
            except (ValueError, RuntimeError) as err:
                log.warning("could not replay ranking %s: %s", ranking_id, err)
                continue
            done += 1
        if on_progress is not None:
            on_progress(len(todo), len(todo))
        if done:
            log.info("workspace %s: replayed %d ranking(s); now at version %d", name, done, self.version)
        return done

    def workspaces(self) -> list[dict]:
        """Every workspace (name, created, model, mode, rankings, traces, updates,
        checkpoint_version, active); the active one also has its live ``version``."""
        store = self._require_store()
        rows = store.workspaces()
        for row in rows:
            row["active"] = row["name"] == self.workspace
            if row["active"]:
                row["version"] = self.version
        return rows

    def create_workspace(self, name: str, description: str = "", switch: bool = True) -> dict:
        """A new workspace whose policy starts from the reference; others are untouched."""
        store = self._require_store()
        with self.lock:
            store.create_workspace(name, model=self.lm.name, mode=self.mode, description=description)
            if switch:
                return self.switch_workspace(name)
            return {"workspace": name, "version": 0, "checkpoint": None, "replayed": 0, "updates": 0, "rankings": 0}

    def switch_workspace(self, name: str) -> dict:
        """Make ``name`` the active workspace: the current one is checkpointed if it
        has un-saved updates, then ``name``'s latest checkpoint is loaded."""
        self._require_store()
        with self.lock:
            if name == self.workspace:
                return {**self.resume_info, "workspace": name, "version": self.version}
            self._check_compatible(name)
            if self._since_checkpoint:
                self._checkpoint_now("switch")
            previous = self.workspace
            self.workspace = name
            try:
                self.resume_info = self._open_workspace(name)
            except (CheckpointError, OSError) as err:
                self.workspace = previous
                self._open_workspace(previous)
                raise ValueError(f"could not open workspace {name!r}: {err}") from err
            return self.resume_info

    def history(self, workspace: str | None = None) -> list[dict]:
        """Chart data: one metrics dict per update of the workspace, in order."""
        return self._require_store().history(workspace or self.workspace)

    def agreement(self, workspace: str | None = None) -> list[dict]:
        """Inter-annotator agreement rows (see ``export.agreement``)."""
        from .export import agreement

        return agreement(self._require_store(), workspace or self.workspace)


def _config_dict(config: DPOConfig | GRPOConfig) -> dict:
    return {"algorithm": config.algorithm, **asdict(config)}


def lora_from_checkpoint(directory: str | os.PathLike) -> LoraSettings | None:
    """The LoRA settings a checkpoint was trained with (None: full fine-tuning)."""
    manifest = read_manifest(directory)
    return LoraSettings(**manifest["lora"]) if manifest["lora"] is not None else None
