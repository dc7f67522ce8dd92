"""Case files -> records with their positions: JSON lines, JSON arrays and objects, CSV;
size and count limits checked before and while parsing, never after."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from . import case_record, untrusted
from .case_record import SUPPORTED_EXTENSIONS, CaseFormatError


# -- files -> records --------------------------------------------------------

def _count_check(n: int, path: Path, pos: int, unit: str) -> None:
    if n > case_record.MAX_CASES:
        raise CaseFormatError(path, f"more than MAX_CASES={case_record.MAX_CASES} cases in one file",
                              pos, unit)


def json_lines_records(text: str, path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line of a JSON lines text."""
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


def json_array_records(text: str, path: Path) -> list[tuple[int, Any]]:
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


def json_file_records(text: str, path: Path) -> list[tuple[int, Any]]:
    """(line number, object) records of a ``.json`` text: an array's elements, JSON lines, or one document."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json_array_records(text, path)
    try:
        whole = json.loads(text, parse_constant=_refuse_constant)
    except (RecursionError, ValueError) as exc:
        # JSON lines in a .json file (e.g. MedMCQA) when the first record sits on one
        # line; otherwise it is one (pretty-printed) document and its own error, with
        # the line where parsing failed, is the useful one.
        first_line = stripped.split("\n", 1)[0].strip()
        if first_line.startswith("{") and first_line.endswith("}"):
            return json_lines_records(text, path)
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


def csv_records(text: str, path: Path) -> list[tuple[int, Any]]:
    """(row number, {column: text}) for every non-blank row after the header (columns cleaned, lower case)."""
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


def read_case_text(path: Path) -> str:
    """The text of a case file, refused unless its extension is supported, it fits ``MAX_FILE_BYTES``,
    it is UTF-8 (leading BOMs dropped) and it is not empty."""
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise CaseFormatError(path, f"unsupported file extension {ext or '(none)'!r} "
                                    f"(expected one of {', '.join(SUPPORTED_EXTENSIONS)})")
    size = os.path.getsize(path)
    if size > case_record.MAX_FILE_BYTES:
        raise CaseFormatError(path, f"file is {size} bytes, larger than the limit "
                                    f"MAX_FILE_BYTES={case_record.MAX_FILE_BYTES}")
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
