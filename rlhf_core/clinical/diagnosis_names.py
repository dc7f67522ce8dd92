"""Diagnosis names: the text basics (dashes, quotes, markdown), normalisation to content
tokens and qualifiers, and the matcher that decides whether a concluded phrase names an accepted
diagnosis (precision first: an extra word that could make it another disease is refused).

Matching rule (a concluded phrase D against an accepted name N)
---------------------------------------------------------------
* Tokens split into *qualifiers* (acute, chronic, left/right(-sided),
  bilateral, primary/secondary, mild/moderate/severe, early/late,
  upper/lower, anterior/inferior/..., community-acquired, type1/type2, ...)
  and *content* (everything else).
* D's content tokens must equal N's content tokens, in order (so
  ``eclampsia`` != ``preeclampsia``, ``hypothyroidism`` != ``hyperthyroidism``,
  ``colitis`` != ``ulcerative colitis``, ``autoimmune hepatitis`` != ``viral
  hepatitis``, ``pulmonary edema`` != ``PE``). Qualifiers are order-free
  (``appendicitis, acute`` == ``acute appendicitis``; ``heart failure,
  right-sided`` == ``right heart failure``).
* Every qualifier of N must be in D (``diabetes mellitus`` is not ``type 1
  diabetes mellitus``; ``ventricular infarction`` is not ``right ventricular
  infarction``). The one relaxation: when an alias of the case is the bare
  content of N or its abbreviation (alias ``MI`` for ``acute myocardial
  infarction``), the bare content (``myocardial infarction``) is accepted too.
* D may add only these qualifiers: acute (unless N is chronic/subacute),
  mild/moderate/severe (unless N grades severity), typical, classic(al),
  community-acquired. Any other extra word (left/right, massive, perforated,
  autoimmune, tension, "with X", "due to X", ...) rejects.
* A whole phrase that equals an accepted name after normalisation is accepted
  before any splitting, so names containing "and" or commas work
  (``hand, foot and mouth disease``); otherwise "or", "vs", "/", "and",
  "with", "due to", "differential", a second comma-separated diagnosis, ...
  mean several diagnoses. ``Anemia, iron deficiency`` (index order) is
  read as ``iron deficiency anemia``.
* Negation: "not X", "no (evidence of) X", "unlikely X", "X is unlikely",
  "X ruled out", "excluded X", "rather than X", "without X", "X (unlikely)"
  negate X; negating the answer rejects ("negated"); negating something else
  ("X, not Y", "X rather than Y") is fine. "X cannot be excluded" / "X is
  also possible" keep X open (rejected).
* Parentheticals: ``X (Y)`` is accepted when X matches and Y is an accepted
  name, a strict abbreviation of X (each of two or more words gives its first
  letter, maybe more of its own letters: ``DKA``, ``AMI``, ``CAP``), only
  qualifiers, a hedge ("most likely", "confirmed", "confidence: high") or an
  ICD code. Anything else in brackets rejects.

"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable


# --------------------------------------------------------------------------- text basics

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d"), "-")
_DASHES.update(dict.fromkeys(map(ord, "\u2014\u2015"), " - "))
_QUOTES = {ord("\u2018"): "'", ord("\u2019"): "'", ord("\u201a"): "'", ord("\u201b"): "'",
           ord("\u201c"): '"', ord("\u201d"): '"', ord("\u201e"): '"', ord("\u00ab"): '"', ord("\u00bb"): '"'}


def basic_text(text: str) -> str:
    """NFKC, straight quotes, plain dashes (em dash -> spaced hyphen)."""
    text = unicodedata.normalize("NFKC", text)
    return text.translate(_DASHES).translate(_QUOTES)


_HTML_EMPH_RE = re.compile(r"</?(?:b|i|em|strong|u)>", re.I)
_MD_EMPH_RE = re.compile(r"[*_`~]+")
_SPACES_RE = re.compile(r"\s+")


def strip_markdown(text: str) -> str:
    """``text`` without markdown emphasis marks (* _ ` ~) or HTML emphasis tags (b, i, em, strong, u)."""
    return _MD_EMPH_RE.sub("", _HTML_EMPH_RE.sub("", text))


def trim_text(text: str) -> str:
    """Trim whitespace, quotes and trailing punctuation; collapse spaces."""
    text = _SPACES_RE.sub(" ", strip_markdown(text)).strip()
    prev = None
    while prev != text:
        prev = text
        text = text.strip(" \t\"'").rstrip(".,;:!").strip()
        if text.startswith("-") and not text[1:2].isalnum():
            text = text[1:].strip()
    return text


_NO_SPLIT_BEFORE_DOT = {"st", "dr", "mr", "mrs", "ms", "vs", "etc", "eg", "e.g", "ie", "i.e", "approx", "no", "sp", "spp", "var", "cf", "fig"}


def first_sentence(text: str) -> str:
    """Text up to the first sentence end; a dot after an initial or an MC letter
    (``C. difficile``, ``Option C. Text``, ``C. Text``) does not end a sentence."""
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        i = m.start()
        if text[i] == "?":
            return text[: i + 1]
        if text[i] == ".":
            before = text[:i]
            w = re.search(r"(\S+)$", before)
            word = w.group(1) if w else ""
            bare = word.strip("()[]").lower()
            if bare in _NO_SPLIT_BEFORE_DOT:
                continue
            if re.fullmatch(r"\(?[A-Za-z]\)?", word):
                head = before[: w.start()].strip().lower()
                after = text[i + 1 :].lstrip()
                if not head or re.search(r"(?:option|choice|answer|letter|:)$", head):
                    continue  # "C. Text", "Option C. Text"
                if after[:1].islower():
                    continue  # "C. difficile"
            if re.search(r"\d$", before) and re.match(r"\d", text[i + 1 :].lstrip()[:1] or "x"):
                continue
        return text[:i]
    return text


# --------------------------------------------------------------------------- normalisation

_ARTICLES = {"a", "an", "the"}
_PREFIXES = {"pre", "post", "non", "anti", "hyper", "hypo", "sub", "peri", "para", "intra", "extra", "pseudo",
             "poly", "neo", "auto", "multi", "inter", "trans", "supra", "infra", "retro", "micro", "macro"}
_QUALIFIERS = {
    "acute", "subacute", "hyperacute", "chronic", "left", "right", "bilateral", "unilateral",
    "primary", "secondary", "tertiary", "severe", "mild", "moderate", "early", "late",
    "upper", "lower", "anterior", "posterior", "inferior", "superior", "lateral", "medial",
    "proximal", "distal", "communityacquired", "hospitalacquired", "nosocomial", "recurrent",
    "typical", "classic", "classical", "uncomplicated", "complicated", "massive", "submassive",
}
# Qualifiers a conclusion may ADD to the answer without changing the disease.
_EXTRA_OK = {"acute", "typical", "classic", "classical", "communityacquired", "mild", "moderate", "severe"}
_CONFLICTS = {
    "acute": {"chronic", "subacute", "hyperacute"},
    "mild": {"moderate", "severe"},
    "moderate": {"mild", "severe"},
    "severe": {"mild", "moderate"},
}
_SPELLING = {"goitre": "goiter", "fibre": "fiber", "centre": "center", "litre": "liter", "sulphate": "sulfate",
             "emboli": "embolism", "embolus": "embolism"}
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "one": "1", "two": "2", "three": "3"}

_LEADINS = [
    r"(?:that\s+)?(?:this|the|our|my)\s+(?:patient|pt|man|woman|child|boy|girl|infant|baby|lady|gentleman)\s+"
    r"(?:most\s+likely\s+|likely\s+|probably\s+|therefore\s+)?(?:has|had|is\s+suffering\s+from|suffers\s+from|"
    r"is\s+presenting\s+with|presents\s+with)\s+",
    r"(?:that\s+)?(?:this|it)\s+(?:is|represents|was|would\s+be)\s+(?:most\s+likely\s+|likely\s+|probably\s+)?",
    r"(?:that\s+)?(?:the\s+)?(?:most\s+likely\s+|likely\s+|final\s+|probable\s+|correct\s+|best\s+)?"
    r"(?:diagnosis|answer)\s+(?:is|would\s+be)\s*:?\s+",
    r"(?:a\s+)?(?:clinical\s+|working\s+|presumptive\s+|provisional\s+)?diagnosis\s+of\s+",
    r"(?:most\s+|more\s+)?(?:consistent\s+with|suggestive\s+of|compatible\s+with|in\s+keeping\s+with|"
    r"indicative\s+of|diagnostic\s+of)\s+",
    r"(?:most\s+likely|more\s+likely|likely|probably|probable|possible|possibly|suspected|presumed|presumptive|"
    r"provisional|definite|definitely|confirmed|clinically|working)\s+",
    r"i\s+(?:conclude|think|believe)\s+(?:that\s+)?",
    r"(?:so|thus|therefore|hence|overall|finally|in\s+conclusion|in\s+summary),?\s+",
    r"(?:is|:)\s+",
]
_LEADIN_RE = re.compile(r"^(?:" + "|".join(_LEADINS) + r")", re.I)
_TRAILERS_RE = re.compile(
    r"(?:(?<!\bless)(?<!\bnot)(?<!\bnor),?\s+(?:(?:is|being|as|remains|seems)\s+)?(?:the\s+)?(?:most\s+likely|more\s+likely|likely|probable|probably|final)"
    r"(?:\s+(?:diagnosis|answer))?(?:\s+here|\s+in\s+this\s+(?:case|patient))?)$",
    re.I,
)


def strip_fillers(text: str) -> str:
    """Drop lead-ins and hedges at the start and 'is most likely' at the end."""
    prev = None
    while prev != text:
        prev = text
        text = _LEADIN_RE.sub("", text).strip()
        text = _TRAILERS_RE.sub("", text).strip()
        text = trim_text(text)
    return text


_GREEK = {"\u03b1": "alpha", "\u03b2": "beta", "\u03b3": "gamma", "\u03b4": "delta", "\u03ba": "kappa"}
_CANON_SUBS = [
    (re.compile(r"['`]"), ""),  # Crohn's -> crohns, Graves' -> graves
    (re.compile(r"\b(left|right)[\s-]*sided\b"), r"\1"),
    (re.compile(r"\b(left|right)[\s-]+side\b"), r"\1"),
    (re.compile(r"\bwith\s+severe\s+features\b"), "severe"),
    (re.compile(r"\bcommunity[\s-]*acquired\b"), "communityacquired"),
    (re.compile(r"\b(?:hospital|healthcare)[\s-]*acquired\b"), "hospitalacquired"),
    (re.compile(r"\btype[\s-]*(\d+|iii|ii|iv|i|v|one|two|three)\b"), lambda m: "type" + _ROMAN.get(m.group(1), m.group(1))),
    (re.compile(r"\b(" + "|".join(sorted(_PREFIXES)) + r")-(?=\w)"), r"\1"),
]


