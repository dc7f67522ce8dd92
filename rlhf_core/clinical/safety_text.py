"""Text helpers the safety checker shares between its knowledge table and its reading of a
trace: name keys, the flexible term patterns (spaces, hyphens and slashes interchangeable),
word counts and snippets."""
from __future__ import annotations

import re
from typing import Iterable


_FLEX_CHARS = re.compile(r"[\s\-/]+")


def norm_key(name: str) -> str:
    """Lower case, spaces/hyphens/slashes removed: the identity of a name."""
    return _FLEX_CHARS.sub("", name.strip().lower())


def flex_pattern(term: str) -> str:
    """Regex source for ``term`` with spaces/hyphens/slashes interchangeable and optional.

    Separators are also optional between letters and digits ("PDE5" = "PDE-5").
    """
    parts = re.findall(r"[^\W\d_]+|\d+|[^\w\s\-/]", term.strip())
    return r"[\s\-/]*".join(re.escape(p) for p in parts)


def _is_acronym(term: str) -> bool:
    letters = re.sub(r"[\s\-/0-9]", "", term)
    return bool(letters) and letters.isalpha() and letters.isupper() and len(term) <= 6


def term_regex(terms: Iterable[str], *, acronyms_exact: bool) -> re.Pattern | None:
    """One regex for a list of terms: word-bounded, optional plural.

    With ``acronyms_exact`` a term in capitals ("HIT", "MI") matches only in capitals.
    """
    terms = sorted({t for t in terms if t.strip()}, key=len, reverse=True)
    if not terms:
        return None
    alts = []
    for t in terms:
        src = flex_pattern(t)
        if acronyms_exact and _is_acronym(t):
            alts.append(f"(?-i:{src})")
        else:
            alts.append(src)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?:e?s)?(?!\w)", re.IGNORECASE)


def word_count(text: str) -> int:
    """How many words (runs of ASCII letters and digits) ``text`` holds."""
    return len(re.findall(r"[A-Za-z0-9]+", text))


def snippet(text: str, start: int, end: int, width: int = 200) -> str:
    """The clause text around [start, end), trimmed to about ``width`` characters."""
    s = text[start:end].strip()
    s = re.sub(r"\s+", " ", s)
    if len(s) <= width:
        return s
    return s[: width - 1].rstrip() + "…"
