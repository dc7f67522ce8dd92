"""Model work for the control room, streamed from the worker thread (``jobs``): sampling,
updates, second opinions, the autopilot and the held-out evaluation. Every call takes the
room's one lock for the weights; handlers iterate the events it yields."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Iterator

from rlhf_core.clinical.cases import Case
from rlhf_core.evaluate import split_cases
from rlhf_core.reward.reward_data import MODEL_RANKED
from rlhf_core.rollout.generation import SamplingConfig
from rlhf_core.rollout.records import Trace
from rlhf_core.rollout.sampler import RejectionConfig, SamplerEvent, sample_verified_stream
from rlhf_core.simulate import SimulationSettings, clinicians_reward_model, play_round
from rlhf_core.training.prepared import prepare_in_turns
from rlhf_core.training.update import DPOConfig, GRPOConfig

from .batch import trainable
from .jobs import Cancelled, Event, FinalEvent, stream_from_thread
from .ranking import HeldOutCase, RankingError
from .updates import likelihood_ratios, ranked_group, ranking_record, suggestion_record, update_extra

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the room builds its runner
    from .state import ControlRoom


class Runner:
    """Sampling, updates, second opinions, autopilot and evaluation on the room's policy."""

    def __init__(self, room: "ControlRoom"):
        self.room = room
        self.reference_thread: threading.Thread | None = None  # the last background preparation
        self._preparing = 0  # bumped to stop the background preparation of a batch
        self._chosen: dict[str, str] = {}  # a shown batch's first trace id -> the update picked for it

    def sample(self, case: Case, sampling: SamplingConfig, rejection: RejectionConfig) -> Iterator[SamplerEvent]:
        """Rejection-sample verified traces, streaming ``SamplerEvent``s (the last is "done"
        and carries a ``generation_id``). Every trace drawn is stored. While no reward model
        can suggest an order, the traces are sampled without reward-model features and, once
        the policy has moved, without their reference log-probs: both come from a reference
        pass over every row (~1/3 of a batch's time on SmolLM2), which only the traces that
        can be trained on need (``prepare_reference`` runs it once the cards are shown)."""
        room = self.room
        self.stop_preparing()  # a new batch: the last one's preparation is moot
        if sampling.reward_features and room.advisor.model(room.workspace) is None:
            sampling = dataclasses.replace(sampling, reward_features=False)

        def work(emit, cancelled):
            with room.lock:
                engine = room.engine
                version, started = engine.version, time.perf_counter()

                def generate(c, s, h):
                    return room.generate_fn(engine, c, s, h)

                last = None
                for last in sample_verified_stream(generate, case, sampling, rejection):
                    if last.phase == "done":
                        break
                    emit(last)
                    if cancelled():
                        return
                engine.store.record_traces(engine.workspace, last.traces, case)
                last.generation_id = room.history.record_generation(engine.workspace, case.id, last, version,
                                                                    time.perf_counter() - started)
                room.changed()
                last.final = True
                emit(last)

        yield from stream_from_thread(work)


    def prepare_reference(self, traces: list[dict], model_key: str) -> int:
        """The reference pass the update of a shown batch will need, run while the clinician
        reads it (``Engine.prepare_reference``); nothing once the model or workspace changed.
        Returns how many traces it gave something to."""
        room = self.room
        with room.lock:
            try:
                self.check_model(model_key)
            except RankingError:
                return 0
            return room.engine.prepare_reference([Trace.from_dict(t) for t in traces])

    def prepare_first_step(self, traces: list[dict], model_key: str, token: int, algorithm: str) -> int:
        """The first step of an ``algorithm`` update of a shown batch (``prepared.prepare_in_turns``),
        after the traces' reference pass (loaded when stored, run when not: GRPO's first step
        reads it); stopped by a *Submit* or a new generation (after ``token`` was taken).
        Returns how many traces are ready."""
        room = self.room
        objs = [Trace.from_dict(t) for t in traces]
        with room.lock:
            try:
                self.check_model(model_key)
            except RankingError:
                return 0
            engine = room.engine
            engine.prepare_reference(objs)
        ready = prepare_in_turns(engine.trainer, engine.lock, objs,
                                 lambda: self._preparing != token or room.engine is not engine, algorithm)
        log.info("first %s step prepared for %d of %d traces", algorithm.upper(), ready, len(objs))
        return ready

    def stop_preparing(self) -> None:
        """Stop the first-step preparation of the last batch shown (within one forward or backward pass)."""
        self._preparing += 1

    def prepare_shown(self, batch: dict, algorithm: str, chosen: bool = False) -> threading.Thread:
        """``prepare_in_background`` for a batch shown in the browser. ``chosen``: the clinician
        just picked ``algorithm`` for it; a later call with the radio's earlier value (an event
        queued before the pick) then prepares the picked one."""
        shown = trainable(batch)
        key = shown[0]["trace_id"]
        if chosen:
            self._chosen[key] = algorithm
            while len(self._chosen) > 64:  # one entry per recent batch, across sessions
                self._chosen.pop(next(iter(self._chosen)))
        return self.prepare_in_background(shown, batch["model_key"], self._chosen.get(key, algorithm))

    def prepare_in_background(self, traces: list[dict], model_key: str, algorithm: str = "dpo") -> threading.Thread:
        """``prepare_first_step`` on a thread of its own, while the batch's reader reads (the
        browser's cards, the API's /generate); an earlier batch's preparation stops. Returns
        the started thread."""
        self.stop_preparing()
        thread = threading.Thread(target=self.prepare_first_step, args=(traces, model_key, self._preparing, algorithm),
                                  daemon=True, name="prepare-update")
        thread.start()
        self.reference_thread = thread
        return thread

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
        train_heldout: bool = False,
    ) -> Iterator[Event]:
        """Apply one ranking (best-to-worst trace ids of the accepted ``traces``; the
        rejected ``negatives`` join the group below the line, tied under every ranked
        trace). The ranking is committed before the update starts
        (``Engine.update``), with the reward model's ``suggestion`` if one was shown
        (``suggestion_record``: how far the clinician moved away from it). Yields step events, then a final "done" event with the
        metrics and the ranking record. An invalid ranking raises RankingError on the
        first iteration, before anything runs."""
        room = self.room
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before submitting a ranking (it is stored with every ranking).")
        objs, indices, ranked = ranked_group(order, traces, negatives)
        self.check_model(model_key)
        self.stop_preparing()  # the update takes what is prepared so far
        case = room.cases.get(objs[0].case_id)
        if not train_heldout and objs[0].case_id in room.heldout_ids():
            raise HeldOutCase(objs[0].case_id)
        shown = suggestion_record(suggestion, order)
        comments = {k: v for k, v in (comments or {}).items() if v and str(v).strip()}

        def work(emit, cancelled):  # an update always runs to the end
            with room.lock:
                self.check_model(model_key)
                engine, run = room.engine, room.run
                before = engine.version
                extra = update_extra(objs, indices, before, annotator, acceptance_rate,
                                     room.history.generation(generation_id))

                def on_step(m):
                    rec = Event(kind="step", run=run, x=before + (m["step"] + 1) / config.steps,
                                version=before, algorithm=config.algorithm, **m)
                    room.append(dict(rec))
                    emit(rec)

                try:
                    result = engine.update(objs, indices, config, on_step=on_step, annotator=annotator,
                                           comments=comments, case=case, extra_metrics=extra, ranked=ranked,
                                           suggestion=shown)
                finally:
                    room.changed(persisted=True)  # the ranking is stored even when the update fails
                ratios = likelihood_ratios(result.get("trace_logratio") or [], indices)
                if ratios is not None:
                    result["ranked_likelihood_ratios"] = ratios
                record = ranking_record(objs, indices, config, before, annotator, comments, engine)
                record["ranked"] = ranked
                record.update(version_after=result["version"], metrics=dict(result))
                if "ranking_id" in result:
                    record["ranking_id"] = result["ranking_id"]
                room.changed(persisted=True)
                emit(FinalEvent(kind="done", result=result, ranking=record))

        yield from stream_from_thread(work)

    def record_ranking(self, traces: list[dict], order: list[str], *, annotator: str, model_key: str,
                       comments: dict[str, str] | None = None, negatives: list[dict] | None = None,
                       suggestion: dict | None = None) -> int:
        """Store a ranking without updating the policy (a second opinion, for the
        agreement view; the same ``negatives`` below the line as the update's, so
        both rank the same group). Returns its id."""
        room = self.room
        annotator = (annotator or "").strip()
        if not annotator:
            raise RankingError("Enter your name before recording a ranking (it is stored with every ranking).")
        objs, indices, ranked = ranked_group(order, traces, negatives)
        engine = room.engine
        with room.lock:
            self.check_model(model_key)
            ranking_id = engine.record_ranking(objs, indices, annotator, comments=comments or {},
                                               case=room.cases.get(objs[0].case_id), ranked=ranked,
                                               suggestion=suggestion_record(suggestion, order))
        room.changed(persisted=True)
        return ranking_id

    def check_model(self, model_key: str) -> None:
        """RankingError when the traces were sampled from another model or workspace."""
        room = self.room
        if model_key != room.model_key():
            raise RankingError("The model or workspace was switched since these traces were generated; generate again.")


    # ------------------------------------------------------------- autopilot
    def autopilot(self, updates: int, algorithm: str = "grpo") -> Iterator[Event]:
        """Train on training-split cases no clinician ranked in this workspace, the reward model
        ranking (verified traces first; ``simulate.play_round``, labelled "autopilot"). Holds
        the lock one round at a time, so other sessions' work interleaves; stops after the
        current round when the iterator is closed (Stop, or the browser going). Yields an
        "update" event per round, then a final "done"."""
        room = self.room
        updates = int(updates)
        if not 1 <= updates <= 200:
            raise ValueError("autopilot runs 1 to 200 updates")
        settings = SimulationSettings(algorithm=algorithm, updates=updates, conclusion=room.conclusion_mode())
        with room.lock:
            reward_model, key = clinicians_reward_model(room.engine, room.advisor), room.model_key()
        ranked = {r["case_id"] for r in room.store.rankings(room.workspace) if r["source"] != MODEL_RANKED}
        todo = [c for c in split_cases(list(room.cases.values()))[0] if c.id not in ranked]
        if not todo:
            raise ValueError("clinicians have ranked every training case in this workspace: nothing for the autopilot")

        def work(emit, cancelled):
            start = room.store.count("rankings", room.workspace)
            for i in range(updates):
                if cancelled():
                    return
                with room.lock:
                    if room.model_key() != key:
                        raise RankingError("the model or workspace was switched: the autopilot stopped")
                    metrics = play_round(room.engine, todo[i % len(todo)], settings, start + i, reward_model)
                room.changed(persisted=True)
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
        room = self.room
        from rlhf_core.evaluate import heldout_comparison

        samples, max_new_tokens = int(samples), int(max_new_tokens)
        if samples < 1 or max_new_tokens < 1:
            raise ValueError("samples per case and max new tokens must be at least 1")
        cases = list(room.cases.values())

        def work(emit, cancelled):
            with room.lock:
                def progress(p):
                    if cancelled():
                        raise Cancelled()
                    emit(Event(kind="progress", **p))

                try:
                    result = heldout_comparison(room.engine, cases, samples=samples, heldout_fraction=heldout_fraction,
                                                max_new_tokens=max_new_tokens, temperature=temperature,
                                                on_progress=progress)
                except Cancelled:
                    return
                result["workspace"] = room.workspace
                room.last_eval = result
                emit(FinalEvent(kind="done", result=result))

        yield from stream_from_thread(work)