@lru_cache(maxsize=8192)
def _canon_phrases(text: str) -> str:
    """Lower-cased ASCII text with qualifier phrases made single tokens and prefix hyphens joined."""
    s = strip_markdown(basic_text(text)).lower()
    for greek, name in _GREEK.items():
        s = s.replace(greek, f" {name} ")
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))  # Ménière -> meniere
    for pattern, repl in _CANON_SUBS:
        s = pattern.sub(repl, s)
    return s


def _spell(tok: str) -> str:
    tok = _SPELLING.get(tok, tok)
    if not tok.isalpha():
        return tok
    tok = tok.replace("ae", "e").replace("oe", "e")
    if len(tok) >= 6 and tok.endswith("our"):
        tok = tok[:-3] + "or"
    # simple plural -> singular
    if len(tok) > 3:
        if tok.endswith("ies") and len(tok) > 4:
            tok = tok[:-3] + "y"
        elif tok.endswith("sses"):
            tok = tok[:-2]
        elif tok.endswith("s") and not tok.endswith(("ss", "us", "is", "os")):
            tok = tok[:-1]
    return tok


@lru_cache(maxsize=8192)
def name_tokens(text: str) -> tuple[str, ...]:
    """Normalised word tokens of a phrase (no separators kept)."""
    s = _canon_phrases(text)
    raw = [t for t in re.split(r"[^0-9a-z]+", s) if t]
    out: list[str] = []
    i = 0
    while i < len(raw):
        t = raw[i]
        if t in _ARTICLES:
            i += 1
            continue
        if t in _PREFIXES and i + 1 < len(raw):  # "pre eclampsia" -> "preeclampsia"
            raw[i + 1] = t + raw[i + 1]
            i += 1
            continue
        if t == "sided" and out and out[-1] in ("left", "right"):
            i += 1
            continue
        out.append(_spell(t))
        i += 1
    return tuple(out)


