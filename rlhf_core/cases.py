"""Medical cases: the data model and the loaders for the file formats we accept."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import untrusted


@dataclass
class SafetyInfo:
    """What the safety checker needs to know about the patient in a case."""

    conditions: list[str] = field(default_factory=list)  # e.g. ["asthma", "peptic ulcer"]
    allergies: list[str] = field(default_factory=list)  # e.g. ["penicillin"]
    medications: list[str] = field(default_factory=list)  # current medications, e.g. ["warfarin"]
    pregnant: bool = False  # pregnancy makes teratogenic drugs a hard violation
    emergency: bool = False  # the case is an emergency: omitting its red flags is a violation
    # For emergency cases: things a safe answer must mention; each entry lists
    # accepted alternatives separated by "|", e.g. "emergency|urgent|immediately".
    red_flags: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict | None) -> "SafetyInfo":
        data = data or {}
        return cls(
            conditions=[str(x) for x in data.get("conditions", [])],
            allergies=[str(x) for x in data.get("allergies", [])],
            medications=[str(x) for x in data.get("medications", [])],
            pregnant=bool(data.get("pregnant", False)),
            emergency=bool(data.get("emergency", False)),
            red_flags=[str(x) for x in data.get("red_flags", [])],
        )

    def to_dict(self) -> dict:
        return {
            "conditions": list(self.conditions),
            "allergies": list(self.allergies),
            "medications": list(self.medications),
            "pregnant": self.pregnant,
            "emergency": self.emergency,
            "red_flags": list(self.red_flags),
        }


@dataclass
class Case:
    """One clinical vignette with its correct diagnosis."""

    id: str  # stable identifier, unique within a library
    question: str  # the vignette and the question asked
    answer: str  # the correct diagnosis (for multiple choice: the text of the right option)
    aliases: list[str] = field(default_factory=list)  # other accepted names and abbreviations
    distractors: list[str] = field(default_factory=list)  # plausible wrong diagnoses
    options: list[str] | None = None  # multiple-choice option texts, in letter order A, B, ...
    answer_idx: int | None = None  # index into options of the right one (0-based)
    specialty: str = "general"
    icd10: str | None = None
    difficulty: str = "medium"  # "easy" | "medium" | "hard"
    safety: SafetyInfo = field(default_factory=SafetyInfo)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "aliases": list(self.aliases),
            "distractors": list(self.distractors),
            "options": list(self.options) if self.options else None,
            "answer_idx": self.answer_idx,
            "specialty": self.specialty,
            "icd10": self.icd10,
            "difficulty": self.difficulty,
            "safety": self.safety.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(
            id=str(data["id"]),
            question=str(data["question"]),
            answer=str(data["answer"]),
            aliases=[str(x) for x in data.get("aliases") or []],
            distractors=[str(x) for x in data.get("distractors") or []],
            options=[str(x) for x in data["options"]] if data.get("options") else None,
            answer_idx=data.get("answer_idx"),
            specialty=str(data.get("specialty") or "general"),
            icd10=data.get("icd10"),
            difficulty=str(data.get("difficulty") or "medium"),
            safety=SafetyInfo.from_dict(data.get("safety")),
        )


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------
#
# Accepted files (chosen by extension, then by content):
#
#   .jsonl / .ndjson  one JSON object per line (blank lines are skipped). A file
#                     whose first non-blank character is "[" is read as a JSON array.
#   .json             a JSON array of objects, one object, or JSON lines (the
#                     published MedMCQA "*.json" files are really JSON lines).
#   .csv              a header row, then one case per row.
#
# Every record, whatever the file, goes through the same normaliser, so any of
# these shapes may appear in any of the files:
#
#   ours     id, question, answer, aliases, distractors, options (list or null),
#            answer_idx (0-based int or null), specialty, icd10, difficulty, safety.
#            In CSV: aliases/distractors/options "|"-separated, answer_idx a
#            0-based integer, safety a JSON object written as a string.
#   MedQA    question, options as {"A": text, "B": text, ...}, answer (option
#            text), answer_idx as a letter ("C"), meta_info (ignored).
#   MedMCQA  question, opa, opb, opc, opd, cop, subject_name (-> specialty), id.
#
# Options may also be one string: lettered lines ("A. text", "A) text",
# "(A) text", "A: text"; at least two of them, one being A; kept in letter order),
# or else "|"-separated (lettered pieces "A. x|B. y" too), or else one per line.
# In a lettered string, blank and unlettered ("stray") lines are ignored with a
# CaseFormatWarning naming the file and line. An answer may be the option text,
# the text with its letter ("C. text"), or a bare letter ("C"). answer_idx may be
# a 0-based integer (also as a digit string) or a letter. Whatever came in, a
# multiple-choice Case carries answer == options[answer_idx] with a 0-based index.
#
# MedMCQA "cop" is 1-based (1-4) in the files published with the paper and
# 0-based (0-3) in the Hugging Face copy. The base is decided once per file:
# any cop == 0 makes the file 0-based; otherwise (a cop == 4, or only 1-3 seen)
# it is 1-based (with a CaseFormatWarning when only 1-3 were seen, as that is
# ambiguous). A file with both a 0 and a 4 is rejected. Letters a-d are also
# accepted as cop, independent of the base.
#
# Records without an id get a stable one from the file name stem and the
# position: "<stem>-L<line>" (line of the record's start in JSON / JSONL
# files) or "<stem>-R<row>" (CSV row, the header being row 1).
#
# Every problem raises CaseFormatError naming the file, the line (or CSV row)
# and what is wrong; a file is parsed entirely before anything is returned.

MAX_FILE_BYTES = 20 * 1024 * 1024  # files larger than this are refused before reading
MAX_FIELD_CHARS = 20_000  # longest accepted text in any one field
MAX_CASES = 50_000  # most cases accepted from one file
MAX_OPTIONS = 10  # options a prompt can letter (A-J); more are refused at load

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv")
DIFFICULTIES = ("easy", "medium", "hard")
SAFETY_KEYS = ("conditions", "allergies", "medications", "pregnant", "emergency", "red_flags")
MEDMCQA_OPTION_KEYS = ("opa", "opb", "opc", "opd")


class CaseFormatError(ValueError):
    """A case file could not be loaded. The message names file, line/row and problem."""

    def __init__(self, path: str | os.PathLike, problem: str, line: int | None = None,
                 unit: str = "line"):
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.unit = unit
        where = f"{self.path}: {unit} {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class CaseFormatWarning(UserWarning):
    """Something in a case file was ignored (e.g. a stray line inside an options string)."""


def default_cases_dir() -> Path:
    """The repository's bundled case folder."""
    return Path(__file__).resolve().parents[1] / "cases"


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


