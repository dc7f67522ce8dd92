"""The app-level control room: the one policy shared by every browser session.

``ControlRoom`` coordinates; the work is done by its parts: the ``Engine``
(model, reference, optimiser, the database's workspaces), the ``CaseLibrary``,
the ``ChartHistory`` the charts draw from, the ``BatchCache`` of API batches,
and ``jobs.stream_from_thread``, which runs model work in a worker thread
under ``lock`` (the one lock for the weights, shared with every engine a
model switch creates) while the handler streams its events.

There is one persistence path: every trace, ranking, update and checkpoint
goes to a ``Store``. Without a database path (tests, throw-away demos) the
store is a temporary file, deleted on ``close``, and ``describe()`` says the
session is not persistent.

Browser sessions hold only small, copyable state (trace dicts, case id,
annotator); see ``new_session``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from rlhf_core.belief import ProbeSet, belief
from rlhf_core.cases import Case
from rlhf_core.engine import Engine
from rlhf_core.export import agreement, checkpoint_archive, export_file
from rlhf_core.evaluate import split_cases
from rlhf_core.generation import SamplingConfig
from rlhf_core.importer import import_file
from rlhf_core.library import CaseLibrary
from rlhf_core.models import DEFAULT_MODEL, REGISTRY, availability
from rlhf_core.sampler import RejectionConfig, SamplerEvent, sample_verified_stream
from rlhf_core.simulate import SimulationSettings, clinicians_reward_model, play_round
from rlhf_core.reward_data import MODEL_RANKED
from rlhf_core.store import DEFAULT_WORKSPACE, Store
from rlhf_core.suggest import RankingAdvisor
from rlhf_core.update import DPOConfig, GRPOConfig, default_lr

from .backends import GenerateFn, engine_backend
from .batches import BatchCache
from .files import named_checkpoint, named_checkpoints, prune_archives, remember_workspace, remembered_workspace
from .history import ChartHistory
from .jobs import Cancelled, Event, FinalEvent, stream_from_thread
from .ranking import RankingError
from .updates import likelihood_ratios, ranked_group, ranking_record, suggestion_record, update_extra
from .settings import checkpoint_every_from_env, default_export_dir, probe_size_from_env

log = logging.getLogger(__name__)


def new_session() -> dict:
    """Per-browser state: the picked case, the traces being ranked, the annotator."""
    return {"case_id": None, "batch": None, "annotator": "", "pending": None, "pending_workspace": None}


class ControlRoom:
    """One policy per running app, and everything the UI and the API do with it."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        lora: bool = False,
        cases_dir: str | Path | None = None,
        generate_fn: GenerateFn | None = None,
        checkpoint_dir: str | Path = "checkpoints",
        device: str | None = None,
        *,
        db_path: str | Path | None = None,
        workspace: str | None = None,
        checkpoint_every: int | None = None,
        export_dir: str | Path | None = None,
        background_replay: bool = False,
        probe_size: tuple[int, int] | None = None,
    ):
        """``db_path``: the database (None: a temporary one, deleted on ``close``).
        ``workspace``: the one to open first (default: the one used last, else "default";
        a workspace of another model is never opened: ``Store.workspace_for_model``).
        ``checkpoint_every``: save the policy every N updates (default ``$RLHF_CHECKPOINT_EVERY`` or 10).
        ``export_dir``: where downloads are written (default: inside Gradio's file cache).
        ``background_replay``: replay the rankings a restart owes the policy in a thread
        (holding ``lock``, so model work queues behind it) while the page is served;
        ``restoring`` reports its progress.
        ``probe_size``: (taught, held-out) cases scored after every update (default
        ``$RLHF_PROBE`` as "taught,heldout", else 3,3; "0,0" turns the probe off)."""
        self.lock = threading.RLock()  # the one lock for every use of the weights
        self._meta = threading.Lock()  # counters; never held during compute
        self.generate_fn = generate_fn or engine_backend
        self.device = device
        self.checkpoint_every = checkpoint_every or checkpoint_every_from_env()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.export_dir = Path(export_dir) if export_dir is not None else default_export_dir()
        self.persistent = db_path is not None
        self.store = Store(db_path) if self.persistent else Store.temporary()
        self.model_epoch = 1  # bumped when the model (tokenizer) changes
        self.revision = 0  # bumped on every change a browser should re-render
        self.history = ChartHistory(self.store)
        self.batches = BatchCache()
        self.advisor = RankingAdvisor(self.store)  # the workspace's reward model, for suggested orders
        self.last_eval: dict | None = None
        self.restoring: dict | None = None  # {"done", "total"} while a background replay runs
        self._reference_beliefs: dict[tuple, dict] = {}  # (model epoch, case id) -> the reference's belief
        self._background_replay = background_replay and self.persistent
        preferred = workspace or os.environ.get("RLHF_WORKSPACE") or remembered_workspace(self.store.path)
        self.engine = self._new_engine(model, lora, preferred, resume=not self._background_replay)
        remember_workspace(self.store.path, self.engine.workspace)
        self.cases = CaseLibrary.load(cases_dir)
        self.case_problem = self.cases.problem
        self.probe_size = probe_size if probe_size is not None else probe_size_from_env()
        self._build_probe()
        self._restorer: threading.Thread | None = None
        if self._background_replay:
            self.restoring = {"done": 0, "total": None}
            self._restorer = threading.Thread(target=self._restore, name="replay", daemon=True)
            self._restorer.start()

    def _build_probe(self) -> None:
        """The engine's probe set: the first cases ranked in this workspace (from the
        database, so a restart keeps them) and the first held-out cases of the split."""
        taught_n, heldout_n = self.probe_size
        if taught_n + heldout_n == 0:
            self.engine.probe = None
            return
        heldout = split_cases(list(self.cases.values()))[1][:heldout_n] if heldout_n else []
        probe = ProbeSet(heldout=heldout, max_taught=taught_n)
        for r in self.store.rankings(self.workspace) if taught_n else ():
            case = self.cases.get(r["case_id"])
            if case is not None and case.id not in {c.id for c in probe.taught}:
                probe.teach(case, self.store.ranking_traces(r["id"])[0])
            if len(probe.taught) >= taught_n:
                break
        self.engine.probe = probe

    def _restore(self) -> None:
        def progress(done: int, total: int) -> None:
            with self._meta:
                self.restoring = {"done": done, "total": total}
                self.revision += 1

        try:
            with self.lock:
                self.engine.workspaces.replay_pending(progress)
        except Exception:  # noqa: BLE001 - the policy stays at its checkpoint; the log says why
            log.exception("replaying the workspace's pending rankings failed")
        finally:
            with self._meta:
                self.restoring = None
            self._changed(persisted=True)

    def wait_restored(self, timeout: float | None = None) -> bool:
        """Block until a background replay has finished (True), or ``timeout`` passed."""
        if self._restorer is not None:
            self._restorer.join(timeout)
            return not self._restorer.is_alive()
        return True

    def _new_engine(self, model: str, lora: bool, preferred: str | None, resume: bool = True) -> Engine:
        """Load ``model`` and open the workspace ``preferred`` when it can use it; when it is
        another model's, the first workspace of this model and mode, else a new one."""
        engine = Engine(model, lora=lora, device=self.device, checkpoint_every=self.checkpoint_every, lock=self.lock)
        store, preferred = self.store, preferred or DEFAULT_WORKSPACE
        ws = store.workspace(preferred)

        def fits(w: dict) -> bool:
            return (w["model"], w["mode"]) == (engine.lm.name, engine.mode)

        if ws is not None and ws["model"] is not None and not fits(ws):
            preferred = next((w["name"] for w in store.workspaces() if fits(w)), preferred)
        engine.attach_store(store, preferred=preferred, resume=resume)
        return engine

    # ----------------------------------------------------------------- state
    @property
    def workspace(self) -> str:
        return self.engine.workspace

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def run(self) -> int:
        """The current run: the charts draw it in colour, earlier ones in grey."""
        return self.history.run(self.workspace)

    def model_key(self) -> str:
        """Identifies the loaded model and workspace: traces sampled from another policy
        line cannot be trained on (or ranked into another workspace)."""
        return f"{self.engine.lm.name}|{self.engine.mode}|{self.model_epoch}|{self.workspace}"

    def describe(self) -> dict:
        info = self.engine.describe()
        info.update(run=self.run, unsaved_updates=self.unsaved_count(), rankings=self.ranking_count(),
                    persistent=self.persistent, restoring=self.restoring)
        return info

    def ranking_count(self) -> int:
        return self.store.count("rankings", self.workspace)

    def unsaved_count(self) -> int:
        """Updates whose weights no checkpoint holds (in a persistent store a restart replays them)."""
        return self.engine.checkpoints.unsaved

    def unsaved_annotators(self) -> list[str]:
        """Who made the updates that no checkpoint holds."""
        if not self.engine.checkpoints.unsaved:
            return []
        ws = self.workspace
        latest = self.store.latest_checkpoint(ws)
        updates = self.store.updates(ws, after_id=latest["after_update_id"] if latest else None)
        rows = {u["update_id"]: u for u in self.history.stored(ws)[0]}
        return sorted({rows[u["id"]].get("annotator") or "unknown" for u in updates if u["id"] in rows})

    def conclusion_mode(self, choice: str | None = None) -> str:
        """The workspace's conclusion mode; a ``choice`` is saved as its setting."""
        return self.engine.conclusion_mode(choice)

    def default_lr(self) -> float:
        return default_lr(self.engine.lm)

    def _changed(self, persisted: bool = False) -> None:
        if persisted:
            self.history.changed()
        with self._meta:
            self.revision += 1

    def _append(self, record: dict) -> None:
        record.setdefault("workspace", self.workspace)
        self.history.append(record)
        self._changed()

    def metrics(self, kind: str | None = None) -> list[dict]:
        """Chart records ("generation", "step", "update"; see ``ui.charts``) of the active
        workspace: its whole stored history plus this process's live records."""
        return self.history.records(self.workspace, kind)

    # ----------------------------------------------------------------- cases
    def case(self, case_id: str) -> Case:
        return self.cases.case(case_id)

    def beliefs(self, case_id: str) -> dict:
        """What the reference and the current policy believe about a case (``belief.belief``);
        holds the weights for the two scorings (~0.2 s each on SmolLM2, 2 cores)."""
        case = self.case(case_id)
        with self.lock:
            lm, version = self.engine.lm, self.version
            key = (self.model_epoch, case.id)
            reference = self._reference_beliefs.get(key)
            if reference is None:
                reference = self._reference_beliefs[key] = belief(lm, case, reference=True)
            policy = reference if self.engine.is_reference else belief(lm, case)
            return {"reference": reference, "policy": policy, "version": version}

    def suggest_order(self, traces: list[dict]) -> dict | None:
        """The reward model's suggested order of freshly sampled traces (``RankingAdvisor.suggest``),
        or None (too few rankings yet, traces without features, or the fit failed: logged)."""
        try:
            return self.advisor.suggest(self.workspace, traces)
        except Exception:  # noqa: BLE001 - a suggestion is optional; ranking goes on without it
            log.exception("the reward model could not suggest an order")
            return None

    def specialties(self) -> list[str]:
        return self.cases.specialties()

    def add_cases(self, cases: list[Case]) -> list[Case]:
        """Add uploaded cases (``CaseLibrary.add``: all or none)."""
        with self._meta:
            added = self.cases.add(cases)
            self.revision += 1
        return added

    # ------------------------------------------------------------ generation
    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces, streaming ``SamplerEvent``s (the last is "done"
        and carries a ``generation_id``). Every trace drawn is stored. While the policy is
        still the reference and no reward model can suggest an order yet, the traces are
        sampled without reward-model features (an extra pass, ~35% of a batch's time on
        SmolLM2); the ranked ones get theirs when the ranking is stored (``Engine``)."""
        if sampling.reward_features and self.engine.is_reference and self.advisor.model(self.workspace) is None:
            sampling = dataclasses.replace(sampling, reward_features=False)

        def work(emit, cancelled):
            with self.lock:
                engine = self.engine
                version, started = engine.version, time.perf_counter()

                def generate(c, s, h):
                    return self.generate_fn(engine, c, s, h)

                last = None
                for last in sample_verified_stream(generate, case, sampling, rejection):
                    if last.phase == "done":
                        break
                    emit(last)
                    if cancelled():
                        return
                engine.store.record_traces(engine.workspace, last.traces, case)
                last.generation_id = self.history.record_generation(engine.workspace, case.id, last, version,
                                                                    time.perf_counter() - started)
                self._changed()
                last.final = True
                emit(last)

        yield from stream_from_thread(work)

    def remember_batch(self, traces: list[dict], case_id: str, acceptance_rate: float | None,
                       generation_id: str | None = None, negatives: list[dict] | None = None,
                       suggestion: dict | None = None) -> str:
        """Keep an API batch so a later rank+update call can refer to it by id."""
        return self.batches.remember(traces=traces, negatives=list(negatives or []), case_id=case_id,
                                     model_key=self.model_key(), acceptance_rate=acceptance_rate,
                                     generation_id=generation_id, suggestion=suggestion)

    def batch(self, batch_id: str) -> dict:
        return self.batches.get(batch_id)

    # --------------------------------------------------------------- updates
    def update(
        self,
        traces: list[dict],
        order: list[str],
        config: DPOConfig | GRPOConfig,
        *,
        annotator: str,
        model_key: str,
        comments: dict[str, str] | None = None,
        acceptance_rate: float | None = None,
        generation_id: str | None = None,
        negatives: list[dict] | None = None,
        suggestion: dict | None = None,
    ) -> Iterator[Event]:
        """Apply one ranking (best-to-worst trace ids of the accepted ``traces``; the
        rejected ``negatives`` join the group below the line, tied under every ranked
        trace). The ranking is committed before the update starts
        (``Engine.update``), with the reward model's ``suggestion`` if one was shown
        (``suggestion_record``: how far the clinician moved away from it). Yields step events, then a final "done" event with the
        metrics and the ranking record. An invalid ranking raises RankingError on the
        first iteration, before anything runs."""
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before submitting a ranking (it is stored with every ranking).")
        objs, indices, ranked = ranked_group(order, traces, negatives)
        self._check_model(model_key)
        case = self.cases.get(objs[0].case_id)
        shown = suggestion_record(suggestion, order)
        comments = {k: v for k, v in (comments or {}).items() if v and str(v).strip()}

        def work(emit, cancelled):  # an update always runs to the end
            with self.lock:
                self._check_model(model_key)
                engine, run = self.engine, self.run
                before = engine.version
                extra = update_extra(objs, indices, before, annotator, acceptance_rate,
                                     self.history.generation(generation_id))

                def on_step(m):
                    rec = Event(kind="step", run=run, x=before + (m["step"] + 1) / config.steps,
                                version=before, algorithm=config.algorithm, **m)
                    self._append(dict(rec))
                    emit(rec)

                try:
                    result = engine.update(objs, indices, config, on_step=on_step, annotator=annotator,
                                           comments=comments, case=case, extra_metrics=extra, ranked=ranked,
                                           suggestion=shown)
                finally:
                    self._changed(persisted=True)  # the ranking is stored even when the update fails
                ratios = likelihood_ratios(result.get("trace_logratio") or [], indices)
                if ratios is not None:
                    result["ranked_likelihood_ratios"] = ratios
                record = ranking_record(objs, indices, config, before, annotator, comments, engine)
                record["ranked"] = ranked
                record.update(version_after=result["version"], metrics=dict(result))
                if "ranking_id" in result:
                    record["ranking_id"] = result["ranking_id"]
                self._changed(persisted=True)
                emit(FinalEvent(kind="done", result=result, ranking=record))

        yield from stream_from_thread(work)

    def record_ranking(self, traces: list[dict], order: list[str], *, annotator: str, model_key: str,
                       comments: dict[str, str] | None = None, negatives: list[dict] | None = None,
                       suggestion: dict | None = None) -> int:
        """Store a ranking without updating the policy (a second opinion, for the
        agreement view; the same ``negatives`` below the line as the update's, so
        both rank the same group). Returns its id."""
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before recording a ranking (it is stored with every ranking).")
        objs, indices, ranked = ranked_group(order, traces, negatives)
        engine = self.engine
        with self.lock:
            self._check_model(model_key)
            ranking_id = engine.record_ranking(objs, indices, annotator, comments=comments or {},
                                               case=self.cases.get(objs[0].case_id), ranked=ranked,
                                               suggestion=suggestion_record(suggestion, order))
        self._changed(persisted=True)
        return ranking_id

    def _check_model(self, model_key: str) -> None:
        if model_key != self.model_key():
            raise RankingError("The model or workspace was switched since these traces were generated; generate again.")

    # ---------------------------------------------------------------- models
    def models(self) -> list[dict]:
        """The registry with each model's state: loaded, available, downloadable or unavailable."""
        rows = []
        for name, spec in REGISTRY.items():
            state, why = availability(name)
            if name == self.engine.lm.name:
                state, why = "loaded", f"{self.engine.mode} on {self.engine.describe()['device']}"
            rows.append({"model": name, "state": state, "why": why, "description": spec.description})
        return rows

    def _policy_replaced(self, epoch: bool = False) -> None:
        with self._meta:
            self.model_epoch += int(epoch)
        self._changed(persisted=True)

    def switch_model(self, model: str, lora: bool) -> dict:
        """Load another model (the old one stays until the new one has loaded). The current
        policy is checkpointed first and the new model opens a workspace it can use: the
        current one when it fits, else its own (``Store.workspace_for_model``)."""
        with self.lock:
            old = self.engine
            old.checkpoints.save_pending()
            self.engine = self._new_engine(model, lora, old.workspace)
            remember_workspace(self.store.path, self.workspace)
            self._build_probe()
            self._policy_replaced(epoch=True)
            return self.describe()

    def reset(self) -> dict:
        with self.lock:
            self.engine.reset()
            self._policy_replaced()
            return self.describe()

    def checkpoint_path(self, name: str) -> Path:
        return named_checkpoint(self.checkpoint_dir, name)

    def save(self, name: str) -> Path:
        path = self.checkpoint_path(name)
        with self.lock:
            out = self.engine.save(path, extra={"rankings": self.ranking_count(), "run": self.run,
                                                "workspace": self.workspace})
            self._changed()
            return out

    def load(self, name: str) -> dict:
        path = self.checkpoint_path(name)
        with self.lock:
            manifest = self.engine.load(path)
            self._policy_replaced()
            return manifest

    def checkpoints(self) -> list[dict]:
        """Saved checkpoints under ``checkpoint_dir``, newest first."""
        return named_checkpoints(self.checkpoint_dir)

    def close(self) -> Path | None:
        """On a clean shutdown: checkpoint updates no checkpoint holds yet (so the next
        start loads them instead of replaying), then close the database (a temporary
        one is deleted)."""
        with self.lock:
            path = self.engine.checkpoints.save_pending() if self.persistent else None
            self.store.close()
            return path

    # ------------------------------------------------------------ workspaces
    def workspaces(self) -> list[dict]:
        return self.engine.workspaces.rows()

    def create_workspace(self, name: str) -> dict:
        """A new, empty workspace for the loaded model (not switched to)."""
        name = (name or "").strip()
        with self.lock:
            self.engine.workspaces.create(name, switch=False)
        self._changed()
        return self.store.workspace(name)

    def switch_workspace(self, name: str) -> dict:
        """Make ``name`` the active workspace (its latest checkpoint is loaded, what it
        lacks replayed); the current one is checkpointed first if it needs it."""
        with self.lock:
            info = self.engine.workspaces.switch(name)
            remember_workspace(self.store.path, self.workspace)
            self._build_probe()
            self._changed(persisted=True)
            return info

    def agreement(self) -> list[dict]:
        return agreement(self.store, self.workspace)

    # --------------------------------------------------------------- exports
    def export(self, fmt: str, exclude_rationalised: bool = False, all_workspaces: bool = False) -> Path:
        """Write an export (trl | trl-text | rankings | agreement) for a download."""
        return export_file(self.store, fmt, self.export_dir, None if all_workspaces else self.workspace,
                           exclude_rationalised)

    def checkpoint_archive(self) -> Path:
        """A .zip of the current policy's checkpoint, for a download (saved first if needed)."""
        with self.lock:
            engine = self.engine
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{self.workspace}-v{engine.version}-{stamp}-{uuid.uuid4().hex[:6]}"
            path = checkpoint_archive(engine.checkpoints.current(), self.export_dir / f"{name}.zip")
            self._changed()  # a save may have cleared the "not in a checkpoint" count
        prune_archives(self.export_dir, keep=path)
        return path

    def import_rankings(self, path: str | Path, annotator: str | None = None) -> dict:
        """Import a rankings export or a TRL pair file into the active workspace (the policy
        is not updated; the rankings count for exports and the agreement view)."""
        counts = import_file(self.store, path, self.workspace, annotator or None)
        self._changed(persisted=True)
        return counts

    # ------------------------------------------------------------- autopilot
    def autopilot(self, updates: int, algorithm: str = "grpo") -> Iterator[Event]:
        """Train on training-split cases no clinician ranked in this workspace, the reward model
        ranking (verified traces first; ``simulate.play_round``, labelled "autopilot"). Holds
        the lock one round at a time, so other sessions' work interleaves; stops after the
        current round when the iterator is closed (Stop, or the browser going). Yields an
        "update" event per round, then a final "done"."""
        updates = int(updates)
        if not 1 <= updates <= 200:
            raise ValueError("autopilot runs 1 to 200 updates")
        settings = SimulationSettings(algorithm=algorithm, updates=updates, conclusion=self.conclusion_mode())
        with self.lock:
            reward_model, key = clinicians_reward_model(self.engine, self.advisor), self.model_key()
        ranked = {r["case_id"] for r in self.store.rankings(self.workspace) if r["source"] != MODEL_RANKED}
        todo = [c for c in split_cases(list(self.cases.values()))[0] if c.id not in ranked]
        if not todo:
            raise ValueError("clinicians have ranked every training case in this workspace: nothing for the autopilot")

        def work(emit, cancelled):
            start = self.store.count("rankings", self.workspace)
            for i in range(updates):
                if cancelled():
                    return
                with self.lock:
                    if self.model_key() != key:
                        raise RankingError("the model or workspace was switched: the autopilot stopped")
                    metrics = play_round(self.engine, todo[i % len(todo)], settings, start + i, reward_model)
                self._changed(persisted=True)
                emit(Event(kind="update", done=i + 1, total=updates, metrics=metrics,
                           reward_model=reward_model.info["version"]))
            emit(FinalEvent(kind="done", done=updates, total=updates))

        yield from stream_from_thread(work)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, samples: int = 4, max_new_tokens: int = 128, heldout_fraction: float = 0.2,
                 temperature: float = 0.8) -> Iterator[Event]:
        """Held-out A/B of the reference vs the current policy on the case library's
        held-out split (``rlhf_core.evaluate.heldout_comparison``). Yields "progress"
        events, then a final "done" event with the result. Holds the weights throughout."""
        from rlhf_core.evaluate import heldout_comparison

        samples, max_new_tokens = int(samples), int(max_new_tokens)
        if samples < 1 or max_new_tokens < 1:
            raise ValueError("samples per case and max new tokens must be at least 1")
        cases = list(self.cases.values())

        def work(emit, cancelled):
            with self.lock:
                def progress(p):
                    if cancelled():
                        raise Cancelled()
                    emit(Event(kind="progress", **p))

                try:
                    result = heldout_comparison(self.engine, cases, samples=samples, heldout_fraction=heldout_fraction,
                                                max_new_tokens=max_new_tokens, temperature=temperature,
                                                on_progress=progress)
                except Cancelled:
                    return
                result["workspace"] = self.workspace
                self.last_eval = result
                emit(FinalEvent(kind="done", result=result))

        yield from stream_from_thread(work)
