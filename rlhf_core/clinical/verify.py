"""The verifier: did a reasoning trace conclude the case's diagnosis?

Pure standard library (``re``, ``unicodedata``). The rule everywhere is
*precision first*: a wrong diagnosis must never be accepted, so anything
ambiguous (hedged, several diagnoses, a negation of the answer, an extra word
that could turn the answer into a different disease) is rejected.


Where a trace concludes and how its conclusion is read: ``conclusion_reading``; when a
concluded phrase names a diagnosis: ``diagnosis_names``.

Multiple choice
---------------
The option letter (``C``, ``(C)``, ``C.``, ``Option C``, ``Answer: C``,
``C) text``, ``C. text``, ``text (C)``) or the option text count; a phrase
that is exactly an option's text is read as text first (``C. difficile
colitis``). Letter and text must agree. A wrong letter or a wrong option's
text is a "distractor"; two letters, or a letter and a text that disagree, is
"multiple_diagnoses".
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .cases import Case
from .conclusion_reading import (
    HEDGE_RE, LABEL_RE, NEG_ANY_RE, analyse_conclusion, clean_line, extract_conclusion, extract_labelled,
    negation_split, sentence_conclusion, split_pieces,
)
from .diagnosis_names import DiagnosisName, NameMatcher, basic_text, first_sentence, normalise_diagnosis, strip_fillers, strip_markdown, trim_text

__all__ = ["Verdict", "check_trace", "normalise_diagnosis", "extract_conclusion", "CODES"]

CODES = ("accepted", "no_conclusion", "wrong_diagnosis", "distractor", "multiple_diagnoses", "negated", "empty")


@dataclass(frozen=True)
class Verdict:
    """The verifier's decision on one trace."""

    accepted: bool
    diagnosis: str | None  # what the trace concluded, as written (trimmed); None when nothing
    reason: str  # short, human readable, shown in the UI
    code: str  # one of CODES

    def to_dict(self) -> dict:
        """The verdict as a JSON-ready dict."""
        return asdict(self)


# --------------------------------------------------------------------------- multiple choice

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MC_MULTI_RE = re.compile(
    r"^(?:(?:options?|choices?|answers?)\s*[:\-]?\s*)?\(?([A-Z])\)?\s*(?:,|/|\bor\b|\band\b|\bvs\.?|\bversus\b|&|\+)\s*"
    r"(?:(?:option|choice)\s*)?\(?([A-Z])\)?(?=$|[\s.):,])"
)
_MC_PATTERNS = [
    re.compile(r"^(?:the\s+)?(?:correct\s+|best\s+|final\s+)?(?:option|choice|answer|letter)\s*(?:is\s*)?[:#\-]?\s*"
               r"\(?([a-z])\)?(?![\w])\s*[.):\-]?\s*(?P<rest>.*)$", re.I),
    re.compile(r"^\(([a-z])\)\s*[.:\-]?\s*(?P<rest>.*)$", re.I),
    re.compile(r"^([A-Z])\s*(?:[.):]|\s-\s)\s*(?P<rest>.*)$"),
    re.compile(r"^([A-Z])(?P<rest>)$", re.I),
]
_MC_TRAILING_RE = re.compile(r"^(?P<rest>.*?)\s*[\(\[]\s*(?:option\s+|choice\s+)?([A-Z])\s*[\)\]]$")


def _mc_letter(concl: str, n: int) -> tuple[list[int], str] | None:
    """Option indices named by letter, and the rest of the text; None if no letter."""
    s = trim_text(concl)
    m = _MC_MULTI_RE.match(s)
    if m and all(_LETTERS.index(g) < n for g in m.groups()) and m.group(1) != m.group(2):
        return [_LETTERS.index(m.group(1)), _LETTERS.index(m.group(2))], ""
    for pat in _MC_PATTERNS:
        m = pat.match(s)
        if m:
            idx = _LETTERS.find(m.group(1).upper())
            if 0 <= idx < n:
                rest = trim_text(m.group("rest"))
                if rest.startswith("(") and rest.endswith(")"):
                    rest = trim_text(rest[1:-1])
                m2 = re.match(r"^(?:or|and|/|,|vs\.?|versus|&)\s*\(?([A-Z])\)?(?=$|[\s.):,])", rest)
                if m2 and _LETTERS.find(m2.group(1)) < n:
                    return [idx, _LETTERS.index(m2.group(1))], ""
                return [idx], rest
    m = _MC_TRAILING_RE.match(s)
    if m:
        idx = _LETTERS.find(m.group(2))
        if 0 <= idx < n:
            return [idx], trim_text(m.group("rest"))
    return None