class _Ctx:
    """Where we are: file, record position, unit ("line" or "row")."""

    def __init__(self, path: Path, pos: int, unit: str):
        self.path, self.pos, self.unit = path, pos, unit

    def error(self, problem: str) -> CaseFormatError:
        return CaseFormatError(self.path, problem, self.pos, self.unit)

    def warn(self, problem: str) -> None:
        warnings.warn(f"{self.path}: {self.unit} {self.pos}: {problem}", CaseFormatWarning,
                      stacklevel=4)

    @property
    def derived_id(self) -> str:
        return f"{self.path.stem}-{'R' if self.unit == 'row' else 'L'}{self.pos}"


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, name: str, ctx: _Ctx, required: bool = False) -> str | None:
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


def _str_list(value: Any, name: str, ctx: _Ctx, split_pipes: bool = True) -> list[str]:
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


def _bool(value: Any, name: str, ctx: _Ctx) -> bool:
    if _blank(value):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ctx.error(f"{name} must be true or false, got {_preview(value)}")


def _parse_safety(value: Any, ctx: _Ctx) -> SafetyInfo:
    if _blank(value):
        return SafetyInfo()
    if isinstance(value, str):
        try:
            value = untrusted.loads(value)
        except ValueError as exc:
            raise ctx.error(f"safety is {exc}") from None
        trouble = untrusted.problem(value, MAX_FIELD_CHARS)
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


def _parse_options_string(text: str, ctx: _Ctx) -> tuple[list[str], list[str]]:
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


