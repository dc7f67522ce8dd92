"""Traces that reach the right diagnosis without reasoning worth ranking.

The verifier judges the conclusion; this filter judges what comes before it.
A trace is degenerate when it

* gives (almost) no reasoning before its conclusion ("no_reasoning": fewer
  than ``MIN_REASONING_WORDS`` words),
* loops ("repetition": the same five words three times or more, or a text
  made mostly of repeated four-word runs), or
* restates a hint it was given ("restates_hint", rationalised traces only:
  mentions the hint, the teacher, or says what "the correct diagnosis" is).

Pure standard library; one pure function, ``degenerate_reason``.
"""
from __future__ import annotations

import re
from collections import Counter

DEGENERATE_CODES = ("no_reasoning", "repetition", "restates_hint")
MIN_REASONING_WORDS = 15
REPEATED_NGRAM = 5  # words in a run that must not occur REPEATS times
REPEATS = 3
DISTINCT_4GRAMS_MIN = 0.6  # share of distinct four-word runs below which a text loops
MIN_4GRAMS_FOR_RATIO = 30

_WORD_RE = re.compile(r"[A-Za-z0-9']+")
_LABEL_RE = re.compile(r"final\s+(?:diagnosis|answer)", re.I)
_HINT_RE = re.compile(
    r"\b(?:hint|teacher|i\s+(?:was|am|have\s+been)\s+told|the\s+correct\s+(?:diagnosis|answer)\s+is|as\s+(?:given|stated|provided)\s+in\s+the\s+hint)\b",
    re.I,
)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text)]


def reasoning_before_conclusion(text: str, diagnosis: str | None = None) -> str:
    """The text before the conclusion: before the last ``Final diagnosis`` label,
    else before the sentence holding the last mention of ``diagnosis``, else all of it."""
    labels = list(_LABEL_RE.finditer(text))
    if labels:
        return text[: labels[-1].start()]
    if diagnosis:
        at = text.lower().rfind(diagnosis.lower())
        if at >= 0:
            start = max(text.rfind(c, 0, at) for c in ".!?\n") + 1
            return text[:start]
    return text


def _loops(words: list[str]) -> bool:
    runs = Counter(tuple(words[i : i + REPEATED_NGRAM]) for i in range(len(words) - REPEATED_NGRAM + 1))
    if runs and max(runs.values()) >= REPEATS:
        return True
    fours = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(fours) >= MIN_4GRAMS_FOR_RATIO and len(set(fours)) / len(fours) < DISTINCT_4GRAMS_MIN


def degenerate_reason(text: str, diagnosis: str | None = None, hinted: bool = False) -> tuple[str, str] | None:
    """(code, reason) when ``text`` is not reasoning worth ranking, else None.
    ``diagnosis``: the conclusion the verifier read (locates it without a label line);
    ``hinted``: the trace was sampled with the answer as a hint (rationalised)."""
    if hinted and _HINT_RE.search(text or ""):
        return "restates_hint", "restates the hint it was given"
    words = _words(text or "")
    if _loops(words):
        return "repetition", "repeats itself"
    reasoning = _words(reasoning_before_conclusion(text or "", diagnosis))
    if len(reasoning) < MIN_REASONING_WORDS:
        return "no_reasoning", f"only {len(reasoning)} words of reasoning before the conclusion"
    return None