def _answer_index(case: Case) -> int | None:
    if case.answer_idx is not None and 0 <= case.answer_idx < len(case.options or []):
        return case.answer_idx
    target = DiagnosisName.of(case.answer)
    for i, opt in enumerate(case.options or []):
        if DiagnosisName.of(opt) == target:
            return i
    return None


# --------------------------------------------------------------------------- the verdict


def _verdict(code: str, dx: str | None, detail: str = "") -> Verdict:
    shown = f"'{dx}'" if dx is not None else ""
    if code == "accepted":
        reason = f"concluded {shown} = answer"
    elif code == "distractor":
        reason = f"concluded {shown}, a distractor"
    elif code == "wrong_diagnosis":
        reason = f"concluded {shown}, which is not the answer"
    elif code == "multiple_diagnoses":
        reason = f"names several diagnoses: {shown}"
    elif code == "negated":
        reason = f"negated the answer: {shown}"
    elif code == "empty":
        reason = "empty trace"
    else:
        reason = "no 'Final diagnosis:' line or concluding sentence" if dx is None else f"no clear conclusion: {shown}"
    if detail:
        reason += f" ({detail})"
    return Verdict(code == "accepted", dx, reason, code)


class _Judge:
    """The matchers of one case, and the decision on one conclusion phrase."""

    def __init__(self, case: Case):
        accept_names = [case.answer, *case.aliases]
        distract_names = list(case.distractors)
        self.options = list(case.options or [])
        self.ans_idx = _answer_index(case) if self.options else None
        if self.options:
            if self.ans_idx is not None:
                accept_names.append(self.options[self.ans_idx])
            distract_names += [o for i, o in enumerate(self.options) if i != self.ans_idx]
        self.accept = NameMatcher(accept_names)
        self.distract = NameMatcher(distract_names, infer_bare=False)
        self.option_matchers = [NameMatcher([o], infer_bare=False) for o in self.options]

    def __call__(self, concl: str) -> tuple[str, str]:
        """(code, detail) for one conclusion phrase."""
        if not self.options:
            a = analyse_conclusion(concl, self.accept, self.distract)
            return a.code, a.detail
        # Multiple choice: the whole phrase may be an option's text (e.g. "C. difficile colitis").
        whole = strip_fillers(trim_text(basic_text(concl)))
        if not any(m.match(whole) for m in self.option_matchers):
            letters = _mc_letter(whole, len(self.options))
            if letters is not None:
                return self._lettered(*letters)
        a = analyse_conclusion(concl, self.accept, self.distract)
        return a.code, a.detail

    def _lettered(self, idxs: list[int], rest: str) -> tuple[str, str]:
        if len(idxs) > 1:
            return "multiple_diagnoses", "two options"
        idx = idxs[0]
        letter = _LETTERS[idx]
        if not rest:
            if idx == self.ans_idx:
                return "accepted", f"option {letter}"
            return "distractor", f"option {letter} is '{self.options[idx]}'"
        a = analyse_conclusion(rest, self.accept, self.distract)
        named = [i for i, m in enumerate(self.option_matchers) if m.match(strip_fillers(rest))]
        if idx == self.ans_idx:
            if a.code == "accepted":
                return "accepted", f"option {letter}"
            if named and named[0] != idx:
                return "multiple_diagnoses", f"letter {letter} but the text is option {_LETTERS[named[0]]}"
            return a.code, f"the text does not match option {letter}"
        if a.code == "accepted":
            return "multiple_diagnoses", f"letter {letter} disagrees with the text"
        return "distractor", f"option {letter} is '{self.options[idx]}'"


