"""The app-level control room: the one policy shared by every browser session.

``ControlRoom`` owns the ``Engine`` (model, reference, optimiser), the case
library and, through the engine, the database (``rlhf_core.store``): every
sampled trace, every ranking (committed before its update starts), every
update's metrics and the checkpoints live there, in the active *workspace*.
The charts are drawn from that stored history, so after a restart they show
everything; only the per-step points of updates and unranked generations of
this process are kept in memory. Without a database (``db_path=None``, for
tests and throw-away demos) the same history is kept in memory instead.

Everything that reads or changes the weights (sampling, updates, save, load,
reset, switching model or workspace, evaluation) runs under ``lock`` in a
worker thread; handlers consume its events from a queue, so a browser that
disconnects never leaves an update half applied, and the lock is always
released by the thread that took it.

Browser sessions hold only small, copyable state (trace dicts, case id,
annotator); see ``new_session``.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

from rlhf_core.cases import Case, CaseFormatError, default_cases_dir, load_library
from rlhf_core.belief import ProbeSet, belief
from rlhf_core.checkpoint import read_manifest
from rlhf_core.conclusion import candidates as conclusion_candidates
from rlhf_core.engine import Engine
from rlhf_core.evaluate import split_cases
from rlhf_core.generation import SamplingConfig, Trace
from rlhf_core.models import DEFAULT_MODEL, REGISTRY, availability
from rlhf_core.prompts import build_messages
from rlhf_core.sampler import RejectionConfig, SamplerEvent, sample_verified_stream
from rlhf_core.store import DEFAULT_WORKSPACE, Store
from rlhf_core.update import DPOConfig, GRPOConfig, default_lr

from .backends import GenerateFn, engine_backend

log = logging.getLogger(__name__)
from .ranking import RankingError, validate_negatives, validate_order

CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CACHED_BATCHES = 64  # API batches kept for rank+update calls
MAX_LIVE_RECORDS = 5000  # in-memory step / generation records kept for the charts
CHECKPOINT_EVERY = 10  # default: a checkpoint every N updates (replay covers the ones between)
RUN_BOUNDARIES = ("reset", "loaded", "train")  # checkpoint kinds that replace the policy
ARCHIVES_KEPT = 2  # checkpoint .zip downloads kept in the export folder


def checkpoint_every_from_env(default: int = CHECKPOINT_EVERY) -> int:
    """``$RLHF_CHECKPOINT_EVERY`` (a positive integer), else ``default``."""
    value = os.environ.get("RLHF_CHECKPOINT_EVERY", "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"RLHF_CHECKPOINT_EVERY must be a positive integer, got {value!r}")
    return n


def default_export_dir() -> Path:
    """Downloads are written inside Gradio's file cache, so they are served without a copy."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()) / "rlhf-exports"


def stored_history(store: Store, workspace: str) -> tuple[list[dict], int]:
    """(chart records of the workspace's stored updates, the current run number).

    A *run* ends wherever the policy was replaced (a reset, a loaded checkpoint,
    offline training): those checkpoints mark where, so the charts grey out the
    earlier runs exactly as they did live."""
    marks = sorted(c["after_update_id"] or 0 for c in store.checkpoints(workspace, include_deleted=True)
                   if c["kind"] in RUN_BOUNDARIES)
    history = store.history(workspace)
    rankings = None
    rows = []
    for h in history:
        row = {**h, "kind": "update", "run": 1 + bisect.bisect_left(marks, h["update_id"]), "x": h["version"]}
        if row.get("version_before") is None:
            row["version_before"] = h["version"] - (0 if h.get("skipped") else 1)
        if not row.get("annotator") or not row.get("case_id"):  # e.g. written by ``simulate``
            if rankings is None:
                rankings = {r["id"]: r for r in store.rankings(workspace)}
            found = rankings.get(h["ranking_id"])
            if found:
                row["annotator"] = row.get("annotator") or found["annotator"]
                row["case_id"] = row.get("case_id") or found["case_id"]
        rows.append(row)
    return rows, 1 + len(marks)


