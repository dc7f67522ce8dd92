"""Generation backends: where the control room's traces come from.

A backend is a callable ``generate(engine, case, config, hint)`` returning an
iterator of ``GenerationUpdate`` whose last item carries the finished
``Trace`` objects -- the same contract as ``Engine.generate_batch``, with the
engine passed in so a backend can reach the loaded policy (``engine.lm``) and
its version. ``ControlRoom(generate_fn=...)`` plugs one in; verification,
safety checks, rejection sampling, ranking and updates are unchanged.

* ``engine_backend`` (the default) samples from the policy being trained.
* ``ScriptedBackend`` returns texts you choose, tokenised and scored by the
  loaded policy and reference, so every trace carries real ``completion_ids``
  and log-probs and an update on it is a real computation. It drives the tests
  and demos on ``tiny-random`` (whose own samples are random bytes and never
  pass the verifier). A llama.cpp sampler would plug in at the same seam.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from rlhf_core.clinical.cases import Case
from rlhf_core.rollout.generation import GenerationUpdate, SamplingConfig, build_traces, eos_token_ids
from rlhf_core.rollout.teacher import score_completions
from rlhf_core.rollout.prompts import build_messages, encode_prompt

GenerateFn = Callable[[object, Case, SamplingConfig, "str | None"], Iterator[GenerationUpdate]]


def engine_backend(engine, case: Case, config: SamplingConfig, hint: str | None = None) -> Iterator[GenerationUpdate]:
    """Sample from the live policy (``Engine.generate_batch``)."""
    return engine.generate_batch(case, config, hint=hint)


def default_script(case: Case, hint: str | None) -> list[str]:
    """Plausible traces for any case: three reach the answer, one does not (each
    with enough reasoning before its conclusion to pass the degenerate filter)."""
    wrong = case.distractors[0] if case.distractors else "viral syndrome"
    return [
        "Key findings: the history, the examination and the tests all point to one unifying process that "
        f"explains every abnormal result.\nFinal diagnosis: {case.answer}",
        f"Key features fit {case.answer} closely; the alternatives in the differential explain less of the "
        f"picture and leave findings unexplained.\nFinal diagnosis: {case.answer}",
        f"Considering the differential, {wrong} is less likely than the leading option because it does not "
        f"account for the key findings here.\nFinal diagnosis: {case.answer}",
        f"The presentation, taken as a whole, is most typical of {wrong}, which would also explain the timing "
        f"and the examination findings.\nFinal diagnosis: {wrong}",
    ]


class ScriptedBackend:
    """Traces with chosen texts and real token ids / log-probs.

    ``script(case, hint) -> list[str]`` gives the texts; they are handed out in
    a cycle, so successive batches continue where the last one stopped.
    ``delay`` seconds pass between streamed chunks (to watch streaming). Rows
    finish in order, a share of them per chunk (``GenerationUpdate.complete``),
    and a caller that sends True gets the finished rows only, as from the model.
    """

    def __init__(self, script: Callable[[Case, str | None], list[str]] = default_script, delay: float = 0.0, chunks: int = 4):
        self.script = script
        self.delay = delay
        self.chunks = max(1, chunks)
        self._next: dict[tuple[str, bool], int] = {}  # (case id, hinted) -> where the next batch starts

    def _texts(self, case: Case, hint: str | None, k: int) -> list[str]:
        texts = self.script(case, hint)
        if not texts:
            raise ValueError(f"the script has no texts for case {case.id!r}")
        start = self._next.get((case.id, bool(hint)), 0)
        return [texts[(start + i) % len(texts)] for i in range(k)]

    def __call__(self, engine, case: Case, config: SamplingConfig, hint: str | None = None) -> Iterator[GenerationUpdate]:
        lm = engine.lm
        tok = lm.tokenizer
        texts = self._texts(case, hint, config.k)
        k = len(texts)
        for n in range(1, self.chunks):  # growing prefixes, like token streaming
            if self.delay:
                time.sleep(self.delay)
            done = [i < k * n // self.chunks for i in range(k)]
            shown = [t if d else t[: len(t) * n // self.chunks] for t, d in zip(texts, done)]
            if (yield GenerationUpdate(shown, [False] * k, n, complete=done)):
                texts = [t for t, d in zip(texts, done) if d]
                break
        key = (case.id, bool(hint))
        self._next[key] = self._next.get(key, 0) + len(texts)
        prompt = encode_prompt(tok, build_messages(case))
        eos = eos_token_ids(lm)[:1]
        rows = [list(tok.encode(t, add_special_tokens=False)) + eos for t in texts]
        old, ref, features = score_completions(lm, prompt, rows, features=config.reward_features)
        traces = build_traces(lm, case, prompt, rows, old, ref, engine.version, bool(hint), config, eos, features=features)
        yield GenerationUpdate([t.text for t in traces], [True] * len(traces), self.chunks, traces=traces,
                               complete=[True] * len(traces))