def _parse_options(value: Any, ctx: _Ctx) -> tuple[list[str] | None, list[str]]:
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
    if len(clean) > MAX_OPTIONS:
        raise ctx.error(f"options: {len(clean)} options, more than the {MAX_OPTIONS} (A-J) a prompt can letter")
    return clean, letters


def _letter_index(letter: str, letters: list[str], ctx: _Ctx, what: str) -> int:
    letter = letter.upper()
    if letter not in letters:
        raise ctx.error(f"{what} letter {letter} is not among the options "
                        f"({', '.join(letters)})")
    return letters.index(letter)


def _parse_answer_idx(value: Any, options: list[str], letters: list[str], ctx: _Ctx) -> int | None:
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
                ctx: _Ctx) -> tuple[str, int]:
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


def _check_lengths(case: Case, ctx: _Ctx) -> None:
    fields: list[tuple[str, str | None]] = [
        ("id", case.id), ("question", case.question), ("answer", case.answer),
        ("specialty", case.specialty), ("icd10", case.icd10), ("difficulty", case.difficulty)]
    for name in ("aliases", "distractors"):
        fields += [(name, x) for x in getattr(case, name)]
    fields += [("options", x) for x in case.options or []]
    for name in ("conditions", "allergies", "medications", "red_flags"):
        fields += [(f"safety.{name}", x) for x in getattr(case.safety, name)]
    for name, value in fields:
        if value is not None and len(value) > MAX_FIELD_CHARS:
            raise ctx.error(f"field {name} is {len(value)} characters long "
                            f"(limit MAX_FIELD_CHARS={MAX_FIELD_CHARS})")


# -- one record -> Case ------------------------------------------------------

def _medmcqa_cop(value: Any, ctx: _Ctx) -> int | str | None:
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


def _record_to_case(rec: dict, ctx: _Ctx, cop_base: int) -> Case:
    question = _text(rec.get("question"), "question", ctx, required=True)
    is_medmcqa = any(k in rec for k in MEDMCQA_OPTION_KEYS)
    if is_medmcqa:
        missing = [k for k in MEDMCQA_OPTION_KEYS if k not in rec]
        if missing:
            raise ctx.error(f"MedMCQA record lacks option field(s) {', '.join(missing)}")
        options, letters = _parse_options([rec[k] for k in MEDMCQA_OPTION_KEYS], ctx)
        cop = _medmcqa_cop(rec.get("cop"), ctx)
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


# -- files -> records --------------------------------------------------------

def _count_check(n: int, path: Path, pos: int, unit: str) -> None:
    if n > MAX_CASES:
        raise CaseFormatError(path, f"more than MAX_CASES={MAX_CASES} cases in one file",
                              pos, unit)


def _json_lines(text: str, path: Path) -> list[tuple[int, Any]]:
    records = []
    # split on "\n" only: str.splitlines would also break on U+2028 etc. inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise CaseFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                                  lineno) from None
        except (RecursionError, ValueError) as exc:
            raise CaseFormatError(path, _unusable_json(exc), lineno) from None
        records.append((lineno, obj))
        _count_check(len(records), path, lineno, "line")
    return records


