"""Medical cases: the data model (``case_record``) and the loaders for the file formats we accept.

The loaders read a file into records (``case_files``), turn each record into a ``Case``
(``case_fields``), and return nothing unless the whole file is good.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

from . import case_record, untrusted
from .case_fields import FieldContext, medmcqa_cop, record_to_case
from .case_files import csv_records, json_array_records, json_file_records, json_lines_records, read_case_text
from .case_record import (
    DIFFICULTIES, MAX_OPTIONS, MEDMCQA_OPTION_KEYS, SAFETY_KEYS, SUPPORTED_EXTENSIONS, Case, CaseFormatError,
    CaseFormatWarning, SafetyInfo, default_cases_dir,
)

__all__ = [
    "Case", "SafetyInfo", "CaseFormatError", "CaseFormatWarning", "DIFFICULTIES", "MAX_OPTIONS", "MEDMCQA_OPTION_KEYS",
    "SAFETY_KEYS", "SUPPORTED_EXTENSIONS", "default_cases_dir", "case_from_record", "load_cases", "load_library",
    "save_cases_jsonl",
]

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


def case_from_record(record: Any, path: str | os.PathLike, line: int) -> Case:
    """One record (e.g. the ``case`` of an imported ranking) checked exactly as a case
    file's would be; CaseFormatError names ``path`` and ``line``."""
    path = Path(path)
    if not isinstance(record, dict):
        raise CaseFormatError(path, f"case must be a JSON object, got {type(record).__name__}", line)
    trouble = untrusted.problem(record, case_record.MAX_FIELD_CHARS)
    if trouble:
        raise CaseFormatError(path, f"case: {trouble}", line)
    return record_to_case(record, FieldContext(path, line, "line"), cop_base=0)


def load_cases(path: str | os.PathLike) -> list[Case]:
    """Load every case in one file (our JSONL/JSON/CSV, MedQA or MedMCQA); see above.

    Raises CaseFormatError (naming file, line/row and problem) on the first problem;
    nothing is returned unless the whole file is good.
    """
    return [case for case, _ in _load_with_positions(Path(path))]


def _load_with_positions(path: Path) -> list[tuple[Case, str]]:
    """Cases of one file, each with where it came from ("line 3" / "row 4")."""
    text = read_case_text(path)
    ext = path.suffix.lower()
    if ext == ".csv":
        unit, records = "row", csv_records(text, path)
    elif ext == ".json":
        unit, records = "line", json_file_records(text, path)
    elif text.lstrip().startswith("["):
        unit, records = "line", json_array_records(text, path)
    else:
        unit, records = "line", json_lines_records(text, path)
    if not records:
        raise CaseFormatError(path, "file contains no cases")

    for pos, rec in records:
        if not isinstance(rec, dict):
            raise CaseFormatError(path, f"expected a JSON object, got {type(rec).__name__}",
                                  pos, unit)
        # lengths, depth and numbers before any pattern runs on the text
        trouble = untrusted.problem(rec, case_record.MAX_FIELD_CHARS)
        if trouble:
            raise CaseFormatError(path, trouble, pos, unit)

    # MedMCQA's cop base is a property of the file (see the notes at the top).
    zero = one_based = first_int = None
    for pos, rec in records:
        if any(k in rec for k in MEDMCQA_OPTION_KEYS):
            cop = medmcqa_cop(rec.get("cop"), FieldContext(path, pos, unit))
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
        FieldContext(path, first_int, unit).warn(
            "MedMCQA cop values are all 1-3, so the file is read as 1-based (cop 1 = opa); "
            "if it comes from the 0-based Hugging Face copy, the answers are off by one")

    out: list[tuple[Case, str]] = []
    seen: dict[str, int] = {}
    for pos, rec in records:
        ctx = FieldContext(path, pos, unit)
        case = record_to_case(rec, ctx, cop_base)
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