_TYPE_RE = re.compile(r"type\d+")


def is_qualifier(tok: str) -> bool:
    """Whether a name token is a qualifier (acute, left, severe, type1, ...) rather than content."""
    return tok in _QUALIFIERS or _TYPE_RE.fullmatch(tok) is not None


@dataclass(frozen=True)
class DiagnosisName:
    """A diagnosis phrase as its content tokens, in order, and its qualifier tokens, sorted."""

    content: tuple[str, ...]
    quals: tuple[str, ...]  # sorted multiset

    @classmethod
    @lru_cache(maxsize=8192)
    def of(cls, text: str) -> "DiagnosisName":
        """The ``DiagnosisName`` of a phrase (cached)."""
        toks = name_tokens(text)
        return cls(tuple(t for t in toks if not is_qualifier(t)), tuple(sorted(t for t in toks if is_qualifier(t))))


def normalise_diagnosis(text: str) -> str:
    """A canonical key for a diagnosis phrase: qualifiers first (sorted), then the
    content words in order; comma pieces that are only qualifiers are folded in.

    ``normalise_diagnosis("Appendicitis, acute") == normalise_diagnosis("the acute appendicitis")``
    ``normalise_diagnosis("Heart failure, right-sided") == normalise_diagnosis("right heart failure")``
    ``normalise_diagnosis("Iron deficiency anaemia") == normalise_diagnosis("iron-deficiency anemias")``
    """
    if not text:
        return ""
    text = strip_fillers(trim_text(basic_text(text)))
    pieces: list[DiagnosisName] = []
    for piece in re.split(r"[,;]", text):
        name = DiagnosisName.of(piece)
        if not name.content and not name.quals:
            continue
        if pieces and not name.content:
            last = pieces[-1]
            pieces[-1] = DiagnosisName(last.content, tuple(sorted(last.quals + name.quals)))
        else:
            pieces.append(name)
    return ", ".join(" ".join(p.quals + p.content) for p in pieces)


