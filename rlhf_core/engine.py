"""One object per running app: the loaded policy, its trainer, and the calls the
UI and the headless loop make (sample verified traces, update, save, load, reset).

Generation and updates share ``lock`` so two callers never interleave a
sampling run with an update of the weights it is reading.

Everything is recorded in a ``Store`` (``store=``; without one, a temporary
database deleted at exit): ``sample`` stores every trace it draws (accepted,
rejected, rationalised) with its case; ``update`` first commits the ranking
(with the update it asks for, status "pending"), then trains, then records the
update. The engine works inside one *workspace* (``workspace``); opening,
switching and replaying workspaces, and their checkpoints, are in
``workspaces`` (``engine.workspaces``, ``engine.checkpoints``).
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from .clinical.cases import Case
from .belief import ProbeSet
from .training.checkpoint import load_into, read_manifest, save_checkpoint
from .rollout.generation import SamplingConfig, sample_stream
from .rollout.teacher import fill_reference, lacks_reference
from .rollout.records import Trace
from .model.frozen_prefix import frozen_prefix
from .model.models import DEFAULT_MODEL, LoadedModel, LoraSettings, load_model, lora_from_dict
from .rollout.sampler import RejectionConfig, SamplerEvent, SamplerResult, sample_verified_stream
from .storage.store import DEFAULT_WORKSPACE, Store, check_workspace_name
from .training.update import DPOConfig, GRPOConfig, PolicyTrainer
from .workspaces import Checkpoints, Workspaces


class Engine:
    """The policy being taught, and everything that reads or changes it."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        lora: LoraSettings | bool | str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        *,
        store: Store | str | os.PathLike | None = None,
        workspace: str | None = None,
        checkpoint_every: int = 1,
        keep_checkpoints: int | None = 3,
        resume: bool = True,
        lock: threading.RLock | None = None,
    ):
        """``lora``: as ``load_model`` (``"auto"``: an adapter for large models on CPU).
        ``store``: a ``Store`` or a database path (None: ``Store.temporary()``).
        ``workspace``: the one to open (created if missing; default "default").
        ``checkpoint_every``: save the policy every N updates (replay covers the rest).
        ``keep_checkpoints``: automatic checkpoints kept per workspace (None: all).
        ``resume``: replay rankings the latest checkpoint does not contain.
        ``lock``: the lock held for every use of the weights (default: a new one; an app
        hands its one lock to every engine it creates)."""
        self.lock = lock or threading.RLock()
        self.checkpoints = Checkpoints(self, checkpoint_every, keep_checkpoints)
        self.workspaces = Workspaces(self)
        self.trainer = PolicyTrainer(load_model(model, device=device, dtype=dtype, lora=lora))
        self._pristine = True  # the weights are the freshly loaded reference
        self.probe: ProbeSet | None = None  # scored after every live update (belief.py)
        self.store = _as_store(store)
        self.workspace = check_workspace_name(workspace or DEFAULT_WORKSPACE)
        self.store.ensure_workspace(self.workspace)
        self.resume_info: dict = self.workspaces.open(self.workspace, replay=resume)

    def attach_store(self, store: Store | str | os.PathLike, workspace: str | None = None, *,
                     preferred: str | None = None, resume: bool = True) -> dict:
        """Replace the temporary database of an engine built without one (e.g. once the
        model has loaded, so its workspace can depend on it) and open a workspace:
        ``workspace`` (created if missing), or when None the one ``Store.workspace_for_model``
        picks for the loaded model, starting from ``preferred``. Returns ``resume_info``."""
        if not self.store.is_temporary:
            raise ValueError("this engine already has a database attached")
        store = _as_store(store)
        with self.lock:
            if workspace is None:
                workspace = store.workspace_for_model(self.lm.name, self.mode, preferred or DEFAULT_WORKSPACE)
            check_workspace_name(workspace)
            store.ensure_workspace(workspace)
            previous = self.workspace, self.store
            self.workspace, self.store = workspace, store
            try:
                self.resume_info = self.workspaces.open(workspace, replay=resume)
            except BaseException:
                self.workspace, self.store = previous
                raise
            previous[1].close()
            return self.resume_info

    @property
    def lm(self) -> LoadedModel:
        """The loaded policy, its tokenizer and its reference (``trainer.lm``)."""
        return self.trainer.lm

    @property
    def version(self) -> int:
        """The policy's version (``trainer.version``): bumped once per update that changed its weights."""
        return self.trainer.version

    @property
    def is_reference(self) -> bool:
        """The weights are still exactly the reference's (nothing applied since load or reset)."""
        return self._pristine

    @property
    def mode(self) -> str:
        """``"lora"`` when the policy is a LoRA adapter, else ``"full"``."""
        return "lora" if self.lm.lora is not None else "full"

    def describe(self) -> dict:
        """The model, its mode, device, dtype, version and size; the workspace and database."""
        lm = self.lm
        layers = lm.model.config.num_hidden_layers
        return {
            "model": lm.name,
            "mode": self.mode,
            "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "version": self.version,
            "trainable_parameters": sum(p.numel() for p in lm.trainable_parameters),
            # decoder layers the update trains, of all of them (fewer with an adapter on the top layers only)
            "trained_layers": [layers - len(frozen_prefix(lm.model)), layers],
            "workspace": self.workspace,
            "db": str(self.store.path),
            "temporary_db": self.store.is_temporary,
        }

    # -- sampling -------------------------------------------------------------

    def generate_batch(self, case: Case, config: SamplingConfig, hint: str | None = None):
        """One batch of raw traces (the ``generate`` callable the sampler expects).
        While the weights are still the reference's, no reference pass is needed."""
        return sample_stream(self.lm, case, config, self.version, hint=hint, reference_is_policy=self._pristine)

    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces for a case, streaming progress; every trace
        drawn is recorded before the final event is yielded."""
        with self.lock:
            for event in sample_verified_stream(self.generate_batch, case, sampling, rejection):
                if event.phase == "done":
                    self.store.record_traces(self.workspace, event.traces, case)
                yield event

    def sample_verified(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> SamplerResult:
        """Non-streaming ``sample`` (records traces like it)."""
        last = None
        for last in self.sample(case, sampling, rejection):
            pass
        return SamplerResult(last.accepted, last.traces, last.report, last.negatives)

    # -- rankings and updates -------------------------------------------------

    def prepare_reference(self, traces: list[Trace]) -> int:
        """Run the reference pass an update of ``traces`` would need (their reference
        log-probs and reward features) now and store it, so a ranking submitted later
        starts training at once: meant for while the clinician reads. Returns how many
        traces it gave something to (0 for traces whose pass is stored already)."""
        with self.lock:
            filled = self._reference_pass(traces)
            if filled:
                self.store.record_traces(self.workspace, filled)
            return len(filled)

    def _reference_pass(self, traces: list[Trace], logps: bool = True) -> list[Trace]:
        """``fill_reference`` for what the database does not hold already (``prepare_reference``
        stored it): the traces lacking it first take the stored pass. Returns the traces filled now."""
        lacking = [t for t in traces if t.trace_id and (not t.features or lacks_reference(t))]
        stored = self.store.trace_references(self.workspace, [t.trace_id for t in lacking]) if lacking else {}
        for t in lacking:
            if t.trace_id in stored and len(stored[t.trace_id][0]) == len(t.completion_ids):
                t.ref_logps, t.features = stored[t.trace_id]
        return fill_reference(self.lm, traces, reference_is_policy=self._pristine, logps=logps)

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
        with self.lock:
            # features only: a ranking recorded without an update is not trained on
            self._reference_pass(traces, logps=False)
            return self.store.record_ranking(
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

        The ranking is committed first (by ``annotator``, default "unknown"; or pass
        the ``ranking_id`` of one already recorded), then the update runs and is
        recorded with ``extra_metrics`` (e.g. the sampler's acceptance rate, so the
        charts have it). The returned metrics carry ``ranking_id`` and ``update_id``.
        """
        with self.lock:
            # sampled without a reference pass (no reward model wanted features then): the
            # ranked traces get their reference log-probs now, stored with the ranking,
            # unless it ran while the clinician read them (prepare_reference)
            filled = self._reference_pass(traces)
            if ranking_id is None:
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
                if filled:  # the ranking's traces are stored already: add what the reference pass gave them
                    self.store.record_traces(self.workspace, filled)
            return self.apply_ranking(ranking_id, traces, ranking, config, on_step, extra_metrics or {},
                                      ranked=ranked, case=case, live=True)

    def _probe_metrics(self, traces: list[Trace], case: Case | None) -> dict:
        """The probe set scored now (and the ranked case taught to it); {} without one."""
        if self.probe is None:
            return {}
        if case is not None:
            self.probe.teach(case, traces)
        return self.probe.score(self.lm)

    def apply_ranking(
        self, ranking_id, traces, ranking, config, on_step, extra: dict, supersedes: int | None = None,
        ranked: int | None = None, case: Case | None = None, live: bool = False,
    ) -> dict:
        """Train on a stored ranking and record the update (``supersedes``: the update a
        replay redoes; ``live``: a new update, so the probe set is scored)."""
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
            checkpoint = self.checkpoints.after_update(ranking_id)
        self.workspaces.claim()
        metrics["update_id"] = store.record_update(
            self.workspace, ranking_id, config.algorithm, _config_dict(config), metrics, self.version,
            checkpoint=checkpoint, supersedes=supersedes,
        )
        if checkpoint is not None:
            self.checkpoints.prune()
        return metrics

    # -- weights --------------------------------------------------------------

    def save(self, directory, extra: dict | None = None):
        """Save the policy to ``directory``; it becomes the workspace's latest checkpoint.
        A folder another workspace's record names is never overwritten."""
        with self.lock:
            others = sorted(self.store.checkpoint_owners(directory) - {self.workspace})
            if others:
                raise ValueError(f"the checkpoint {Path(directory).name!r} holds workspace "
                                 f"{', '.join(others)}'s policy; save under another name")
            path = save_checkpoint(self.trainer, directory, extra)
            self.checkpoints.record(path, "manual")
            return path

    def load(self, directory) -> dict:
        """Load a checkpoint into the policy; a copy is kept as the workspace's latest
        checkpoint, so a restart comes back to it."""
        with self.lock:
            manifest = self.load_weights(directory)
            self.checkpoints.save_now("loaded", {"loaded_from": str(Path(directory).resolve())})
            return manifest

    def reset(self) -> None:
        """Make the policy equal to the reference again; the version returns to 0."""
        with self.lock:
            self.reset_weights()
            self.checkpoints.record(None, "reset")

    def load_weights(self, directory) -> dict:
        """Load a checkpoint's weights, optimiser state and version; nothing is recorded."""
        self._pristine = False  # first: a load that fails halfway leaves the weights changed
        return load_into(self.trainer, directory)

    def reset_weights(self) -> None:
        """The reference's weights and a fresh optimiser; nothing is recorded."""
        if not self._pristine:
            self.lm.reset_to_reference()
        self.trainer.reset()
        self._pristine = True


def _as_store(store: Store | str | os.PathLike | None) -> Store:
    """The ``Store`` an engine records in: the one given, one opened on a path, else a temporary one."""
    if isinstance(store, Store):
        return store
    return Store(store) if store else Store.temporary()


def _config_dict(config: DPOConfig | GRPOConfig) -> dict:
    return {"algorithm": config.algorithm, **asdict(config)}


def lora_from_checkpoint(directory: str | os.PathLike) -> LoraSettings | None:
    """The LoRA settings a checkpoint was trained with (None: full fine-tuning)."""
    manifest = read_manifest(directory)
    return lora_from_dict(manifest["lora"])
