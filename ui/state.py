"""The app-level control room: the one policy shared by every browser session.

``ControlRoom`` owns the ``Engine`` (model, reference, optimiser), the case
library, the session-wide metrics history and the log of rankings. Everything
that reads or changes the weights (sampling, updates, save, load, reset,
switching model) runs under ``lock`` in a worker thread; handlers consume its
events from a queue, so a browser that disconnects never leaves an update half
applied, and the lock is always released by the thread that took it.

Browser sessions hold only small, copyable state (trace dicts, case id,
annotator); see ``new_session``.
"""
from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

from rlhf_core.cases import Case, CaseFormatError, default_cases_dir, load_library
from rlhf_core.checkpoint import read_manifest
from rlhf_core.engine import Engine
from rlhf_core.generation import SamplingConfig, Trace
from rlhf_core.models import DEFAULT_MODEL, REGISTRY, availability
from rlhf_core.sampler import RejectionConfig, SamplerEvent, sample_verified_stream
from rlhf_core.update import DPOConfig, GRPOConfig, default_lr

from .backends import GenerateFn, engine_backend
from .ranking import RankingError, validate_order

CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CACHED_BATCHES = 64  # API batches kept for rank+update calls


def new_session() -> dict:
    """Per-browser state: the picked case, the traces being ranked, the annotator."""
    return {"case_id": None, "batch": None, "annotator": "", "pending": None}


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
    ):
        self.lock = threading.RLock()  # held for every use of the weights
        self._meta = threading.Lock()  # history / rankings / caches; never held during compute
        self.generate_fn = generate_fn or engine_backend
        self.device = device
        self.engine = engine or Engine(model, lora=lora, device=device)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run = 1  # bumped whenever the policy is replaced (reset, load, switch)
        self.model_epoch = 1  # bumped when the model (tokenizer) changes
        self.history: list[dict] = []  # generation, step and update records, in order
        self.rankings: list[dict] = []  # every submitted ranking
        self.revision = 0  # bumped on every change a browser should re-render
        self.unsaved: list[dict] = []  # rankings applied since the last save / load / reset
        # Hooks for persistence (e.g. a database): ``on_ranking(record)`` runs before the update
        # starts (raising aborts it, so nothing is trained on a ranking that was not stored);
        # ``on_update(record)`` runs after, with the record's "metrics" and "version_after" filled.
        self.on_ranking: list[Callable[[dict], None]] = []
        self.on_update: list[Callable[[dict], None]] = []
        self._batches: OrderedDict[str, dict] = OrderedDict()
        cases, self.case_problem = load_cases(cases_dir)
        self.cases: dict[str, Case] = {c.id: c for c in cases}

    # ----------------------------------------------------------------- state
    @property
    def version(self) -> int:
        return self.engine.version

    def model_key(self) -> str:
        """Identifies the loaded model: traces from another one cannot be trained on."""
        return f"{self.engine.lm.name}|{self.describe()['mode']}|{self.model_epoch}"

    def describe(self) -> dict:
        info = self.engine.describe()
        info.update(run=self.run, unsaved_updates=len(self.unsaved), rankings=len(self.rankings))
        return info

    def default_lr(self) -> float:
        return default_lr(self.engine.lm)

    def _append(self, record: dict) -> None:
        with self._meta:
            self.history.append(record)
            self.revision += 1

    def metrics(self, kind: str | None = None) -> list[dict]:
        with self._meta:
            return [dict(r) for r in self.history if kind is None or r["kind"] == kind]

    # ----------------------------------------------------------------- cases
    def case(self, case_id: str) -> Case:
        if case_id not in self.cases:
            raise KeyError(f"unknown case {case_id!r}")
        return self.cases[case_id]

    def specialties(self) -> list[str]:
        return sorted({c.specialty for c in self.cases.values()})

    def add_cases(self, cases: list[Case]) -> list[Case]:
        """Add uploaded cases; an id already used by a different case is an error."""
        clashes = [c.id for c in cases if c.id in self.cases and self.cases[c.id] != c]
        if clashes:
            raise ValueError(f"case id(s) already in the library with other content: {', '.join(clashes[:5])}")
        with self._meta:
            for c in cases:
                self.cases[c.id] = c
            self.revision += 1
        return cases

    # ------------------------------------------------------------ generation
    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces, streaming ``SamplerEvent``s (the last is "done")."""

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
                self._record_generation(case, last, version, time.perf_counter() - started)
                last.final = True
                emit(last)

        yield from stream_from_thread(work)

    def _record_generation(self, case: Case, event: SamplerEvent, version: int, seconds: float) -> None:
        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        report = event.report
        self._append({
            "kind": "generation", "run": self.run, "version": version, "case_id": case.id,
            "acceptance_rate": report.acceptance_rate, "sampled": report.sampled, "accepted": report.accepted,
            "rationalised": report.rationalised_accepted,
            "safety_accepted": mean([t.safety["score"] for t in event.accepted if t.safety]),
            "safety_all": mean([t.safety["score"] for t in event.traces if t.safety]),
            "seconds": seconds, "time": time.time(),
        })

    def remember_batch(self, traces: list[dict], case_id: str, acceptance_rate: float | None) -> str:
        """Keep an API batch so a later rank+update call can refer to it by id."""
        batch_id = uuid.uuid4().hex[:12]
        with self._meta:
            self._batches[batch_id] = {
                "traces": traces, "case_id": case_id, "model_key": self.model_key(),
                "acceptance_rate": acceptance_rate, "submitted": False,
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
    ) -> Iterator[Event]:
        """Apply one ranking (best-to-worst trace ids). Yields step events, then a final
        "done" event with the metrics and the ranking record. An invalid ranking raises
        RankingError on the first iteration, before anything runs."""
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before submitting a ranking (it is stored with every ranking).")
        indices = validate_order(order, traces)
        self._check_model(model_key)
        objs = [Trace.from_dict(t) for t in traces]

        def work(emit, cancelled):  # an update always runs to the end
            with self.lock:
                self._check_model(model_key)
                engine, run = self.engine, self.run
                before = engine.version
                record = self._ranking_record(objs, indices, config, before, annotator, comments or {})
                for hook in list(self.on_ranking):
                    hook(record)

                def on_step(m):
                    rec = Event(kind="step", run=run, x=before + (m["step"] + 1) / config.steps,
                                version=before, algorithm=config.algorithm, **m)
                    self._append(dict(rec))
                    emit(rec)

                result = engine.update(objs, indices, config, on_step=on_step)
                self._record_update(objs, indices, result, before, annotator, acceptance_rate, run)
                record.update(version_after=result["version"], metrics=dict(result))
                with self._meta:
                    self.rankings.append(record)
                    self.unsaved.append(record)
                    self.revision += 1
                for hook in list(self.on_update):
                    hook(record)
                emit(FinalEvent(kind="done", result=result, ranking=record))

        yield from stream_from_thread(work)

    def _check_model(self, model_key: str) -> None:
        if model_key != self.model_key():
            raise RankingError("The model was switched since these traces were generated; generate again.")

    def _ranking_record(self, traces, indices, config, before, annotator, comments) -> dict:
        """What a clinician submitted, with the policy version each trace was sampled from."""
        return {
            "ranking_id": uuid.uuid4().hex[:12], "time": time.time(), "annotator": annotator,
            "case_id": traces[0].case_id, "model": self.engine.lm.name, "mode": self.describe()["mode"],
            "order": [traces[i].trace_id for i in indices],
            "traces": [t.to_dict() for t in traces],
            "sampled_versions": {t.trace_id: t.policy_version for t in traces},
            "policy_version_sampled": min(t.policy_version for t in traces),
            "version_before": before, "version_after": None,
            "comments": {k: v for k, v in comments.items() if v},
            "algorithm": config.algorithm, "config": dict(vars(config)), "metrics": None,
        }

    def _record_update(self, traces, indices, result, before, annotator, acceptance_rate, run) -> None:
        safety = [t.safety["score"] for t in traces if t.safety]
        top = traces[indices[0]].safety
        self._append({
            "kind": "update", "run": run, "version": result["version"], "version_before": before,
            "x": result["version"], "annotator": annotator, "case_id": traces[0].case_id,
            "n_traces": len(traces), "acceptance_rate": acceptance_rate,
            "safety_ranked": sum(safety) / len(safety) if safety else None,
            "safety_top": top["score"] if top else None,
            "time": time.time(), **{k: v for k, v in result.items() if k != "version"},
        })

    # ---------------------------------------------------------------- models
    def models(self) -> list[dict]:
        """The registry with each model's state: loaded, available, downloadable or unavailable."""
        rows = []
        for name, spec in REGISTRY.items():
            state, why = availability(name)
            if name == self.engine.lm.name:
                state, why = "loaded", f"{self.describe()['mode']} on {self.engine.describe()['device']}"
            rows.append({"model": name, "state": state, "why": why, "description": spec.description})
        return rows

    def _new_run(self, epoch: bool = False) -> None:
        with self._meta:
            self.run += 1
            self.model_epoch += int(epoch)
            self.unsaved = []
            self.revision += 1

    def switch_model(self, model: str, lora: bool) -> dict:
        """Load another model (the old one stays until the new one has loaded)."""
        with self.lock:
            engine = Engine(model, lora=lora, device=self.device)
            self.engine = engine
            self._new_run(epoch=True)
            return self.describe()

    def reset(self) -> dict:
        with self.lock:
            self.engine.reset()
            self._new_run()
            return self.describe()

    def checkpoint_path(self, name: str) -> Path:
        if not CHECKPOINT_NAME.match(name or ""):
            raise ValueError("Checkpoint names use letters, digits, '.', '_' and '-' (at most 64, not starting with a dot).")
        return self.checkpoint_dir / name

    def save(self, name: str) -> Path:
        path = self.checkpoint_path(name)
        with self.lock:
            extra = {"rankings": len(self.rankings), "annotators": sorted({r["annotator"] for r in self.rankings}), "run": self.run}
            out = self.engine.save(path, extra=extra)
            with self._meta:
                self.unsaved = []
                self.revision += 1
            return out

    def load(self, name: str) -> dict:
        path = self.checkpoint_path(name)
        with self.lock:
            manifest = self.engine.load(path)
            self._new_run()
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