# --------------------------------------------------------------------------- matching


def _is_abbrev(abbr: str, words: list[str]) -> bool:
    """Strict abbreviation: every word contributes its first letter (and maybe more
    letters of itself, in order); e.g. DKA, AMI, COPD, STEMI (ST-elevation MI)."""
    abbr = re.sub(r"[^0-9a-z]", "", abbr.lower())
    words = [w for w in words if w]
    if len(abbr) < 2 or len(words) < 2 or len(abbr) < len(words):
        return False

    @lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if j == len(words):
            return i == len(abbr)
        w = words[j]
        if i >= len(abbr) or abbr[i] != w[0]:
            return False
        ii, pos = i + 1, 1
        if go(ii, j + 1):
            return True
        while ii < len(abbr):
            p = w.find(abbr[ii], pos)
            if p < 0:
                break
            ii, pos = ii + 1, p + 1
            if go(ii, j + 1):
                return True
        return False

    return go(0, 0)


def _abbrev_words(text: str, drop_quals: bool = False) -> list[str]:
    """Written words of a name for abbreviation checks (qualifier phrases as one word)."""
    words = [w for w in re.split(r"[^0-9a-z]+", _canon_phrases(text))
             if w and w not in {"of", "and", "the", "a", "an", "with", "to", "in"}]
    if drop_quals:
        words = [w for w in words if not is_qualifier(_spell(w))]
    return words


class NameMatcher:
    """Accepts phrases that name one of ``names`` under the module's matching rule."""

    def __init__(self, names: Iterable[str], infer_bare: bool = True):
        self.texts = [n for n in names if n and n.strip()]
        self.names: set[DiagnosisName] = {DiagnosisName.of(n) for n in self.texts}
        self.names = {n for n in self.names if n.content or n.quals}
        if infer_bare:
            # An alias that is the bare content (or its abbreviation) licenses the bare content.
            bare = set()
            alias_keys = {DiagnosisName.of(t) for t in self.texts}
            for text in self.texts:
                name = DiagnosisName.of(text)
                if not name.quals:
                    continue
                words = _abbrev_words(text, drop_quals=True)
                for alias in self.texts:
                    if DiagnosisName(name.content, ()) in alias_keys or (
                        re.fullmatch(r"[A-Za-z0-9]{2,8}", alias.strip()) and _is_abbrev(alias, words)
                    ):
                        bare.add(DiagnosisName(name.content, ()))
                        break
            self.names |= bare

    def match(self, phrase: str, extra_quals: Iterable[str] = ()) -> bool:
        """Whether ``phrase`` names one of ``names`` under the matching rule; ``extra_quals`` count as its own."""
        d = DiagnosisName.of(phrase)
        if not d.content:
            return False
        dq = Counter(d.quals) + Counter(extra_quals)
        for n in self.names:
            if n.content != d.content:
                continue
            nq = Counter(n.quals)
            if nq - dq:
                continue  # the conclusion lacks a qualifier of the name
            extras = set((dq - nq).keys())
            if not extras <= _EXTRA_OK:
                continue
            if any(_CONFLICTS.get(e, set()) & set(nq) for e in extras):
                continue
            return True
        return False

    def mentioned_in(self, phrase: str) -> bool:
        """Does the phrase contain one of the names (content words, contiguous)?"""
        toks = tuple(t for t in name_tokens(phrase) if not is_qualifier(t))
        for n in self.names:
            k = len(n.content)
            if k and any(toks[i : i + k] == n.content for i in range(len(toks) - k + 1)):
                return True
        return False

    def abbreviates(self, paren: str, written: str) -> bool:
        """Whether ``paren`` is a strict abbreviation of ``written`` or of one of the names as given."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9\-]{1,9}", paren.strip()):
            return False
        if _is_abbrev(paren, _abbrev_words(written)):
            return True
        return any(_is_abbrev(paren, _abbrev_words(t)) for t in self.texts)