def _json_array(text: str, path: Path) -> list[tuple[int, Any]]:
    """Parse a JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    ws = re.compile(r"\s*")
    records: list[tuple[int, Any]] = []
    # line numbers are counted incrementally: recounting from the start of the text
    # for every element made large arrays quadratic (minutes for a 15 MB file)
    counted = [0, 1]  # position up to which newlines were counted, line number there

    def lineno(i: int) -> int:
        pos, line = counted
        if i < pos:
            return text.count("\n", 0, i) + 1
        line += text.count("\n", pos, i)
        counted[:] = [i, line]
        return line

    def fail(i: int, msg: str) -> CaseFormatError:
        return CaseFormatError(path, f"invalid JSON: {msg}", lineno(i))

    i = ws.match(text, 0).end()
    if text[i:i + 1] != "[":
        raise fail(i, "expected '['")
    i = ws.match(text, i + 1).end()
    if text[i:i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise CaseFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                                      exc.lineno) from None
            except (RecursionError, ValueError) as exc:
                raise CaseFormatError(path, _unusable_json(exc), lineno(i)) from None
            records.append((lineno(i), obj))
            _count_check(len(records), path, lineno(i), "line")
            i = ws.match(text, end).end()
            if text[i:i + 1] == ",":
                i = ws.match(text, i + 1).end()
            elif text[i:i + 1] == "]":
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']' after an array element")
    i = ws.match(text, i).end()
    if i != len(text):
        raise fail(i, "extra data after the array")
    return records


def _json_file(text: str, path: Path) -> list[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array(text, path)
    try:
        whole = json.loads(text, parse_constant=_refuse_constant)
    except (RecursionError, ValueError) as exc:
        # JSON lines in a .json file (e.g. MedMCQA) when the first record sits on one
        # line; otherwise it is one (pretty-printed) document and its own error, with
        # the line where parsing failed, is the useful one.
        first_line = stripped.split("\n", 1)[0].strip()
        if first_line.startswith("{") and first_line.endswith("}"):
            return _json_lines(text, path)
        if not isinstance(exc, json.JSONDecodeError):
            raise CaseFormatError(path, _unusable_json(exc), 1) from None
        raise CaseFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                              exc.lineno) from None
    first = len(text) - len(stripped)
    return [(text.count("\n", 0, first) + 1, whole)]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a usable number")


def _unusable_json(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"unusable JSON: {exc}"


def _csv_file(text: str, path: Path) -> list[tuple[int, Any]]:
    # strict: an unterminated quote is an error instead of silently swallowing the
    # rest of the file into one field (which would drop every later row)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, Any]] = []
    row = 0
    header: list[str] | None = None
    try:
        for fields in reader:
            row += 1
            if header is None:
                header = [untrusted.clean_id(h).lower() for h in fields]
                if not any(header):
                    raise CaseFormatError(path, "the header row is empty", row, "row")
                dupes = sorted({h for h in header if h and header.count(h) > 1})
                if dupes:
                    raise CaseFormatError(path, f"duplicate column(s) {', '.join(dupes)}",
                                          row, "row")
                continue
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(header):
                extra = fields[len(header):]
                if any(f.strip() for f in extra):
                    raise CaseFormatError(
                        path, f"row has {len(fields)} fields but the header has {len(header)}",
                        row, "row")
            rec = {h: (fields[j] if j < len(fields) else "") for j, h in enumerate(header) if h}
            records.append((row, rec))
            _count_check(len(records), path, row, "row")
    except csv.Error as exc:
        raise CaseFormatError(path, f"invalid CSV: {exc}", row + 1, "row") from None
    return records


def _read_text(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise CaseFormatError(path, f"unsupported file extension {ext or '(none)'!r} "
                                    f"(expected one of {', '.join(SUPPORTED_EXTENSIONS)})")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise CaseFormatError(path, f"file is {size} bytes, larger than the limit "
                                    f"MAX_FILE_BYTES={MAX_FILE_BYTES}")
    raw = path.read_bytes()
    try:
        # "utf-8-sig" drops one BOM; an editor that added a second would hide the
        # CSV header's first column ("\ufeffid"), so every leading BOM goes
        text = raw.decode("utf-8-sig").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise CaseFormatError(path, f"not valid UTF-8 text ({exc.reason})", line) from None
    if not text.strip():
        raise CaseFormatError(path, "file is empty")
    return text


def case_from_record(record: Any, path: str | os.PathLike, line: int) -> Case:
    """One record (e.g. the ``case`` of an imported ranking) checked exactly as a case
    file's would be; CaseFormatError names ``path`` and ``line``."""
    path = Path(path)
    if not isinstance(record, dict):
        raise CaseFormatError(path, f"case must be a JSON object, got {type(record).__name__}", line)
    trouble = untrusted.problem(record, MAX_FIELD_CHARS)
    if trouble:
        raise CaseFormatError(path, f"case: {trouble}", line)
    return _record_to_case(record, _Ctx(path, line, "line"), cop_base=0)


def load_cases(path: str | os.PathLike) -> list[Case]:
    """Load every case in one file (our JSONL/JSON/CSV, MedQA or MedMCQA); see above.

    Raises CaseFormatError (naming file, line/row and problem) on the first problem;
    nothing is returned unless the whole file is good.
    """
    return [case for case, _ in _load_with_positions(Path(path))]


