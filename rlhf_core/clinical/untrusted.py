"""Checks for values parsed from files a user uploaded: one pass, before any other parsing.

Everything a case or import file holds is walked once, iteratively (no
recursion, so no ``RecursionError``), and refused with a plain sentence when it
cannot be used safely further on: nesting deeper than ``MAX_DEPTH``, text longer
than the field limit (checked *before* any regular expression runs on it),
non-finite numbers (``NaN``, ``Infinity``, ``1e400``), integers too long to be a
rank or a version, and lone surrogates (which crash UTF-8 encoding in the store
and the tokenizer). ``clean_text`` and ``clean_id`` normalise what passes.
"""
from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

MAX_DEPTH = 8  # our formats nest at most 4 deep (a ranking > traces > trace > verdict)
MAX_INT_DIGITS = 18  # fits int64: ranks, versions, indices


def loads(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` and turns every parser failure
    (deep nesting, an integer of thousands of digits) into ``ValueError``."""

    def constant(name: str):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"not usable JSON ({err})") from None


def problem(value: Any, max_chars: int, limit_name: str = "MAX_FIELD_CHARS",
            max_depth: int = MAX_DEPTH) -> str | None:
    """What makes ``value`` (parsed JSON, or a CSV row) unusable, or None.

    The first problem found, naming the field (list items by their list), e.g.
    "field options is 80000 characters long (limit MAX_FIELD_CHARS=20000)".
    Iterative: safe on any depth Python parsed.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        label = where or "the record"
        if depth > max_depth:
            return f"{label}: nested deeper than {max_depth} levels"
        if isinstance(item, str):
            if len(item) > max_chars:
                return f"field {where or '(top level)'} is {len(item)} characters long (limit {limit_name}={max_chars})"
            if _has_surrogate(item):
                return f"{label}: text holds an invalid character (a lone UTF-16 surrogate)"
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{label}: {item} is not a finite number"
        elif isinstance(item, int):
            if abs(item) >= 10 ** MAX_INT_DIGITS:
                return f"{label}: integer with more than {MAX_INT_DIGITS} digits"
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str) and (len(key) > 200 or _has_surrogate(key)):
                    return f"{label}: unusable key {key[:40]!r}"
                stack.append((sub, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                stack.append((sub, where, depth + 1))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invisible(ch: str) -> bool:
    # Cf: zero-width space/joiners, bidi controls, BOM, soft hyphen; Cc: control
    # characters other than the whitespace str.split already handles
    return unicodedata.category(ch) == "Cf" or (unicodedata.category(ch) == "Cc" and not ch.isspace())


def clean_text(text: str) -> str:
    """NFC, with control characters removed; format characters are kept (they carry
    meaning in some scripts) but a text made only of them counts as empty."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if not (unicodedata.category(ch) == "Cc" and not ch.isspace()))
    return "" if all(_invisible(ch) or ch.isspace() for ch in text) else text.strip()


def clean_id(text: str) -> str:
    """An identifier as compared: NFC, no zero-width, bidi or control characters, no
    surrounding space; "caf\\u0065\\u0301" and "caf\\u00e9" are the same id."""
    text = unicodedata.normalize("NFC", text)
    return "".join(ch for ch in text if not _invisible(ch)).strip()