def generation_from_update(row: dict) -> dict | None:
    """The sampling numbers an update carries, as a chart record (for batches whose
    generation record is not in memory, e.g. after a restart)."""
    rate = row.get("acceptance_rate")
    if not isinstance(rate, (int, float)):
        return None
    version = row.get("sampled_version", row.get("version_before", row["version"]))
    return {"kind": "generation", "run": row["run"], "version": version, "x": version, "case_id": row.get("case_id"),
            "acceptance_rate": rate, "safety_accepted": row.get("safety_accepted"), "safety_all": row.get("safety_all"),
            "generation_id": row.get("generation_id"), "from_update": row.get("update_id")}


def new_session() -> dict:
    """Per-browser state: the picked case, the traces being ranked, the annotator."""
    return {"case_id": None, "batch": None, "annotator": "", "pending": None, "pending_workspace": None}


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def stream_from_thread(work: Callable[[Callable, Callable[[], bool]], None]) -> Iterator:
    """Run ``work(emit, cancelled)`` in a thread and yield what it emits.

    Snapshots are coalesced: a slow consumer sees the latest one, never a
    backlog. Closing the iterator asks the worker to stop at its next event.
    """
    items: queue.Queue = queue.Queue()
    cancel = threading.Event()
    done = object()

    def target():
        try:
            work(items.put, cancel.is_set)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            items.put(_Failure(err))
        finally:
            items.put(done)

    threading.Thread(target=target, daemon=True, name="control-room-engine").start()
    try:
        while True:
            item = items.get()
            while not isinstance(item, _Failure) and item is not done:
                try:
                    nxt = items.get_nowait()
                except queue.Empty:
                    break
                if nxt is done or isinstance(nxt, _Failure) or getattr(nxt, "final", False):
                    yield item
                item = nxt
            if isinstance(item, _Failure):
                raise item.error
            if item is done:
                return
            yield item
    finally:
        cancel.set()


class Event(dict):
    """An engine event for the UI (a dict); ``final`` ones are never coalesced away."""

    final = False


class FinalEvent(Event):
    final = True


def probe_size_from_env() -> tuple[int, int]:
    raw = os.environ.get("RLHF_PROBE", "").strip()
    if not raw:
        return (3, 3)
    try:
        taught, heldout = (int(x) for x in raw.split(","))
        if not (0 <= taught <= 50 and 0 <= heldout <= 50):
            raise ValueError
    except ValueError:
        raise ValueError(f"RLHF_PROBE must be 'taught,heldout' (two whole numbers 0-50), got {raw!r}") from None
    return taught, heldout


def load_cases(cases_dir: str | Path | None) -> tuple[list[Case], str | None]:
    """The case library, falling back to the built-in cases; (cases, problem or None)."""
    from rlhf_core.simulate import BUILTIN_CASES

    directory = Path(cases_dir) if cases_dir else default_cases_dir()
    try:
        cases = load_library(directory)
    except (CaseFormatError, FileNotFoundError) as err:
        return list(BUILTIN_CASES), f"Case library not loaded ({err}); showing the built-in cases."
    if not cases:
        return list(BUILTIN_CASES), None
    return cases, None


class _Cancelled(Exception):
    """The browser went away: stop a long read-only job (an evaluation)."""


