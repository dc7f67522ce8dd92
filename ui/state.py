"""The app-level control room: the one policy shared by every browser session.

``ControlRoom`` coordinates; the work is done by its parts, the way LLaMA-Factory's
web UI composes its engine: the ``Engine`` (model, reference, optimiser, the
database's workspaces), the ``Runner`` (model work streamed from a worker thread
by ``jobs.stream_from_thread``: sampling, updates, second opinions, autopilot,
evaluation), the ``PolicyManager`` (models, checkpoints, workspaces, exports), the
``CaseLibrary``, the ``ChartHistory`` the charts draw from and the ``BatchCache``
of API batches. ``lock`` is the one lock for the weights, shared with every
engine a model switch creates.

There is one persistence path: every trace, ranking, update and checkpoint
goes to a ``Store``. Without a database path (tests, throw-away demos) the
store is ``Store.temporary()``, deleted on ``close``, and ``describe()`` says the
session is not persistent.

Browser sessions hold only small, copyable state (trace dicts, case id,
annotator); see ``new_session``.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from rlhf_core.belief import ProbeSet, belief
from rlhf_core.clinical.cases import Case
from rlhf_core.engine import Engine, lora_from_checkpoint
from rlhf_core.evaluate import split_cases
from rlhf_core.library import CaseLibrary
from rlhf_core.model.models import DEFAULT_MODEL, LoraSettings, resolve_spec
from rlhf_core.storage.store import DEFAULT_WORKSPACE, Store
from rlhf_core.reward.suggest import RankingAdvisor
from rlhf_core.training.update import default_lr

from .backends import GenerateFn, engine_backend
from .batches import BatchCache
from .files import remember_workspace, remembered_workspace
from .history import ChartHistory
from .policies import PolicyManager
from .runner import Runner
from .settings import checkpoint_every_from_env, default_export_dir, probe_size_from_env

log = logging.getLogger(__name__)


def new_session() -> dict:
    """Per-browser state: the picked case, the traces being ranked, the annotator."""
    return {"case_id": None, "batch": None, "annotator": "", "pending": None, "pending_workspace": None,
            "confirm_heldout": None}


class ControlRoom:
    """One policy per running app, and everything the UI and the API do with it."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        lora: bool | None = None,
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
        """``lora``: True for an adapter, False for full fine-tuning, None for the mode the
        workspace to open was trained in, else the hardware default (``lora_by_default``).
        ``db_path``: the database (None: a temporary one, deleted on ``close``).
        ``workspace``: the one to open first (default: the one used last, else "default";
        a workspace of another model is never opened: ``Store.workspace_for_model``).
        ``checkpoint_every``: save the policy every N updates (default ``$RLHF_CHECKPOINT_EVERY`` or 10).
        ``export_dir``: where downloads are written (default: inside Gradio's file cache).
        ``background_replay``: replay the rankings a restart owes the policy in a thread
        (holding ``lock``, so model work queues behind it) while the page is served;
        ``restoring`` reports its progress.
        ``probe_size``: (taught, held-out) cases scored after every update (default
        ``$RLHF_PROBE`` as "taught,heldout", else ``settings.PROBE_SIZE``; "0,0" turns the probe off)."""
        self.lock = threading.RLock()  # the one lock for every use of the weights
        self._meta = threading.Lock()  # counters; never held during compute
        self.generate_fn = generate_fn or engine_backend
        self.device = device
        self.checkpoint_every = checkpoint_every or checkpoint_every_from_env()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.export_dir = Path(export_dir) if export_dir is not None else default_export_dir()
        self.store = Store(db_path) if db_path is not None else Store.temporary()
        self.model_epoch = 1  # bumped when the model (tokenizer) changes
        self.revision = 0  # bumped on every change a browser should re-render
        self.history = ChartHistory(self.store)
        self.runner = Runner(self)  # model work: sampling, updates, autopilot, evaluation
        self.policies = PolicyManager(self)  # models, checkpoints, workspaces, exports
        self.batches = BatchCache()
        self.advisor = RankingAdvisor(self.store)  # the workspace's reward model, for suggested orders
        self.last_eval: dict | None = None
        self.restoring: dict | None = None  # {"done", "total"} while a background replay runs
        self._reference_beliefs: dict[tuple, dict] = {}  # (model epoch, case id) -> the reference's belief
        self._background_replay = background_replay and self.persistent
        preferred = workspace or os.environ.get("RLHF_WORKSPACE") or remembered_workspace(self.store.path)
        self.engine = self.new_engine(model, lora, preferred, resume=not self._background_replay)
        remember_workspace(self.store.path, self.engine.workspace)
        self.cases = CaseLibrary.load(cases_dir)
        self.case_problem = self.cases.problem
        self.probe_size = probe_size if probe_size is not None else probe_size_from_env()
        self.build_probe()
        self._restorer: threading.Thread | None = None
        if self._background_replay:
            self.restoring = {"done": 0, "total": None}
            self._restorer = threading.Thread(target=self._restore, name="replay", daemon=True)
            self._restorer.start()

    def build_probe(self) -> None:
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
            self.changed(persisted=True)

    def wait_restored(self, timeout: float | None = None) -> bool:
        """Block until a background replay has finished (True), or ``timeout`` passed."""
        if self._restorer is not None:
            self._restorer.join(timeout)
            return not self._restorer.is_alive()
        return True

    def new_engine(self, model: str, lora: bool | None, preferred: str | None, resume: bool = True) -> Engine:
        """Load ``model`` and open the workspace ``preferred`` when it can use it; when it is
        another model's, the first workspace of this model and mode, else a new one.
        ``lora=None``: the mode ``preferred`` was trained in with this model, else "auto"."""
        store, preferred = self.store, preferred or DEFAULT_WORKSPACE
        ws = store.workspace(preferred)
        if lora is None:
            lora = self._trained_mode(ws, model)
        engine = Engine(model, lora=lora, device=self.device, checkpoint_every=self.checkpoint_every, lock=self.lock)

        def fits(w: dict) -> bool:
            return (w["model"], w["mode"]) == (engine.lm.name, engine.mode)

        if ws is not None and ws["model"] is not None and not fits(ws):
            preferred = next((w["name"] for w in store.workspaces() if fits(w)), preferred)
        engine.attach_store(store, preferred=preferred, resume=resume)
        return engine

    def _trained_mode(self, ws: dict | None, model: str) -> LoraSettings | bool | str:
        """How workspace ``ws`` trained ``model`` when it holds training of it: False for full
        fine-tuning (a database from before LoRA became the CPU default keeps it), for LoRA
        its latest checkpoint's adapter (one on the top layers only keeps that shape, though
        the default covers every layer) or True; else "auto"."""
        if ws is None or ws["model"] != resolve_spec(model).name or ws["mode"] not in ("lora", "full"):
            return "auto"
        latest = self.store.latest_checkpoint(ws["name"])
        if latest is None and not self.store.updates(ws["name"]):
            return "auto"
        if ws["mode"] != "lora":
            return False
        try:
            return (latest and latest["path"] and lora_from_checkpoint(latest["path"])) or True
        except (OSError, ValueError, KeyError, TypeError):  # an unreadable manifest: open() falls back past it
            return True

    # ----------------------------------------------------------------- state
    @property
    def persistent(self) -> bool:
        """The rankings outlive this process (a database file, not ``Store.temporary()``)."""
        return not self.store.is_temporary

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
        return self.engine.workspaces.conclusion_mode(choice)

    def default_lr(self) -> float:
        return default_lr(self.engine.lm)

    def changed(self, persisted: bool = False) -> None:
        if persisted:
            self.history.changed()
        with self._meta:
            self.revision += 1

    def append(self, record: dict) -> None:
        record.setdefault("workspace", self.workspace)
        self.history.append(record)
        self.changed()

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

    def heldout_ids(self) -> set[str]:
        """Ids of the library's cases held out for evaluation (``evaluate.split_cases``: the
        Evaluate tab's A/B and the probe's held-out line); training on them needs a confirmation."""
        return {c.id for c in split_cases(list(self.cases.values()))[1]}

    def specialties(self) -> list[str]:
        return self.cases.specialties()

    def add_cases(self, cases: list[Case]) -> list[Case]:
        """Add uploaded cases (``CaseLibrary.add``: all or none)."""
        with self._meta:
            added = self.cases.add(cases)
            self.revision += 1
        return added

    def remember_batch(self, traces: list[dict], case_id: str, acceptance_rate: float | None,
                       generation_id: str | None = None, negatives: list[dict] | None = None,
                       suggestion: dict | None = None) -> str:
        """Keep an API batch so a later rank+update call can refer to it by id."""
        return self.batches.remember(traces=traces, negatives=list(negatives or []), case_id=case_id,
                                     model_key=self.model_key(), acceptance_rate=acceptance_rate,
                                     generation_id=generation_id, suggestion=suggestion)

    def batch(self, batch_id: str) -> dict:
        return self.batches.get(batch_id)

    def policy_replaced(self, epoch: bool = False) -> None:
        """The weights were replaced (a model switch bumps the epoch: old traces cannot be trained on)."""
        with self._meta:
            self.model_epoch += int(epoch)
        self.changed(persisted=True)

    def close(self) -> Path | None:
        """On a clean shutdown: checkpoint updates no checkpoint holds yet (so the next
        start loads them instead of replaying), then close the database (a temporary
        one is deleted)."""
        pending = self.runner.reference_thread
        if pending is not None:  # a batch's preparation: its reference pass stores what it computes
            self.runner.stop_preparing()
            pending.join()
        with self.lock:
            path = self.engine.checkpoints.save_pending() if self.persistent else None
            self.store.close()
            return path