_RETRACT_RE = re.compile(
    r"\b(?:actually|on\s+second\s+thoughts?|correction|scratch\s+that|i\s+mean|wait|revised?|revising|"
    r"reconsider\w*|change\s+my|changing\s+my|i\s+was\s+wrong)\b",
    re.I,
)


_OPEN_TAIL_RE = re.compile(
    r"\b(?:alternatively|alternative\s+diagnos\w+|differential|other\s+possibilit\w+|also\s+possible|"
    r"(?:cannot|can't|not)\s+be\s+(?:excluded|ruled\s+out)|remains?\s+(?:a\s+)?possib\w*)\b",
    re.I,
)


# After a conclusion, sentences that take it back: "this is not X", "X is the least
# likely diagnosis", "X can be ruled out", "I no longer think it is X".
_PRONOUN_NEG_RE = re.compile(
    r"\b(?:this|it|that|the\s+(?:diagnosis|answer|cause))\s+(?:is|was|would\s+be|seems|appears)\s+"
    r"(?:not|unlikely\s+to\s+be)\b(?P<x>.*)$|\b(?:this|it|that)\s+(?:isn't|wasn't)\b(?P<y>.*)$",
    re.I,
)
_SUBJECT_NEG_RE = re.compile(
    r"^(?P<subj>.*?)\s+(?:is|was|remains|seems|appears)\s+(?:now\s+|therefore\s+|thus\s+|also\s+|actually\s+)?(?:the\s+)?"
    r"(?:least\s+likely|less\s+likely|unlikely|not\s+likely|improbable|doubtful|not\s+the\s+(?:[a-z]+\s+)?(?:diagnosis|answer|cause))\b"
    r"|^(?P<subj2>.*?)\s+(?:can|could|may|has|have|is|was)\s+(?:be\s+|been\s+)?(?:safely\s+|now\s+)?(?:ruled\s+out|excluded)\b",
    re.I,
)
_DOUBT_RE = re.compile(r"\b(?:no\s+longer\s+(?:think|believe)|do\s+not\s+(?:think|believe)|don't\s+(?:think|believe)|doubt)\b", re.I)
_LATER_LABEL_RE = re.compile(r"\bfinal\s+(?:diagnosis|answer)\s*(?:is|[:\-=])\s*(?P<x>[^\n]+)", re.I)
_FILLER_TARGET_RE = re.compile(r"^(?:the\s+|a\s+|an\s+)?(?:(?:right|correct|final|likely|most\s+likely)\s+)?(?:diagnosis|answer|cause|case|it|one)?$", re.I)


def _takes_back(tail: str, judge: "_Judge") -> str | None:
    """The piece of ``tail`` that negates the concluded answer, or None."""
    for sentence in re.split(r"(?<=[.!?])\s+|\n+|\.{3}|\u2026", tail):
        for piece in split_pieces(strip_markdown(sentence)):
            piece = trim_text(piece)
            m = _PRONOUN_NEG_RE.search(piece)
            if m:
                target = trim_text(m.group("x") if m.group("x") is not None else m.group("y") or "")
                if _FILLER_TARGET_RE.match(target) or judge.accept.mentioned_in(target):
                    return piece
            m = _SUBJECT_NEG_RE.match(piece)
            if m and judge.accept.mentioned_in(m.group("subj") or m.group("subj2") or ""):
                return piece
            if _DOUBT_RE.search(piece) and (judge.accept.mentioned_in(piece) or re.search(r"\b(?:it|this)\b", piece, re.I)):
                return piece
            _, negated = negation_split(piece)
            if any(n and judge.accept.mentioned_in(n) for n in negated):
                return piece
    return None


def _label_rest(line: str) -> str | None:
    """The text after a Final diagnosis / Diagnosis / Answer label on ``line``, if any."""
    m = LABEL_RE.match(clean_line(line))
    if not m or not m.group("sep") or not m.group("rest").strip():
        return None
    if not m.group("label").lower().startswith("final") and m.group("sep")[0].isalpha():
        return None
    return m.group("rest")