def _ranked_group(order: list[str], traces: list[dict], negatives: list[dict] | None) -> tuple[list[Trace], list[int], int | None]:
    """(traces, best-to-worst indices, ranked) for ``Engine.update``: the ordered
    accepted traces, then the rejected ``negatives`` tied below the line.
    Raises RankingError for an invalid order or negative."""
    negatives = list(negatives or [])
    indices = validate_order(order, traces, below_the_line=len(negatives))
    validate_negatives(negatives, traces)
    indices += range(len(traces), len(traces) + len(negatives))
    return [Trace.from_dict(t) for t in [*traces, *negatives]], indices, len(traces) if negatives else None


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
        engine: Engine | None = None,
        *,
        db_path: str | Path | None = None,
        workspace: str | None = None,
        checkpoint_every: int | None = None,
        export_dir: str | Path | None = None,
        background_replay: bool = False,
        probe_size: tuple[int, int] | None = None,
    ):
        """``db_path``: the database (None: keep everything in memory only).
        ``workspace``: the one to open first (default: the one used last, else "default";
        a workspace of another model is never opened: ``Store.workspace_for_model``).
        ``checkpoint_every``: save the policy every N updates (default ``$RLHF_CHECKPOINT_EVERY`` or 10).
        ``export_dir``: where downloads are written (default: inside Gradio's file cache).
        ``background_replay``: replay the rankings a restart owes the policy in a thread
        (holding ``lock``, so model work queues behind it) while the page is served;
        ``restoring`` reports its progress.
        ``probe_size``: (taught, held-out) cases scored after every update (default
        ``$RLHF_PROBE`` as "taught,heldout", else 3,3; "0,0" turns the probe off)."""
        self.lock = threading.RLock()  # held for every use of the weights
        self._meta = threading.Lock()  # live records / caches; never held during compute
        self.generate_fn = generate_fn or engine_backend
        self.device = device
        self.checkpoint_every = checkpoint_every or checkpoint_every_from_env()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.export_dir = Path(export_dir) if export_dir is not None else default_export_dir()
        self.model_epoch = 1  # bumped when the model (tokenizer) changes
        self.revision = 0  # bumped on every change a browser should re-render
        self._run = 1  # without a database: bumped whenever the policy is replaced
        self._live: list[dict] = []  # this process's step and generation records (and, without a db, updates)
        self._persist_rev = 0  # bumped whenever the stored history may have changed
        self._history_cache: tuple | None = None
        self.unsaved: list[dict] = []  # without a db: rankings applied since the last save / load / reset
        self._mem_rankings: list[dict] = []  # without a db: every submitted ranking
        self.last_eval: dict | None = None
        self._batches: OrderedDict[str, dict] = OrderedDict()
        self.restoring: dict | None = None  # {"done", "total"} while a background replay runs
        self._reference_beliefs: dict[tuple, dict] = {}  # (model epoch, case id) -> the reference's belief
        self._restorer: threading.Thread | None = None
        self._background_replay = background_replay and engine is None and db_path is not None
        if engine is not None:
            self.store = engine.store
            self.engine = engine
        else:
            self.store = Store(db_path) if db_path is not None else None
            preferred = workspace or os.environ.get("RLHF_WORKSPACE") or self._remembered_workspace()
            self.engine = self._new_engine(model, lora, preferred)
        self._remember_workspace()
        cases, self.case_problem = load_cases(cases_dir)
        self.cases: dict[str, Case] = {c.id: c for c in cases}
        self.probe_size = probe_size if probe_size is not None else probe_size_from_env()
        self._build_probe()
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
        if self.store is not None and taught_n:
            for r in self.store.rankings(self.workspace):
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
                self.engine.replay_pending(progress)
        except Exception:  # noqa: BLE001 - the policy stays at its checkpoint; the log says why
            log.exception("replaying the workspace's pending rankings failed")
        finally:
            with self._meta:
                self.restoring = None
                self._persist_rev += 1
                self.revision += 1

    def wait_restored(self, timeout: float | None = None) -> bool:
        """Block until a background replay has finished (True), or ``timeout`` passed."""
        if self._restorer is not None:
            self._restorer.join(timeout)
            return not self._restorer.is_alive()
        return True

    def _new_engine(self, model: str, lora: bool, preferred: str | None) -> Engine:
        engine = Engine(model, lora=lora, device=self.device, checkpoint_every=self.checkpoint_every)
        if self.store is not None:
            self._attach(engine, preferred, resume=not self._background_replay)
        return engine

    def _attach(self, engine: Engine, preferred: str | None, resume: bool = True) -> None:
        """Open the workspace ``preferred`` when the loaded model can use it; when it is
        another model's, the first workspace of this model and mode, else a new one."""
        store = self.store
        preferred = preferred or DEFAULT_WORKSPACE
        ws = store.workspace(preferred)

        def fits(w: dict) -> bool:
            return (w["model"], w["mode"]) == (engine.lm.name, engine.mode)

        if ws is not None and ws["model"] is not None and not fits(ws):
            preferred = next((w["name"] for w in store.workspaces() if fits(w)), preferred)
        engine.attach_store(store, preferred=preferred, resume=resume)

    # ----------------------------------------------------------------- state
    @property
    def has_store(self) -> bool:
        return self.store is not None

    @property
    def workspace(self) -> str | None:
        return self.engine.workspace if self.store is not None else None

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def run(self) -> int:
        """The current run: the charts draw it in colour, earlier ones in grey."""
        if self.store is None:
            return self._run
        return self._stored()[1]

    def model_key(self) -> str:
        """Identifies the loaded model and workspace: traces sampled from another policy
        line cannot be trained on (or ranked into another workspace)."""
        return f"{self.engine.lm.name}|{self.engine.mode}|{self.model_epoch}|{self.workspace or ''}"

    def describe(self) -> dict:
        info = self.engine.describe()
        info.update(run=self.run, unsaved_updates=self.unsaved_count(), rankings=self.ranking_count(),
                    persistent=self.store is not None, restoring=self.restoring)
        return info

    def ranking_count(self) -> int:
        if self.store is None:
            return len(self._mem_rankings)
        return self.store.count("rankings", self.engine.workspace)

    def unsaved_count(self) -> int:
        """Updates whose weights no checkpoint holds (with a db a restart replays them)."""
        return self.engine.unsaved_updates if self.store is not None else len(self.unsaved)

    def unsaved_annotators(self) -> list[str]:
        """Who made the updates that no checkpoint holds."""
        if self.store is None:
            return sorted({r["annotator"] for r in self.unsaved})
        if not self.engine.unsaved_updates:
            return []
        ws = self.engine.workspace
        latest = self.store.latest_checkpoint(ws)
        updates = self.store.updates(ws, after_id=latest["after_update_id"] if latest else None)
        rows = {u["update_id"]: u for u in self._stored()[0]}
        return sorted({rows[u["id"]].get("annotator") or "unknown" for u in updates if u["id"] in rows})

    def conclusion_mode(self, choice: str | None = None) -> str:
        """The workspace's conclusion mode; a ``choice`` is saved as its setting."""
        return self.engine.conclusion_mode(choice)

    def default_lr(self) -> float:
        return default_lr(self.engine.lm)

    def _changed(self, persisted: bool = False) -> None:
        with self._meta:
            self.revision += 1
            self._persist_rev += int(persisted)

    def _append(self, record: dict) -> None:
        record.setdefault("workspace", self.workspace)
        with self._meta:
            self._live.append(record)
            if len(self._live) > MAX_LIVE_RECORDS:
                del self._live[: len(self._live) - MAX_LIVE_RECORDS]
            self.revision += 1

    def _stored(self) -> tuple[list[dict], int]:
        """The active workspace's stored history as chart records, cached until it changes."""
        key = (id(self.engine), self.engine.workspace, self._persist_rev)
        cached = self._history_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        value = stored_history(self.store, self.engine.workspace)
        self._history_cache = (key, value)
        return value

    def metrics(self, kind: str | None = None) -> list[dict]:
        """Chart records ("generation", "step", "update"; see ``ui.charts``) of the active
        workspace: its whole stored history plus this process's live records."""
        with self._meta:
            live = list(self._live)
        if self.store is None:
            rows = live
        else:
            ws = self.engine.workspace
            live = [r for r in live if r.get("workspace") == ws]
            updates = self._stored()[0]
            live_ids = {r.get("generation_id") for r in live if r["kind"] == "generation"}
            older = [g for g in map(generation_from_update, updates) if g and (not g["generation_id"] or g["generation_id"] not in live_ids)]
            rows = updates + older + live
        return [dict(r) for r in rows if kind is None or r["kind"] == kind]

    # ----------------------------------------------------------------- cases
    def case(self, case_id: str) -> Case:
        if case_id not in self.cases:
            raise KeyError(f"unknown case {case_id!r}")
        return self.cases[case_id]

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

    def specialties(self) -> list[str]:
        return sorted({c.specialty for c in self.cases.values()})

    def add_cases(self, cases: list[Case]) -> list[Case]:
        """Add uploaded cases; an id already used by a different case is an error."""
        clashes = [c.id for c in cases if c.id in self.cases and self.cases[c.id] != c]
        if clashes:
            raise ValueError(f"case id(s) already in the library with other content: {', '.join(clashes[:5])}")
        for c in cases:  # every case must make a prompt before any joins the picker
            try:
                build_messages(c)
                conclusion_candidates(c)
            except (ValueError, IndexError, KeyError) as err:
                raise ValueError(f"case {c.id!r} cannot be prompted: {err}") from None
        with self._meta:
            for c in cases:
                self.cases[c.id] = c
            self.revision += 1
        return cases

    # ------------------------------------------------------------ generation
    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces, streaming ``SamplerEvent``s (the last is "done"
        and carries a ``generation_id``). With a db every trace drawn is stored."""

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
                if engine.store is not None:
                    engine.store.record_traces(engine.workspace, last.traces, case)
                last.generation_id = self._record_generation(case, last, version, time.perf_counter() - started)
                last.final = True
                emit(last)

        yield from stream_from_thread(work)

    def _record_generation(self, case: Case, event: SamplerEvent, version: int, seconds: float) -> str:
        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        report = event.report
        generation_id = uuid.uuid4().hex[:12]
        self._append({
            "kind": "generation", "run": self.run, "version": version, "case_id": case.id,
            "generation_id": generation_id,
            "acceptance_rate": report.acceptance_rate, "sampled": report.sampled, "accepted": report.accepted,
            "rationalised": report.rationalised_accepted,
            "safety_accepted": mean([t.safety["score"] for t in event.accepted if t.safety]),
            "safety_all": mean([t.safety["score"] for t in event.traces if t.safety]),
            "seconds": seconds, "time": time.time(),
        })
        return generation_id

    def _generation(self, generation_id: str | None) -> dict | None:
        if not generation_id:
            return None
        with self._meta:
            for r in reversed(self._live):
                if r["kind"] == "generation" and r.get("generation_id") == generation_id:
                    return dict(r)
        return None

    def remember_batch(self, traces: list[dict], case_id: str, acceptance_rate: float | None,
                       generation_id: str | None = None, negatives: list[dict] | None = None) -> str:
        """Keep an API batch so a later rank+update call can refer to it by id."""
        batch_id = uuid.uuid4().hex[:12]
        with self._meta:
            self._batches[batch_id] = {
                "traces": traces, "negatives": list(negatives or []), "case_id": case_id, "model_key": self.model_key(),
                "acceptance_rate": acceptance_rate, "generation_id": generation_id, "submitted": False,
            }
            while len(self._batches) > MAX_CACHED_BATCHES:
                self._batches.popitem(last=False)
        return batch_id

    def batch(self, batch_id: str) -> dict:
        with self._meta:
            if batch_id not in self._batches:
                raise KeyError(f"unknown or expired batch {batch_id!r}; generate again")
            return self._batches[batch_id]

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
    ) -> Iterator[Event]:
        """Apply one ranking (best-to-worst trace ids of the accepted ``traces``; the
        rejected ``negatives`` join the group below the line, tied under every ranked
        trace). With a db the ranking is committed before the update starts
        (``Engine.update``). Yields step events, then a final "done" event with the
        metrics and the ranking record. An invalid ranking raises RankingError on the
        first iteration, before anything runs."""
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before submitting a ranking (it is stored with every ranking).")
        objs, indices, ranked = _ranked_group(order, traces, negatives)
        self._check_model(model_key)
        case = self.cases.get(objs[0].case_id)
        comments = {k: v for k, v in (comments or {}).items() if v and str(v).strip()}

        def work(emit, cancelled):  # an update always runs to the end
            with self.lock:
                self._check_model(model_key)
                engine, run = self.engine, self.run
                before = engine.version
                extra = self._update_extra(objs, indices, before, annotator, acceptance_rate, generation_id)

                def on_step(m):
                    rec = Event(kind="step", run=run, x=before + (m["step"] + 1) / config.steps,
                                version=before, algorithm=config.algorithm, **m)
                    self._append(dict(rec))
                    emit(rec)

                try:
                    result = engine.update(objs, indices, config, on_step=on_step, annotator=annotator,
                                           comments=comments, case=case, extra_metrics=extra, ranked=ranked)
                finally:
                    self._changed(persisted=True)  # the ranking is stored even when the update fails
                ratios = result.get("trace_logratio") or []
                if len(ratios) == len(objs):  # best to worst: how many times more likely each trace became
                    result["ranked_likelihood_ratios"] = [
                        None if ratios[i] is None else math.exp(max(-50.0, min(50.0, ratios[i]))) for i in indices]
                record = self._ranking_record(objs, indices, config, before, annotator, comments)
                record["ranked"] = ranked
                record.update(version_after=result["version"], metrics=dict(result))
                if "ranking_id" in result:
                    record["ranking_id"] = result["ranking_id"]
                if self.store is None:
                    self._append({"kind": "update", "run": run, "x": result["version"], "time": time.time(),
                                  **extra, **result})
                    with self._meta:
                        self._mem_rankings.append(record)
                        self.unsaved.append(record)
                self._changed(persisted=True)
                emit(FinalEvent(kind="done", result=result, ranking=record))

        yield from stream_from_thread(work)

    def _update_extra(self, traces, indices, before, annotator, acceptance_rate, generation_id) -> dict:
        """What the charts need of an update beyond the trainer's metrics (stored with it)."""
        safety = [t.safety["score"] for t in traces if t.safety]
        top = traces[indices[0]].safety
        extra = {
            "annotator": annotator, "case_id": traces[0].case_id, "version_before": before, "n_traces": len(traces),
            "below_the_line": sum(not (t.verdict or {}).get("accepted") for t in traces),
            "acceptance_rate": acceptance_rate,
            "safety_ranked": sum(safety) / len(safety) if safety else None,
            "safety_top": top["score"] if top else None,
            "sampled_version": min(t.policy_version for t in traces),
        }
        generation = self._generation(generation_id)
        if generation:
            extra["generation_id"] = generation_id
            for key in ("sampled", "accepted", "rationalised", "safety_accepted", "safety_all"):
                extra[key] = generation.get(key)
            extra["sampled_version"] = generation["version"]
            if extra["acceptance_rate"] is None:
                extra["acceptance_rate"] = generation["acceptance_rate"]
        return extra

    def record_ranking(self, traces: list[dict], order: list[str], *, annotator: str, model_key: str,
                       comments: dict[str, str] | None = None, negatives: list[dict] | None = None) -> int:
        """Store a ranking without updating the policy (a second opinion, for the
        agreement view; the same ``negatives`` below the line as the update's, so
        both rank the same group). Returns its id. Needs a db."""
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before recording a ranking (it is stored with every ranking).")
        objs, indices, ranked = _ranked_group(order, traces, negatives)
        if self.store is None:
            raise RankingError("This app runs without a database, so a ranking cannot be recorded on its own.")
        engine = self.engine
        with engine.lock:
            self._check_model(model_key)
            ranking_id = engine.record_ranking(objs, indices, annotator, comments=comments or {},
                                               case=self.cases.get(objs[0].case_id), ranked=ranked)
        self._changed(persisted=True)
        return ranking_id

    def _check_model(self, model_key: str) -> None:
        if model_key != self.model_key():
            raise RankingError("The model or workspace was switched since these traces were generated; generate again.")

    def _ranking_record(self, traces, indices, config, before, annotator, comments) -> dict:
        """What a clinician submitted, with the policy version each trace was sampled from."""
        return {
            "ranking_id": uuid.uuid4().hex[:12], "time": time.time(), "annotator": annotator,
            "case_id": traces[0].case_id, "model": self.engine.lm.name, "mode": self.engine.mode,
            "workspace": self.workspace,
            "order": [traces[i].trace_id for i in indices],
            "traces": [t.to_dict() for t in traces],
            "sampled_versions": {t.trace_id: t.policy_version for t in traces},
            "policy_version_sampled": min(t.policy_version for t in traces),
            "version_before": before, "version_after": None,
            "comments": {k: v for k, v in comments.items() if v},
            "algorithm": config.algorithm, "config": dict(vars(config)), "metrics": None,
        }

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
            self._run += 1
            self.model_epoch += int(epoch)
            self.unsaved = []
            self._persist_rev += 1
            self.revision += 1

    def switch_model(self, model: str, lora: bool) -> dict:
        """Load another model (the old one stays until the new one has loaded). With a db
        the current policy is checkpointed first and the new model opens a workspace it
        can use: the current one when it fits, else its own (``Store.workspace_for_model``)."""
        with self.lock:
            old = self.engine
            engine = Engine(model, lora=lora, device=self.device, checkpoint_every=self.checkpoint_every)
            if self.store is not None:
                old.save_pending()
                self._attach(engine, old.workspace)
            self.engine = engine
            self._remember_workspace()
            self._build_probe()
            self._policy_replaced(epoch=True)
            return self.describe()

    def reset(self) -> dict:
        with self.lock:
            self.engine.reset()
            self._policy_replaced()
            return self.describe()

    def checkpoint_path(self, name: str) -> Path:
        if not CHECKPOINT_NAME.fullmatch(name or ""):
            raise ValueError("Checkpoint names use letters, digits, '.', '_' and '-' (at most 64, not starting with a dot).")
        return self.checkpoint_dir / name

    def save(self, name: str) -> Path:
        path = self.checkpoint_path(name)
        with self.lock:
            extra = {"rankings": self.ranking_count(), "run": self.run}
            if self.store is None:
                extra["annotators"] = sorted({r["annotator"] for r in self._mem_rankings})
            else:
                extra["workspace"] = self.workspace
            out = self.engine.save(path, extra=extra)
            with self._meta:
                self.unsaved = []
                self.revision += 1
            return out

    def load(self, name: str) -> dict:
        path = self.checkpoint_path(name)
        with self.lock:
            manifest = self.engine.load(path)
            self._policy_replaced()
            return manifest

    def checkpoints(self) -> list[dict]:
        """Saved checkpoints under ``checkpoint_dir``, newest first."""
        found = []
        if self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.iterdir():
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

    def close(self) -> Path | None:
        """On a clean shutdown: checkpoint updates no checkpoint holds yet (so the next
        start loads them instead of replaying), then close the database."""
        with self.lock:
            if self.store is None:
                return None
            path = self.engine.save_pending()
            self.store.close()
            return path

    # ------------------------------------------------------------ workspaces
    def _require_store(self) -> Store:
        if self.store is None:
            raise ValueError("This app runs without a database: workspaces, exports and imports need one.")
        return self.store

    def _state_file(self) -> Path | None:
        return None if self.store is None else self.store.path.with_name(self.store.path.stem + ".control-room.json")

    def _remembered_workspace(self) -> str | None:
        path = self._state_file()
        try:
            return json.loads(path.read_text())["workspace"] if path and path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remember_workspace(self) -> None:
        """The next start opens the workspace in use now (if the model loaded then fits it)."""
        path = self._state_file()
        if path is None:
            return
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"workspace": self.engine.workspace}))
            os.replace(tmp, path)
        except OSError:
            pass

    def workspaces(self) -> list[dict]:
        self._require_store()
        return self.engine.workspaces()

    def create_workspace(self, name: str) -> dict:
        """A new, empty workspace for the loaded model (not switched to)."""
        self._require_store()
        name = (name or "").strip()
        with self.engine.lock:
            self.engine.create_workspace(name, switch=False)
        self._changed()
        return self.store.workspace(name)

    def switch_workspace(self, name: str) -> dict:
        """Make ``name`` the active workspace (its latest checkpoint is loaded, what it
        lacks replayed); the current one is checkpointed first if it needs it."""
        self._require_store()
        with self.lock:
            info = self.engine.switch_workspace(name)
            self._remember_workspace()
            self._build_probe()
            with self._meta:
                self.unsaved = []
                self._persist_rev += 1
                self.revision += 1
            return info

    def agreement(self) -> list[dict]:
        self._require_store()
        return self.engine.agreement()

    # --------------------------------------------------------------- exports
    def export(self, fmt: str, exclude_rationalised: bool = False, all_workspaces: bool = False) -> Path:
        """Write an export (trl | trl-text | rankings | agreement) for a download."""
        self._require_store()
        return self.engine.export_file(fmt, exclude_rationalised=exclude_rationalised,
                                       all_workspaces=all_workspaces, directory=self.export_dir)

    def checkpoint_archive(self) -> Path:
        """A .zip of the current policy's checkpoint, for a download (saved first if needed)."""
        from rlhf_core.export import checkpoint_archive

        with self.lock:
            engine = self.engine
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{self.workspace or 'policy'}-v{engine.version}-{stamp}-{uuid.uuid4().hex[:6]}"
            out = self.export_dir / f"{name}.zip"
            if self.store is not None:
                path = engine.checkpoint_archive(out)
            else:
                folder = self.export_dir / f".{name}"
                try:
                    engine.save(folder, extra={"run": self.run})
                    path = checkpoint_archive(folder, out)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            self._changed()  # a save may have cleared the "not in a checkpoint" count
        self._prune_archives(keep=path)
        return path

    def _prune_archives(self, keep: Path) -> None:
        zips = sorted(self.export_dir.glob("*.zip"), key=lambda p: p.stat().st_mtime)
        for old in zips[:-ARCHIVES_KEPT]:
            if old != keep:
                old.unlink(missing_ok=True)

    def import_rankings(self, path: str | Path, annotator: str | None = None) -> dict:
        """Import a rankings export or a TRL pair file into the active workspace (the policy
        is not updated; the rankings count for exports and the agreement view)."""
        self._require_store()
        counts = self.engine.import_file(path, annotator=annotator or None)
        self._changed(persisted=True)
        return counts

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
                        raise _Cancelled()
                    emit(Event(kind="progress", **p))

                try:
                    result = heldout_comparison(self.engine, cases, samples=samples, heldout_fraction=heldout_fraction,
                                                max_new_tokens=max_new_tokens, temperature=temperature,
                                                on_progress=progress)
                except _Cancelled:
                    return
                result["workspace"] = self.workspace
                with self._meta:
                    self.last_eval = result
                emit(FinalEvent(kind="done", result=result))

        yield from stream_from_thread(work)
