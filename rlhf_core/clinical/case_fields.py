"""One record of a case file -> a ``Case``: every field checked and normalised (texts,
lists, options in any of the accepted shapes, the answer and its index, safety facts), each
problem a ``CaseFormatError`` naming the file and line. The accepted shapes: ``cases``."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from . import case_record, untrusted
from .case_record import (
    DIFFICULTIES, MEDMCQA_OPTION_KEYS, SAFETY_KEYS, Case, CaseFormatError, CaseFormatWarning, SafetyInfo,
)


# -- small helpers -----------------------------------------------------------

# Every pattern here runs on user text, so each is linear: one quantified run per
# stretch of input, none followed by an overlapping one (the old "\s*(.*?)\s*$"
# took quadratic time on a long space run: 20 kB of option text took 1.1 s).
# Callers strip the text first; _Match.text strips the captured rest.
_LETTER_LINE_RE = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.):])(.*)", re.S)
_BARE_LETTER_RE = re.compile(r"\(?([A-Za-z])\)?\s*[.):]?")
_INT_RE = re.compile(r"(-?\d{1,%d})(?:\.0*)?" % untrusted.MAX_INT_DIGITS)


class _Match:
    """The groups of a letter-line match, with the option text stripped."""

    def __init__(self, m: re.Match):
        self._m = m

    def group(self, i: int) -> str | None:
        value = self._m.group(i)
        return value.strip() if i == 3 and value is not None else value


class _Pattern:
    """A pattern matched against the whole of the stripped text (``fullmatch``)."""

    def __init__(self, regex: re.Pattern, wrap: bool = False):
        self._regex, self._wrap = regex, wrap

    def match(self, text: str):
        m = self._regex.fullmatch(text.strip())
        return _Match(m) if (m and self._wrap) else m


_LETTER_LINE = _Pattern(_LETTER_LINE_RE, wrap=True)
_BARE_LETTER = _Pattern(_BARE_LETTER_RE)
_INT = _Pattern(_INT_RE)


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold().rstrip(".").strip()


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"#{i + 1}"


def _preview(value: Any, n: int = 60) -> str:
    text = str(value)
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class FieldContext:
    """Where we are: file, record position, unit ("line" or "row")."""

    def __init__(self, path: Path, pos: int, unit: str):
        self.path, self.pos, self.unit = path, pos, unit

    def error(self, problem: str) -> CaseFormatError:
        """A ``CaseFormatError`` for ``problem`` at this file and position, to raise."""
        return CaseFormatError(self.path, problem, self.pos, self.unit)

    def warn(self, problem: str) -> None:
        """Warn (``CaseFormatWarning``) about ``problem`` at this file and position."""
        warnings.warn(f"{self.path}: {self.unit} {self.pos}: {problem}", CaseFormatWarning,
                      stacklevel=4)

    @property
    def derived_id(self) -> str:
        """The id of a record that has none: the file's stem and its position (``cases-L3``, ``cases-R3``)."""
        return f"{self.path.stem}-{'R' if self.unit == 'row' else 'L'}{self.pos}"


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, name: str, ctx: FieldContext, required: bool = False) -> str | None:
    if _blank(value):
        if required:
            raise ctx.error(f"missing {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.error(f"{name} must be text, got {type(value).__name__}")
    text = untrusted.clean_id(str(value)) if name == "id" else untrusted.clean_text(str(value))
    if not text:
        if required:
            raise ctx.error(f"{name} has no visible text")
        return None
    return text


def _str_list(value: Any, name: str, ctx: FieldContext, split_pipes: bool = True) -> list[str]:
    """A list of strings from a list or (in CSV, or lenient JSON) one string."""
    if _blank(value):
        return []
    if isinstance(value, str):
        parts = value.split("|") if split_pipes else [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ctx.error(f"{name} must be a list of text, got {type(value).__name__}")
    out = []
    for item in parts:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ctx.error(f"{name} must be a list of text, found {type(item).__name__}")
        item = untrusted.clean_text(str(item))
        if item:
            out.append(item)
    return out


def _bool(value: Any, name: str, ctx: FieldContext) -> bool:
    if _blank(value):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ctx.error(f"{name} must be true or false, got {_preview(value)}")


def _parse_safety(value: Any, ctx: FieldContext) -> SafetyInfo:
    if _blank(value):
        return SafetyInfo()
    if isinstance(value, str):
        try:
            value = untrusted.loads(value)
        except ValueError as exc:
            raise ctx.error(f"safety is {exc}") from None
        trouble = untrusted.problem(value, case_record.MAX_FIELD_CHARS)
        if trouble:
            raise ctx.error(f"safety: {trouble}")
    if not isinstance(value, dict):
        raise ctx.error(f"safety must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(SAFETY_KEYS))
    if unknown:
        ctx.warn(f"safety: ignored unknown key(s) {', '.join(map(repr, unknown))} "
                 f"(known: {', '.join(SAFETY_KEYS)})")
    return SafetyInfo(
        # one string is one entry: red flags use "|" inside an entry for alternatives
        conditions=_str_list(value.get("conditions"), "safety.conditions", ctx, split_pipes=False),
        allergies=_str_list(value.get("allergies"), "safety.allergies", ctx, split_pipes=False),
        medications=_str_list(value.get("medications"), "safety.medications", ctx,
                              split_pipes=False),
        pregnant=_bool(value.get("pregnant"), "safety.pregnant", ctx),
        emergency=_bool(value.get("emergency"), "safety.emergency", ctx),
        red_flags=_str_list(value.get("red_flags"), "safety.red_flags", ctx, split_pipes=False),
    )


def _looks_lettered(parts: list[str]) -> bool:
    """Lettered options ("A. x", "B. y", ...): at least two lettered lines, one of them A.

    One lettered-looking line is not enough: plain options such as "E. coli sepsis"
    would otherwise turn a one-per-line list into a lettered one.
    """
    found = []
    for part in parts:
        m = _LETTER_LINE.match(part)
        if m and m.group(3):
            found.append((m.group(1) or m.group(2)).upper())
    return len(found) >= 2 and "A" in found


def _parse_options_string(text: str, ctx: FieldContext) -> tuple[list[str], list[str]]:
    """Options from one string -> (texts, letters)."""
    lines = text.strip().split("\n")
    pieces = text.strip().split("|")
    if _looks_lettered(lines):
        parts: list[str] | None = lines
    elif len(lines) == 1 and _looks_lettered(pieces):  # "A. x|B. y" (e.g. in CSV)
        parts = pieces
    else:
        parts = None
    if parts is not None:
        texts, letters, blank, stray = [], [], 0, []
        for line in parts:
            m = _LETTER_LINE.match(line)
            if not line.strip():
                blank += 1
            elif m and m.group(3):
                letter = (m.group(1) or m.group(2)).upper()
                if letter in letters:
                    raise ctx.error(f"options: letter {letter} appears twice")
                letters.append(letter)
                texts.append(m.group(3))
            else:
                stray.append(line.strip())
        if blank or stray:
            what = []
            if blank:
                what.append(f"{blank} blank line(s)")
            if stray:
                what.append(f"{len(stray)} stray line(s) without an option letter: "
                            + ", ".join(_preview(s, 40) for s in stray))
            ctx.warn("options: ignored " + " and ".join(what))
        # options are kept in letter order (as for a letter->text object)
        order = sorted(range(len(letters)), key=lambda j: letters[j])
        return [texts[j] for j in order], [letters[j] for j in order]
    if "|" in text:
        texts = [t.strip() for t in text.split("|")]
    else:
        texts = [t.strip() for t in lines]
    texts = [t for t in texts if t]
    return texts, [_letter(i) for i in range(len(texts))]


def _parse_options(value: Any, ctx: FieldContext) -> tuple[list[str] | None, list[str]]:
    """Options in any accepted shape -> (texts or None, letters)."""
    if _blank(value) or (isinstance(value, (list, tuple, dict)) and not value):
        return None, []
    if isinstance(value, str):
        texts, letters = _parse_options_string(value, ctx)
    elif isinstance(value, dict):
        keys = []
        for key in value:
            if not (isinstance(key, str) and len(key.strip()) == 1 and key.strip().isalpha()):
                raise ctx.error(f"options: keys must be letters A, B, ..., found {_preview(key)}")
            keys.append(key)
        keys.sort(key=lambda k: k.strip().upper())
        letters = [k.strip().upper() for k in keys]
        if len(set(letters)) != len(letters):
            raise ctx.error("options: the same letter appears twice")
        texts = [value[k] for k in keys]
    elif isinstance(value, (list, tuple)):
        texts = list(value)
        letters = [_letter(i) for i in range(len(texts))]
    else:
        raise ctx.error(f"options must be a list, a letter->text object or a string, "
                        f"got {type(value).__name__}")
    clean = []
    for letter, item in zip(letters, texts):
        if _blank(item) or isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ctx.error(f"options: option {letter} is empty or not text")
        item = untrusted.clean_text(str(item))
        if not item:
            raise ctx.error(f"options: option {letter} has no visible text")
        clean.append(item)
    if len(clean) < 2:
        raise ctx.error(f"options: need at least 2 options, found {len(clean)}")
    if len(clean) > case_record.MAX_OPTIONS:
        raise ctx.error(f"options: {len(clean)} options, more than the {case_record.MAX_OPTIONS} (A-J) a prompt can letter")
    return clean, letters


def _letter_index(letter: str, letters: list[str], ctx: FieldContext, what: str) -> int:
    letter = letter.upper()
    if letter not in letters:
        raise ctx.error(f"{what} letter {letter} is not among the options "
                        f"({', '.join(letters)})")
    return letters.index(letter)


def _parse_answer_idx(value: Any, options: list[str], letters: list[str], ctx: FieldContext) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ctx.error(f"answer_idx must be a 0-based integer or a letter, got {value}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        m = _INT.match(value)
        if m:
            value = int(m.group(1))
        else:
            m = _BARE_LETTER.match(value)
            if not m:
                raise ctx.error(f"answer_idx must be a 0-based integer or a letter, "
                                f"got {_preview(value)}")
            return _letter_index(m.group(1), letters, ctx, "answer_idx")
    if not isinstance(value, int):
        raise ctx.error(f"answer_idx must be a 0-based integer or a letter, "
                        f"got {type(value).__name__}")
    if not 0 <= value < len(options):
        raise ctx.error(f"answer_idx {value} is out of range for {len(options)} options "
                        f"(0-based: 0-{len(options) - 1})")
    return value


def _resolve_mc(answer: str | None, idx: int | None, options: list[str], letters: list[str],
                ctx: FieldContext) -> tuple[str, int]:
    """Reconcile answer text and index for a multiple-choice record."""
    normed = [_norm(o) for o in options]
    if idx is None:
        if answer is None:
            raise ctx.error("missing answer (neither answer nor answer_idx given)")
        if _norm(answer) in normed:
            idx = normed.index(_norm(answer))
        elif _BARE_LETTER.match(answer):
            idx = _letter_index(_BARE_LETTER.match(answer).group(1), letters, ctx, "answer")
        else:
            m = _LETTER_LINE.match(answer)
            if not m:
                raise ctx.error(f"answer {_preview(answer)} matches none of the options")
            idx = _letter_index(m.group(1) or m.group(2), letters, ctx, "answer")
            if _norm(m.group(3)) != normed[idx]:
                raise ctx.error(f"answer {_preview(answer)} does not match option "
                                f"{letters[idx]} {_preview(options[idx])}")
        return options[idx], idx
    if answer is not None and _norm(answer) != normed[idx]:
        bare = _BARE_LETTER.match(answer)
        lettered = _LETTER_LINE.match(answer)
        ok = (bare and bare.group(1).upper() == letters[idx]) or (
            lettered and (lettered.group(1) or lettered.group(2)).upper() == letters[idx]
            and _norm(lettered.group(3)) == normed[idx])
        if not ok:
            raise ctx.error(f"answer {_preview(answer)} does not match option {letters[idx]} "
                            f"{_preview(options[idx])} given by answer_idx")
    return options[idx], idx


def _check_lengths(case: Case, ctx: FieldContext) -> None:
    fields: list[tuple[str, str | None]] = [
        ("id", case.id), ("question", case.question), ("answer", case.answer),
        ("specialty", case.specialty), ("icd10", case.icd10), ("difficulty", case.difficulty)]
    for name in ("aliases", "distractors"):
        fields += [(name, x) for x in getattr(case, name)]
    fields += [("options", x) for x in case.options or []]
    for name in ("conditions", "allergies", "medications", "red_flags"):
        fields += [(f"safety.{name}", x) for x in getattr(case.safety, name)]
    for name, value in fields:
        if value is not None and len(value) > case_record.MAX_FIELD_CHARS:
            raise ctx.error(f"field {name} is {len(value)} characters long "
                            f"(limit MAX_FIELD_CHARS={case_record.MAX_FIELD_CHARS})")


# -- one record -> Case ------------------------------------------------------

def medmcqa_cop(value: Any, ctx: FieldContext) -> int | str | None:
    """cop as read: an int (base not yet applied), a letter, or None."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ctx.error(f"cop must be an integer or a letter a-d, got {value}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _INT.match(value)
        if m:
            return int(m.group(1))
        m = _BARE_LETTER.match(value)
        if m:
            return m.group(1).upper()
    raise ctx.error(f"cop must be an integer or a letter a-d, got {_preview(value)}")


def record_to_case(rec: dict, ctx: FieldContext, cop_base: int) -> Case:
    """One record -> a checked ``Case``; a MedMCQA ``cop`` counts options from ``cop_base`` (0 or 1)."""
    question = _text(rec.get("question"), "question", ctx, required=True)
    is_medmcqa = any(k in rec for k in MEDMCQA_OPTION_KEYS)
    if is_medmcqa:
        missing = [k for k in MEDMCQA_OPTION_KEYS if k not in rec]
        if missing:
            raise ctx.error(f"MedMCQA record lacks option field(s) {', '.join(missing)}")
        options, letters = _parse_options([rec[k] for k in MEDMCQA_OPTION_KEYS], ctx)
        cop = medmcqa_cop(rec.get("cop"), ctx)
        if cop is None:
            idx = None
        elif isinstance(cop, str):
            idx = _letter_index(cop, letters, ctx, "cop")
        else:
            idx = cop - cop_base
            if not 0 <= idx < len(options):
                raise ctx.error(f"cop {cop} is out of range for {len(options)} options "
                                f"(this file's cop is {cop_base}-based)")
        answer = _text(rec.get("answer"), "answer", ctx)
        specialty = rec.get("subject_name") or rec.get("specialty")
    else:
        options, letters = _parse_options(rec.get("options"), ctx)
        answer = _text(rec.get("answer"), "answer", ctx)
        if options is None:
            if answer is None:
                raise ctx.error("missing answer")
            if not _blank(rec.get("answer_idx")):
                raise ctx.error("answer_idx given but the case has no options")
            idx = None
        else:
            idx = _parse_answer_idx(rec.get("answer_idx"), options, letters, ctx)
        specialty = rec.get("specialty")
    if options is not None:
        answer, idx = _resolve_mc(answer, idx, options, letters, ctx)

    difficulty = (_text(rec.get("difficulty"), "difficulty", ctx) or "medium").lower()
    if difficulty not in DIFFICULTIES:
        raise ctx.error(f"difficulty must be one of {', '.join(DIFFICULTIES)}, "
                        f"got {_preview(difficulty)}")
    case = Case(
        id=_text(rec.get("id"), "id", ctx) or ctx.derived_id,
        question=question,
        answer=answer,
        aliases=_str_list(rec.get("aliases"), "aliases", ctx),
        distractors=_str_list(rec.get("distractors"), "distractors", ctx),
        options=options,
        answer_idx=idx,
        specialty=(_text(specialty, "specialty", ctx) or "general").lower(),
        icd10=_text(rec.get("icd10"), "icd10", ctx),
        difficulty=difficulty,
        safety=_parse_safety(rec.get("safety"), ctx),
    )
    _check_lengths(case, ctx)
    return case