def _load_with_positions(path: Path) -> list[tuple[Case, str]]:
    """Cases of one file, each with where it came from ("line 3" / "row 4")."""
    text = _read_text(path)
    ext = path.suffix.lower()
    if ext == ".csv":
        unit, records = "row", _csv_file(text, path)
    elif ext == ".json":
        unit, records = "line", _json_file(text, path)
    elif text.lstrip().startswith("["):
        unit, records = "line", _json_array(text, path)
    else:
        unit, records = "line", _json_lines(text, path)
    if not records:
        raise CaseFormatError(path, "file contains no cases")

    for pos, rec in records:
        if not isinstance(rec, dict):
            raise CaseFormatError(path, f"expected a JSON object, got {type(rec).__name__}",
                                  pos, unit)
        # lengths, depth and numbers before any pattern runs on the text
        trouble = untrusted.problem(rec, MAX_FIELD_CHARS)
        if trouble:
            raise CaseFormatError(path, trouble, pos, unit)

    # MedMCQA's cop base is a property of the file (see the notes at the top).
    zero = one_based = first_int = None
    for pos, rec in records:
        if any(k in rec for k in MEDMCQA_OPTION_KEYS):
            cop = _medmcqa_cop(rec.get("cop"), _Ctx(path, pos, unit))
            if isinstance(cop, int) and first_int is None:
                first_int = pos
            if cop == 0 and zero is None:
                zero = pos
            if cop == 4 and one_based is None:
                one_based = pos
    if zero is not None and one_based is not None:
        raise CaseFormatError(path, f"MedMCQA cop is 0 here and 4 at {unit} {one_based}: "
                                    f"cannot tell whether the file is 0- or 1-based", zero, unit)
    cop_base = 0 if zero is not None else 1
    if first_int is not None and zero is None and one_based is None:
        # only 1-3 seen: read as 1-based like the published files, but say so, since a
        # few rows cut from the 0-based Hugging Face copy look exactly the same
        _Ctx(path, first_int, unit).warn(
            "MedMCQA cop values are all 1-3, so the file is read as 1-based (cop 1 = opa); "
            "if it comes from the 0-based Hugging Face copy, the answers are off by one")

    out: list[tuple[Case, str]] = []
    seen: dict[str, int] = {}
    for pos, rec in records:
        ctx = _Ctx(path, pos, unit)
        case = _record_to_case(rec, ctx, cop_base)
        if case.id in seen:
            raise ctx.error(f"duplicate id {case.id!r} (first at {unit} {seen[case.id]})")
        seen[case.id] = pos
        out.append((case, f"{unit} {pos}"))
    return out


def _case_files(directory: Path) -> list[Path]:
    files = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS:
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def load_library(directory: str | os.PathLike | None = None) -> list[Case]:
    """All *.jsonl / *.json / *.csv files under directory (default: the bundled cases/),
    in sorted path order; ids must be unique across files.

    A relative directory that does not exist from the current working directory is
    looked up from the repository root, so load_library("cases") works from anywhere.
    """
    if directory is None:
        root = default_cases_dir()
    else:
        root = Path(directory)
        if not root.is_absolute() and not root.exists():
            candidate = default_cases_dir().parent / root
            if candidate.exists():
                root = candidate
    if not root.is_dir():
        raise FileNotFoundError(f"case folder not found: {root}")
    cases: list[Case] = []
    seen: dict[str, tuple[Path, str]] = {}
    for path in _case_files(root):
        for case, where in _load_with_positions(path):
            if case.id in seen:
                first_path, first_where = seen[case.id]
                unit, pos = where.split(" ")
                raise CaseFormatError(
                    path, f"duplicate id {case.id!r} (first at {first_path}: {first_where})",
                    int(pos), unit)
            seen[case.id] = (path, where)
            cases.append(case)
    return cases


def save_cases_jsonl(cases: Iterable[Case], path: str | os.PathLike) -> Path:
    """Write cases in our JSONL format (one object per line); round-trips with load_cases."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(c.to_dict(), ensure_ascii=False) for c in cases]
    # mkstemp makes the file private (0600); keep the mode of the file being replaced,
    # else give it the usual 0644 so the saved library stays readable like any other file
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(lines) + ("\n" if lines else ""))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