def _concluding_sentences(text: str) -> list[str]:
    """The phrase of every clear concluding sentence in ``text`` (``sentence_conclusion``), last first."""
    phrases = []
    while (sent := sentence_conclusion(text)) is not None:
        phrases.append(sent[1])
        text = text[: sent[0]]
    return phrases


def _later_disagreement(tail: str, tier: int, judge: _Judge) -> tuple[str, str] | None:
    """(code, why) when the text after an accepted conclusion undoes it, else None.

    * The rest of the conclusion's own line must not hedge ("... or torsion",
      "torsion cannot be excluded") or negate the answer.
    * The trace must not take it back afterwards ("actually, ...", "wait").
    * No later Diagnosis/Answer line or concluding sentence may conclude
      something else.
    * After a mere concluding sentence (no label line), no later sentence may
      raise a distractor (unless it negates it) or keep the differential open.
    """
    if not tail.strip():
        return None
    same_line = tail.split("\n", 1)[0]
    if same_line.strip():
        raises = judge.distract.mentioned_in(same_line) and not NEG_ANY_RE.search(same_line)
        if HEDGE_RE.search(same_line) or _OPEN_TAIL_RE.search(same_line) or raises:
            return "multiple_diagnoses", f"then adds '{trim_text(same_line)[:60]}'"
        if NEG_ANY_RE.search(same_line) and judge.accept.mentioned_in(same_line):
            return "negated", f"then adds '{trim_text(same_line)[:60]}'"
    if _RETRACT_RE.search(tail):
        return "multiple_diagnoses", "takes it back afterwards"
    undone = _takes_back(tail, judge)
    if undone:
        return "negated", f"then says '{undone[:60]}'"
    later: list[str] = []
    for line in tail.splitlines():
        rest = _label_rest(line)
        if rest is not None:
            later.append(trim_text(first_sentence(strip_markdown(rest))))
    for m in _LATER_LABEL_RE.finditer(strip_markdown(tail)):  # also mid-line
        later.append(trim_text(first_sentence(m.group("x"))))
    later += _concluding_sentences(tail)
    for phrase in later:
        if phrase and judge(phrase)[0] != "accepted":
            return "multiple_diagnoses", f"later concludes '{phrase}'"
    if tier == 3:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", tail):
            if _OPEN_TAIL_RE.search(sentence) or (
                judge.distract.mentioned_in(sentence) and not NEG_ANY_RE.search(sentence)
            ):
                return "multiple_diagnoses", f"then raises '{trim_text(sentence)[:60]}'"
    return None


def check_trace(text: str, case: Case) -> Verdict:
    """Did ``text`` conclude ``case``'s diagnosis? See the module docstring for the rules."""
    if text is None or not str(text).strip():
        return _verdict("empty", None)
    found = extract_labelled(str(text))
    if found is None:
        return _verdict("no_conclusion", None)
    concl, tail, tier = found
    judge = _Judge(case)
    code, detail = judge(concl)
    if code == "accepted":
        later = _later_disagreement(tail, tier, judge)
        if later:
            return _verdict(later[0], concl, later[1])
    return _verdict(code, concl, detail)


def earlier_disagreement(text: str, case: Case) -> str | None:
    """The concluding sentence of the reasoning that named another of the case's
    candidates (a distractor or a wrong option), or None.

    Meant for an accepted trace: its conclusion is the last word and stands, but
    "the most likely diagnosis is Y. ... Final diagnosis: X" did not reason to X,
    and the clinician ranking it should see that. Only sentences that clearly
    conclude (``sentence_conclusion``; "if", "initially", "consider" ... excluded)
    and name a candidate count: a hedged or unreadable sentence is not a
    disagreement. Returns the earliest such phrase.
    """
    if text is None or not str(text).strip():
        return None
    judge = _Judge(case)
    phrases = _concluding_sentences(strip_markdown(basic_text(str(text))))
    named_another = [p for p in phrases if judge(p)[0] == "distractor"]
    return named_another[-1] if named_another else None  # last first: the earliest is at the end
