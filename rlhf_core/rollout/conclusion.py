"""The conclusion step: a trace's last line names one of the case's candidate diagnoses.

A small model reasons in free text but rarely writes a diagnosis the verifier
can judge. In the ``constrained`` conclusion mode, once a row writes
``Final diagnosis:`` (or emits its end-of-text token, or spends its reasoning
budget, in which case the label is inserted for it), the model scores every
candidate conclusion (the correct diagnosis and the case's distractors, or the
lettered options, each followed by the end-of-text token) by teacher forcing
after its own reasoning, and one is drawn from those scores normalised over
the candidates (``choose_candidate``). The answer is never forced in and
nothing the model wrote is edited: the model picks among the candidates, and
picks wrongly as often as its probabilities say. By default the rows of a
batch draw with evenly spread codes (``arithmetic_codes``): each row still
concludes with exactly its own probabilities, but a candidate held at 20% is
drawn in about a fifth of the rows rather than, by chance, in none.

Inserted label tokens ("scaffold") are masked out of every loss and log-prob
sum (``Trace.loss_mask``); the log-probs stored for the chosen tokens are the
policy's own, unconstrained (a log-softmax over the whole vocabulary), so DPO
and GRPO see the policy's real probability of the trace.

In the ``free`` mode the model writes its own conclusion; a row stops once its
``Final diagnosis:`` line is complete.

Everything here is plain Python and tensor ops on log-probs: no model.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from ..clinical.cases import Case

CONCLUSION_MODES = ("constrained", "free")
LETTERS = "ABCDEFGHIJ"
SCAFFOLD_TEXT = "Final diagnosis:"
MIN_CANDIDATES = 2  # fewer, and a constrained choice would be the answer forced in

# The model wrote the label itself: "Final diagnosis:", "**Final Diagnosis:**", "Final answer:".
TRIGGER_RE = re.compile(r"final\s+(?:diagnosis|answer)\s*\**\s*[:\uff1a]\s*\**\s*$", re.I)
# A sentence ends here: a full stop, question or exclamation mark (closing quotes or brackets
# after it allowed), then nothing but whitespace.
SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*\s*$")
# ...unless the "sentence" is a list number ("2.") or an abbreviation that rarely ends one
NOT_A_SENTENCE_END_RE = re.compile(r"(?:^|\n)\s*\d+\.\s*$|(?:\b(?:e\.g|i\.e|vs|dr|mr|mrs|ms|st|approx)\.\s*$)", re.I)
# triggers where the label was inserted because the reasoning budget ran out
BUDGET_TRIGGERS = ("budget", "sentence")


def option_line(index: int, text: str) -> str:
    """How a multiple-choice conclusion names an option: ``C. text``."""
    return f"{LETTERS[index]}. {text}"


def candidates(case: Case) -> list[str]:
    """The conclusions a constrained trace may reach, in a fixed order per case.

    Multiple choice: every option as ``"C. text"`` in letter order. Free text:
    the answer and the distractors (duplicates by case-insensitive text
    dropped), shuffled by a hash of the case id so the answer's place is not
    a giveaway when the list is shown in the prompt.
    """
    if case.options:
        return [option_line(i, o) for i, o in enumerate(case.options)]
    seen, names = set(), []
    for name in [case.answer, *case.distractors]:
        key = " ".join(name.lower().split())
        if key and key not in seen:
            seen.add(key)
            names.append(" ".join(name.split()))
    return sorted(names, key=lambda n: hashlib.sha256(f"{case.id}\0{n}".encode()).hexdigest())


def can_constrain(case: Case) -> bool:
    """Whether the case has enough candidates for a constrained conclusion."""
    return len(candidates(case)) >= MIN_CANDIDATES


CANDIDATE_SCORES = ("per_token", "sequence")


def candidate_scores(token_logps: list[list[float]], how: str = "per_token") -> list[float]:
    """One score per candidate from the log-probs of its tokens: their sum (the
    log-probability of the whole conclusion) or their mean (per token, so a long
    name is not penalised for its length; cf. the length-normalised accuracy of
    multiple-choice LM evaluation, Gao et al. 2021, lm-evaluation-harness "acc_norm")."""
    if how not in CANDIDATE_SCORES:
        raise ValueError(f"candidate score must be one of {CANDIDATE_SCORES}, got {how!r}")
    if any(not lps for lps in token_logps):
        raise ValueError("a candidate has no tokens")
    return [sum(lps) / (len(lps) if how == "per_token" else 1) for lps in token_logps]


def candidate_probs(scores: list[float]) -> list[float]:
    """The scores normalised over the candidates (a softmax): what the model believes."""
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


CONCLUSION_DRAWS = ("arithmetic", "independent")


def arithmetic_codes(k: int, generator: torch.Generator | None) -> list[float]:
    """One code in [0, 1) per row of a batch [K]: a random offset plus the lattice j/K
    (arithmetic sampling, Vilnis et al. 2023, https://arxiv.org/abs/2210.15458).

    Each code on its own is uniform, so a row that inverts its candidates' CDF at its
    code (``choose_candidate``) concludes with exactly its own probabilities; together
    the codes are evenly spread, so a candidate the rows hold at probability p is drawn
    in about pK rows, not anywhere from 0 to K as with independent draws."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = generator.device if generator is not None else None
    offset = float(torch.rand(1, generator=generator, dtype=torch.float64, device=device))
    return [(offset + j / k) % 1.0 for j in range(k)]


def choose_candidate(scores: list[float], temperature: float, generator: torch.Generator | None,
                     code: float | None = None) -> int:
    """Draw a candidate index with probability softmax(scores / temperature); the
    argmax at temperature 0. With ``code`` (in [0, 1), from ``arithmetic_codes``) the
    draw is the candidate whose interval of the CDF, in the candidates' order, holds it;
    otherwise an independent draw from ``generator``."""
    if not scores:
        raise ValueError("no candidates to choose from")
    values = torch.tensor(scores, dtype=torch.float64)
    if temperature == 0:
        return int(values.argmax())
    probs = torch.softmax(values / temperature, dim=0)
    if code is None:
        return int(torch.multinomial(probs.float(), 1, generator=generator))
    if not 0 <= code < 1:
        raise ValueError(f"a conclusion code must be in [0, 1), got {code}")
    return min(int(torch.searchsorted(probs.cumsum(0), torch.tensor([code], dtype=torch.float64), right=True)),
               len(scores) - 1)


@dataclass
class RowConclusion:
    """What one row is doing about its conclusion while it decodes."""

    phase: str = "reasoning"  # "reasoning" | "concluding" (waits to be scored) | "done"
    trigger: str | None = None  # "written" | "eos" | "sentence" | "budget" (constrained); "written" (free)
    scaffold: list[int] = field(default_factory=list)  # the label tokens inserted for it, if any
    chosen: int | None = None  # candidate index once chosen
    probs: list[float] | None = None  # the model's probability of each candidate when it concluded
    code: float | None = None  # where in [0, 1) its draw fell (arithmetic draws; None: independent)


def conclusion_record(mode: str, state: RowConclusion | None, names: list[str], how: str | None = None,
                      draw: str | None = None) -> dict:
    """The ``Trace.conclusion`` dict: mode, whether it was constrained, what triggered it."""
    if mode == "free" or state is None or state.chosen is None:
        return {"mode": mode, "constrained": False, "trigger": state.trigger if state else None}
    return {
        "mode": mode,
        "constrained": True,
        "trigger": state.trigger,
        "forced_by_budget": state.trigger in BUDGET_TRIGGERS,
        "scaffold_tokens": len(state.scaffold),
        "candidates": list(names),
        "score": how,
        "draw": draw,
        "code": None if state.code is None else round(state.code, 6),
        "probabilities": [round(p, 6) for p in state.probs],
        "chosen": state.chosen,
        "chosen_text": names[state.chosen],
    }


class Concluder:
    """Decides, step by step, what each row of a decoding batch appends, and when
    it stops.

    Each step the caller passes the tokens sampled for the rows [K];
    ``next_tokens`` returns the token each row appends, or None for a row that
    is no longer decoding, and records rows, loss-mask bits and states.

    * Constrained mode (``constrained=True``): a row stops reasoning when it
      writes the label, samples its end token (which is not appended), starts
      a new sentence after ``sentence_after`` tokens (the token that would
      start it is not appended either; 0: never) or reaches ``budget`` tokens;
      it then waits in phase "concluding" until the caller scores the
      candidates after it and calls ``conclude``.
    * Free mode: a row stops at the end of its ``Final diagnosis:`` line
      (finish "conclusion"), at its end token ("eos") or at the budget ("length").

    ``decode(ids) -> str`` turns token ids into text (the tokenizer's decode);
    ``scaffold_ids(after_newline)`` gives the tokens of the inserted label,
    with or without a leading newline.
    """

    TAIL_TOKENS = 24  # tokens decoded to look for the label at the end of a row

    def __init__(
        self, k: int, budget: int, eos_ids: list[int], decode, constrained: bool = False,
        scaffold_ids=None, stop_rules: bool = True, sentence_after: int = 0,
    ) -> None:
        if constrained and scaffold_ids is None:
            raise ValueError("the constrained mode needs the label's tokens")
        self.k, self.budget, self.eos = k, budget, set(eos_ids)
        self.decode, self.scaffold_ids, self.constrained = decode, scaffold_ids, constrained
        self.stop_rules = stop_rules  # False: decode exactly ``budget`` tokens per row (benchmarks)
        # so the label follows a finished sentence instead of cutting one at the hard budget
        self.sentence_after = sentence_after if constrained and stop_rules else 0
        self.rows: list[list[int]] = [[] for _ in range(k)]
        self.masks: list[list[int]] = [[] for _ in range(k)]
        self.states = [RowConclusion() for _ in range(k)]
        self.finish = ["length"] * k
        self._free_label_at: list[int | None] = [None] * k  # free mode: row length when the label was written

    def decoding(self, i: int) -> bool:
        """Whether row ``i`` is still reasoning (appending sampled tokens)."""
        return self.states[i].phase == "reasoning"

    def all_stopped(self) -> bool:
        """True when no row is still reasoning."""
        return not any(self.decoding(i) for i in range(self.k))

    def concluding(self) -> list[int]:
        """Rows waiting for their candidates to be scored."""
        return [i for i in range(self.k) if self.states[i].phase == "concluding"]

    def without_early_end(self, logits: torch.Tensor, min_tokens: int) -> torch.Tensor:
        """``logits`` [K, V] with the end tokens ruled out for rows that have reasoned
        for fewer than ``min_tokens`` tokens (a copy; the input is left as it is)."""
        early = [i for i in range(self.k) if self.decoding(i) and len(self.rows[i]) < min_tokens]
        if not early or not self.eos or not self.stop_rules:
            return logits
        out = logits.clone()
        rows = torch.tensor(early, device=logits.device)
        out[rows[:, None], torch.tensor(sorted(self.eos), device=logits.device)[None, :]] = float("-inf")
        return out

    def next_tokens(self, sampled: list[int]) -> list[int | None]:
        """The token each row appends for its ``sampled`` one [K]; None for a row no longer decoding
        or one that stops here to conclude."""
        return [self._reasoning_token(i, sampled[i]) if self.decoding(i) else None for i in range(self.k)]

    def conclude(self, i: int, chosen: int, candidate: list[int], probs: list[float],
                 code: float | None = None) -> list[int]:
        """Append the label (if inserted, masked out) and the chosen candidate's tokens
        to row ``i``; returns the tokens appended."""
        state = self.states[i]
        self.rows[i] += state.scaffold + candidate
        self.masks[i] += [0] * len(state.scaffold) + [1] * len(candidate)
        state.chosen, state.probs, state.code = chosen, list(probs), code
        state.phase, self.finish[i] = "done", "conclusion"
        return state.scaffold + candidate

    def _stop_to_conclude(self, i: int, trigger: str) -> None:
        state = self.states[i]
        state.trigger, state.phase = trigger, "concluding"
        if trigger != "written":
            text = self.decode(self.rows[i][-self.TAIL_TOKENS :]) if self.rows[i] else "\n"
            state.scaffold = list(self.scaffold_ids(text.endswith("\n") or not text.strip()))

    def _reasoning_token(self, i: int, sampled: int) -> int | None:
        state = self.states[i]
        if self.stop_rules and sampled in self.eos:
            if self.constrained:  # the model would stop without a conclusion: the label goes in its place
                self._stop_to_conclude(i, "eos")
                return None
            state.phase, self.finish[i] = "done", "eos"
            return self._append(i, sampled)
        if self.sentence_after and len(self.rows[i]) >= self.sentence_after and self._starts_a_sentence(i, sampled):
            self._stop_to_conclude(i, "sentence")
            return None
        self._append(i, sampled)
        if self.stop_rules:
            self._after_reasoning_token(i)
        if state.phase == "reasoning" and len(self.rows[i]) >= self.budget:
            if self.constrained and self.stop_rules:
                self._stop_to_conclude(i, "budget")
            else:
                state.phase, self.finish[i] = "done", "length"
        return sampled

    def _starts_a_sentence(self, i: int, token: int) -> bool:
        """Whether ``token`` would begin a new sentence of row ``i``: it starts with whitespace
        and the row's text ends a sentence."""
        if not self.decode([token])[:1].isspace():
            return False
        tail = self.decode(self.rows[i][-self.TAIL_TOKENS :])
        return bool(SENTENCE_END_RE.search(tail)) and not NOT_A_SENTENCE_END_RE.search(tail)

    def _append(self, i: int, token: int) -> int:
        self.rows[i].append(token)
        self.masks[i].append(1)
        return token

    def _after_reasoning_token(self, i: int) -> None:
        state = self.states[i]
        row = self.rows[i]
        if self._free_label_at[i] is not None:  # free mode: stop at the end of the label's line
            line = self.decode(row[self._free_label_at[i] :])
            if "\n" in line and line.split("\n", 1)[0].strip():
                state.phase, self.finish[i] = "done", "conclusion"
            return
        if TRIGGER_RE.search(self.decode(row[-self.TAIL_TOKENS :])):
            state.trigger = "written"
            if self.constrained:
                self._stop_to_conclude(i, "written")
            else:
                self._free_label_at[i] = len(row)
