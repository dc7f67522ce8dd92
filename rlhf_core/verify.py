"""The verifier: did a reasoning trace conclude the case's diagnosis?

Pure standard library (``re``, ``unicodedata``). The rule everywhere is
*precision first*: a wrong diagnosis must never be accepted, so anything
ambiguous (hedged, several diagnoses, a negation of the answer, an extra word
that could turn the answer into a different disease) is rejected.

How a trace is read
-------------------
1. The conclusion is the LAST ``Final diagnosis:`` (or ``Final answer:``) line,
   markdown tolerated (``**Final diagnosis:** X``, ``**Final Diagnosis**: X``,
   ``## Final diagnosis - X``, ``- Final diagnosis: *X*.``, ``Final diagnosis
   (most likely): X``). A bare ``Final diagnosis`` header takes the next
   non-empty line (a bulleted list of several items there is "several
   diagnoses"). Failing that, the last ``Diagnosis:`` / ``Answer:`` /
   ``Conclusion:`` line; failing that, the last clear concluding sentence
   ("the most likely diagnosis is X", "X is the most likely diagnosis",
   "this is most consistent with X", "the patient most likely has X",
   "consistent with a diagnosis of X", "I conclude that ... X", "the answer is
   X"). Questions and sentences that hedge or negate before the phrase ("if
   the diagnosis is X", "I don't think the diagnosis is X") do not count.
   Mentions of the answer anywhere else in the reasoning never count.
2. Only the first sentence of the conclusion is the diagnosis; lead-ins ("the
   patient has", "this is") and hedges ("most likely", "probable", "suspected",
   "presumed", "possible", "consistent with") at its start are stripped; a
   trailing explanation ("given ...", "based on ...", "because ...", "which
   ...") is cut off unless it hedges ("... or torsion") or negates.
3. What follows can still undo an accepted conclusion (code
   "multiple_diagnoses", or "negated"): the rest of the same line hedging or
   raising a distractor ("X. Torsion is also possible."), a take-back anywhere
   after it ("actually", "wait", "on second thought"), or a later
   ``Diagnosis:``/``Answer:`` line or concluding sentence naming something
   else. After a mere concluding sentence (no label line), a later sentence
   raising a distractor without negating it also rejects.
4. The phrase is compared with the answer and its aliases as normalised
   tokens: NFKC, lower case, punctuation and markdown gone, articles dropped,
   British -> American spelling (ae/oe -> e, -our -> -or, goitre), simple
   plurals, possessives (``Crohn's`` == ``Crohn``), prefixes joined
   (``pre-eclampsia`` == ``preeclampsia``; ``non-Hodgkin`` stays different from
   ``Hodgkin``), ``type I``/``type-1`` -> ``type1``, ``with severe features``
   -> ``severe``. Abbreviations are whole tokens (``MI``, ``PE``, ``DKA``).

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
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable

from .cases import Case

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
        return asdict(self)


# --------------------------------------------------------------------------- text basics

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d"), "-")
_DASHES.update(dict.fromkeys(map(ord, "\u2014\u2015"), " - "))
_QUOTES = {ord("\u2018"): "'", ord("\u2019"): "'", ord("\u201a"): "'", ord("\u201b"): "'",
           ord("\u201c"): '"', ord("\u201d"): '"', ord("\u201e"): '"', ord("\u00ab"): '"', ord("\u00bb"): '"'}


def _basic(text: str) -> str:
    """NFKC, straight quotes, plain dashes (em dash -> spaced hyphen)."""
    text = unicodedata.normalize("NFKC", text)
    return text.translate(_DASHES).translate(_QUOTES)


_HTML_EMPH_RE = re.compile(r"</?(?:b|i|em|strong|u)>", re.I)
_MD_EMPH_RE = re.compile(r"[*_`~]+")
_SPACES_RE = re.compile(r"\s+")


def _strip_markdown(text: str) -> str:
    return _MD_EMPH_RE.sub("", _HTML_EMPH_RE.sub("", text))


def _trim(text: str) -> str:
    """Trim whitespace, quotes and trailing punctuation; collapse spaces."""
    text = _SPACES_RE.sub(" ", _strip_markdown(text)).strip()
    prev = None
    while prev != text:
        prev = text
        text = text.strip(" \t\"'").rstrip(".,;:!").strip()
        if text.startswith("-") and not text[1:2].isalnum():
            text = text[1:].strip()
    return text


_NO_SPLIT_BEFORE_DOT = {"st", "dr", "mr", "mrs", "ms", "vs", "etc", "eg", "e.g", "ie", "i.e", "approx", "no", "sp", "spp", "var", "cf", "fig"}


def _first_sentence(text: str) -> str:
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


def _strip_fillers(text: str) -> str:
    """Drop lead-ins and hedges at the start and 'is most likely' at the end."""
    prev = None
    while prev != text:
        prev = text
        text = _LEADIN_RE.sub("", text).strip()
        text = _TRAILERS_RE.sub("", text).strip()
        text = _trim(text)
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
    s = _strip_markdown(_basic(text)).lower()
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
def _tokens(text: str) -> tuple[str, ...]:
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


def _is_qual(tok: str) -> bool:
    return tok in _QUALIFIERS or _TYPE_RE.fullmatch(tok) is not None


@dataclass(frozen=True)
class _Name:
    content: tuple[str, ...]
    quals: tuple[str, ...]  # sorted multiset

    @classmethod
    @lru_cache(maxsize=8192)
    def of(cls, text: str) -> "_Name":
        toks = _tokens(text)
        return cls(tuple(t for t in toks if not _is_qual(t)), tuple(sorted(t for t in toks if _is_qual(t))))


def normalise_diagnosis(text: str) -> str:
    """A canonical key for a diagnosis phrase: qualifiers first (sorted), then the
    content words in order; comma pieces that are only qualifiers are folded in.

    ``normalise_diagnosis("Appendicitis, acute") == normalise_diagnosis("the acute appendicitis")``
    ``normalise_diagnosis("Heart failure, right-sided") == normalise_diagnosis("right heart failure")``
    ``normalise_diagnosis("Iron deficiency anaemia") == normalise_diagnosis("iron-deficiency anemias")``
    """
    if not text:
        return ""
    text = _strip_fillers(_trim(_basic(text)))
    pieces: list[_Name] = []
    for piece in re.split(r"[,;]", text):
        name = _Name.of(piece)
        if not name.content and not name.quals:
            continue
        if pieces and not name.content:
            last = pieces[-1]
            pieces[-1] = _Name(last.content, tuple(sorted(last.quals + name.quals)))
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
        words = [w for w in words if not _is_qual(_spell(w))]
    return words


class _Matcher:
    """Accepts phrases that name one of ``names`` under the module's matching rule."""

    def __init__(self, names: Iterable[str], infer_bare: bool = True):
        self.texts = [n for n in names if n and n.strip()]
        self.names: set[_Name] = {_Name.of(n) for n in self.texts}
        self.names = {n for n in self.names if n.content or n.quals}
        if infer_bare:
            # An alias that is the bare content (or its abbreviation) licenses the bare content.
            bare = set()
            alias_keys = {_Name.of(t) for t in self.texts}
            for text in self.texts:
                name = _Name.of(text)
                if not name.quals:
                    continue
                words = _abbrev_words(text, drop_quals=True)
                for alias in self.texts:
                    if _Name(name.content, ()) in alias_keys or (
                        re.fullmatch(r"[A-Za-z0-9]{2,8}", alias.strip()) and _is_abbrev(alias, words)
                    ):
                        bare.add(_Name(name.content, ()))
                        break
            self.names |= bare

    def match(self, phrase: str, extra_quals: Iterable[str] = ()) -> bool:
        d = _Name.of(phrase)
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
        toks = tuple(t for t in _tokens(phrase) if not _is_qual(t))
        for n in self.names:
            k = len(n.content)
            if k and any(toks[i : i + k] == n.content for i in range(len(toks) - k + 1)):
                return True
        return False

    def abbreviates(self, paren: str, written: str) -> bool:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9\-]{1,9}", paren.strip()):
            return False
        if _is_abbrev(paren, _abbrev_words(written)):
            return True
        return any(_is_abbrev(paren, _abbrev_words(t)) for t in self.texts)


# --------------------------------------------------------------------------- conclusion extraction

_LINE_PREFIX_RE = re.compile(r"^(?:\s*(?:>+|#+|[-+\u2022\u25cf\u25aa]|\d{1,2}[.)])\s+)*\s*")
_LABEL_RE = re.compile(
    r"^(?:(?:so|thus|therefore|hence|overall|finally|in\s+conclusion|in\s+summary|to\s+summari[sz]e|my|our|the)\b[,:]?\s*)*"
    r"(?P<label>final\s+(?:diagnosis|answer|dx|impression)"
    r"|(?:(?:most\s+likely|working|likely|probable|definitive|clinical|leading)\s+)?(?:diagnosis|dx|impression|answer|conclusion))"
    r"\s*(?:\((?P<paren>[^()]{0,40})\))?\s*(?P<sep>:|=|-(?![A-Za-z0-9])|\bis\b|\bwas\b|\bwould\s+be\b)?\s*(?P<rest>.*)$",
    re.I,
)
_BULLET_RE = re.compile(r"^\s*(?:[-+*\u2022]|\d{1,2}[.)]|\(?[a-z][.)])\s+", re.I)

_SENTENCE_PATTERNS = [
    # "the most likely diagnosis is X", "the diagnosis is X", "the answer is X"
    re.compile(
        r"\b(?:(?:the|our|my)\s+(?:(?:most\s+likely|likely|probable|final|correct|best|working|definitive|leading|unifying|overall)\s+)?"
        r"|(?:most\s+likely|likely|probable|final|correct|best|working|definitive|leading|unifying)\s+)"
        r"(?<!differential )(?<!no )(?:diagnosis|answer)\s+"
        r"(?:here\s+|(?:in|for)\s+(?:this|the|our)\s+(?:[a-z-]+\s+){1,2}?|for\s+(?:him|her|them)\s+)?"
        r"(?:is|would\s+be|remains)\s*:?\s+(?=(?P<x>[^\n]*))",
        re.I,
    ),
    # "the diagnosis that best explains these findings is X"
    re.compile(
        r"\bthe\s+diagnosis\s+that\s+best\s+(?:explains|fits|accounts\s+for)\s+[^.!?\n]{0,60}?\s+is\s+(?=(?P<x>[^\n]*))",
        re.I,
    ),
    # "putting it together, this is X", "in summary, the patient has X"
    re.compile(
        r"\b(?:putting\s+it\s+(?:all\s+)?together|taken\s+together|in\s+summary|in\s+conclusion|overall|therefore|thus)\s*,?\s+"
        r"(?:this\s+is|it\s+is|the\s+(?:patient|pt|man|woman|child|boy|girl|infant)\s+has)\s+"
        r"(?:most\s+likely\s+|likely\s+|probably\s+)?(?=(?P<x>[^\n]*))",
        re.I,
    ),
    # "these findings point to X as the diagnosis"
    re.compile(
        r"\bpoints?\s+to\s+(?=(?P<x>[^.!?\n]{1,120}?)\s+as\s+the\s+(?:most\s+likely\s+|likely\s+)?diagnosis\b)",
        re.I,
    ),
    re.compile(r"\bmost\s+consistent\s+with\s+(?=(?P<x>[^\n]*))", re.I),
    re.compile(r"\bconsistent\s+with\s+a\s+diagnosis\s+of\s+(?=(?P<x>[^\n]*))", re.I),
    re.compile(
        r"\b(?:the|this|our)\s+(?:patient|pt|man|woman|child|boy|girl|infant)\s+(?:most\s+)?(?:likely|probably)\s+has\s+(?=(?P<x>[^\n]*))",
        re.I,
    ),
    re.compile(r"\bI\s+conclude\s+(?:that\s+)?(?=(?P<x>[^\n]*))", re.I),
    # "X is the most likely diagnosis"
    re.compile(
        r"(?:^|(?<=[.!?\n]))[ \t]*(?P<x>[^.!?\n]{1,160}?)\s+(?:is|was|remains)\s+(?:therefore\s+|thus\s+|clearly\s+)?"
        r"(?:the|our|my)\s+(?:(?:most\s+likely|likely|final|probable|leading|best|unifying|correct)\s+)(?:diagnosis|answer)\b",
        re.I,
    ),
]
# A concluding phrase preceded by one of these in its sentence is not a conclusion
# ("if the diagnosis is X", "I don't think the diagnosis is X", "at first I assumed ...").
_HYPOTHETICAL_RE = re.compile(
    r"\b(?:if|whether|unless|should|could|might|would\s+need|cannot|before|not|no|never|doubt\w*|unlikely|unsure|"
    r"uncertain|unclear|wrong|incorrect|mistaken|assum\w*|suppos\w*|initially|earlier|previously|thought|"
    r"hypothes\w*|question\w*|consider\w*|rule\s+out|exclude)\b|n't\b",
    re.I,
)


def _clean_line(line: str) -> str:
    return _LINE_PREFIX_RE.sub("", _strip_markdown(line)).strip()


def _sentence_conclusion(text: str) -> tuple[int, str, int] | None:
    """(start, phrase, end) of the last clear concluding sentence in ``text``."""
    best: tuple[int, str, int] | None = None
    for pat in _SENTENCE_PATTERNS:
        backward = pat is _SENTENCE_PATTERNS[-1]
        for m in pat.finditer(text):
            start = m.start("x") if backward else m.start()
            sent_start = max(text.rfind(c, 0, start) for c in ".!?\n") + 1
            x = m.group("x")
            if not backward:
                x = _first_sentence(x)
                if _HYPOTHETICAL_RE.search(text[sent_start : m.start()]):
                    continue
                end = m.start("x") + len(x)
                if text[end : end + 1] == "?":
                    continue
            else:
                end = m.end()
                if _HYPOTHETICAL_RE.search(x) or text[end : end + 1] == "?":
                    continue
                # drop a leading "Given the RLQ pain, " clause
                x = re.sub(r"^\s*(?:given|based\s+on|considering|in\s+light\s+of|with)\b[^,]*,\s*", "", x, flags=re.I)
            x = _trim(x)
            if x and (best is None or m.start() >= best[0]):
                best = (m.start(), x, end)
    return best


def _extract(text: str) -> tuple[str, str, int] | None:
    """(conclusion, the text after it, tier) -- tier 1: a Final diagnosis/answer
    line, 2: a Diagnosis/Answer/Conclusion line, 3: a concluding sentence."""
    if not text or not text.strip():
        return None
    text = _basic(text)
    lines = text.splitlines()
    found: dict[int, tuple[str, str]] = {}
    for i, line in enumerate(lines):
        clean = _clean_line(line)
        m = _LABEL_RE.match(clean)
        if not m:
            continue
        rest = m.group("rest").strip()
        if rest and not m.group("sep"):
            continue
        tier = 1 if m.group("label").lower().startswith("final") else 2
        if tier == 2 and m.group("sep") and m.group("sep")[0].isalpha():
            continue  # "The diagnosis is X" is a sentence (tier 3), not a label line
        after_idx = i + 1
        if not rest:
            # bare header: the next non-empty line (a list of several items -> all of them)
            block: list[str] = []
            for j in range(i + 1, len(lines)):
                nxt = lines[j]
                if not nxt.strip():
                    if block:
                        break
                    continue
                lm = _LABEL_RE.match(_clean_line(nxt))
                if lm and lm.group("sep"):
                    break
                block.append(nxt)
                after_idx = j + 1
                if not _BULLET_RE.match(_strip_markdown(nxt)):
                    break
            if not block:
                continue
            if len(block) > 1 and all(_BULLET_RE.match(_strip_markdown(b)) for b in block):
                rest = "; ".join(_clean_line(_BULLET_RE.sub("", _strip_markdown(b))) for b in block)
            else:
                rest = _clean_line(block[0])
        body = _strip_markdown(rest).strip()
        first = _first_sentence(body)
        tail = "\n".join([body[len(first) :].lstrip(" .!")] + lines[after_idx:])
        inner = _sentence_conclusion(first)
        concl = _trim(inner[1] if inner else first)
        if concl:
            found[tier] = (concl, tail)
    for tier in (1, 2):
        if tier in found:
            return found[tier][0], found[tier][1], tier
    plain = _strip_markdown(text)
    sent = _sentence_conclusion(plain)
    if sent is None:
        return None
    return sent[1], plain[sent[2] :].lstrip(" .!"), 3


def extract_conclusion(text: str) -> str | None:
    """The diagnosis a trace concluded, as written (trimmed), or None.

    The last ``Final diagnosis:`` line wins; then the last ``Diagnosis:`` /
    ``Answer:`` / ``Conclusion:`` line; then the last concluding sentence.
    """
    found = _extract(text)
    return found[0] if found else None


# --------------------------------------------------------------------------- analysing one conclusion

_FWD_START_RE = re.compile(
    r"^(?:not|no|none|neither|nor|never|without|unlikely(?:\s+to\s+be)?|excluded|excluding|exclude|"
    r"ruled\s+out|rule\s+out|r/o|rather\s+than|instead\s+of|as\s+opposed\s+to|absence\s+of|negative\s+for|"
    r"free\s+of|cannot\s+be|can't\s+be|cannot|can't|isn't|is\s+not|less\s+likely|doubtful|improbable|against)\b\s*",
    re.I,
)
_COPULA = r"(?:is|are|was|were|has\s+been|have\s+been|had\s+been|been|being|seems|appears|looks|remains)"
_BWD_RE = re.compile(
    r"^(?P<subj>.*?)\s*(?:\b" + _COPULA + r"\s+)?(?:\b(?:therefore|thus|now|also)\s+)?"
    r"(?P<cue>(?<=\s)not\b|\bisn't\b|\bwasn't\b|\bunlikely\b|\bexcluded\b|\bruled\s+out\b|\bless\s+likely\b|\bnot\s+likely\b|"
    r"\bdoubtful\b|\bimprobable\b|\bcannot\s+be\s+(?:excluded|ruled\s+out)\b|\bcan't\s+be\s+(?:excluded|ruled\s+out)\b|"
    r"\bnot\s+supported\b|\bunsupported\b)(?P<after>.*)$",
    re.I,
)
_MID_FWD_RE = re.compile(
    r"\b(?:but\s+not|and\s+not|not|no|without|rather\s+than|instead\s+of|as\s+opposed\s+to|excluding|"
    r"and\s+no|with\s+no)\b",
    re.I,
)
_NEG_ANY_RE = re.compile(
    r"\b(?:not|no|none|neither|nor|never|without|unlikely|excluded?|excluding|ruled?\s+out|r/o|rather\s+than|"
    r"instead\s+of|as\s+opposed\s+to|absence\s+of|negative\s+for|free\s+of|cannot|can't|isn't|wasn't|"
    r"less\s+likely|doubtful|improbable)\b",
    re.I,
)
_MULTI_RE = re.compile(
    r"\b(?:or|vs|versus|either|and|plus|with|differential|ddx|dd|includes?|including|alternatively|overlap|"
    r"complicated\s+by|associated\s+with|secondary\s+to|due\s+to|caused\s+by|in\s+the\s+setting\s+of|"
    r"superimposed|followed\s+by|v)\b|[/&+<>]",
    re.I,
)
_EXPLAIN_RE = re.compile(
    r"\s*,?\s*\b(?:given|based\s+on|because|since|as\s+evidenced\s+by|evidenced\s+by|supported\s+by|confirmed\s+by|"
    r"as\s+shown\s+by|as\s+indicated\s+by|in\s+view\s+of|in\s+light\s+of|on\s+the\s+basis\s+of|which|"
    r"presenting\s+with|explaining|explains|that\s+explains|accounting\s+for)\b",
    re.I,
)
_HEDGE_RE = re.compile(r"\b(?:or|vs|versus|either|alternatively|possibly|differential|ddx|otherwise)\b|/", re.I)
_FILLER_PAREN_RE = re.compile(
    r"^(?:(?:most\s+|more\s+)?likely|probable|probably|possible|confirmed|suspected|presumed|presumptive|definite|"
    r"provisional|clinical(?:\s+diagnosis)?|working\s+diagnosis|final(?:\s+diagnosis)?|diagnosis|classic(?:al)?|"
    r"typical|see\s+above|as\s+above|.*\bconfiden\w*.*|\d{1,3}\s*%.*|high|low|moderate\s+confidence|icd.*|[a-z]\d{2}(?:\.\d{1,4})?)$",
    re.I,
)
_OPEN_RE = re.compile(
    r"\b(?:cannot|can't|could\s+not|couldn't|not|yet\s+to)\s+(?:be\s+|been\s+|yet\s+)?(?:excluded|ruled\s+out|exclude)\b|"
    r"\b(?:is|are|remains?|also|still|equally|another)\s+(?:a\s+|an\s+)?(?:possib\w*|considerations?|differentials?)\b|"
    r"\bpossible\b(?!\s*\w)|\bconsider(?:ed|ing)?\b|\bpending\b|\bawaiting\b|\bto\s+(?:exclude|rule\s+out)\b",
    re.I,
)
_AFTER_FILLER_RE = re.compile(
    r"^(?:the\s+)?(?:(?:most\s+)?likely|final|correct|right)?\s*(?:diagnosis|answer|cause)?\s*(?:here|in\s+this\s+(?:case|patient))?$",
    re.I,
)


@dataclass
class _Analysis:
    code: str
    detail: str = ""  # extra words for the reason


def _split_pieces(text: str) -> list[str]:
    parts = re.split(r"\s*(?:[,;:]|\s-\s|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b)\s*", text, flags=re.I)
    return [p.strip() for p in parts if p and p.strip()]


def _strip_neg_target(text: str) -> str:
    text = re.sub(r"^(?:evidence\s+of|signs?\s+of|features\s+of|suggestion\s+of|to\s+be|be|of|for)\s+", "", text.strip(), flags=re.I)
    return _trim(text)


def _negation_split(piece: str) -> tuple[list[str], list[str]]:
    """(positive parts, negated parts) of one piece. A negated part '' means
    'whatever came just before' (``X, ruled out``)."""
    piece = piece.strip()
    m = _FWD_START_RE.match(piece)
    if m:
        return [], [_strip_neg_target(piece[m.end() :])]
    m = _BWD_RE.match(piece)
    if m and (m.group("cue").lower() != "not" or re.search(r"\b" + _COPULA + r"\s+$", piece[: m.start("cue")], re.I)):
        subj = _trim(re.sub(r"\s*\b" + _COPULA + r"\s*$", "", m.group("subj"), flags=re.I))
        after = _trim(m.group("after"))
        pos = []
        if after and not _AFTER_FILLER_RE.match(after):
            pos.append(_strip_fillers(after))
        return [p for p in pos if p], [subj]
    m = _MID_FWD_RE.search(piece)
    if m and m.start() > 0:
        before = _trim(piece[: m.start()])
        return ([before] if before else []), [_strip_neg_target(piece[m.end() :])]
    return [piece], []


def _analyse(concl: str, accept: _Matcher, distract: _Matcher) -> _Analysis:
    """Decide on one conclusion phrase (not multiple choice)."""
    if "?" in concl:
        return _Analysis("no_conclusion", "a question, not a conclusion")
    if re.match(r"\s*<[^<>]*>", concl):
        return _Analysis("no_conclusion", "a template placeholder")
    text = _strip_fillers(_trim(_basic(concl)))
    if not text:
        return _Analysis("no_conclusion")
    # 1. the whole phrase is an accepted name (covers names with "and" / commas)
    if accept.match(text):
        return _Analysis("accepted")
    if distract.match(text):
        return _Analysis("distractor")

    # 2. cut a trailing explanation ("..., given the RLQ pain")
    m = _EXPLAIN_RE.search(text)
    if m:
        head, tail = text[: m.start()].strip(" ,"), text[m.end() :]
        if not head:
            head = text.split(",", 1)[1] if "," in text else ""
            tail = ""
        if _HEDGE_RE.search(tail):
            return _Analysis("multiple_diagnoses")
        if _NEG_ANY_RE.search(tail) and (accept.mentioned_in(tail) or not distract.mentioned_in(tail)):
            return _Analysis("negated", f"explanation '{_trim(tail)}' contains a negation")
        text = _strip_fillers(_trim(head))
        if not text:
            return _Analysis("no_conclusion")
        if accept.match(text):
            return _Analysis("accepted")

    # 3. parentheticals
    parens = [p.group(1) or p.group(2) for p in re.finditer(r"\(([^()]*)\)|\[([^\[\]]*)\]", text)]
    main = _trim(re.sub(r"\s*(?:\([^()]*\)|\[[^\[\]]*\])\s*", " ", text))
    paren_quals: list[str] = []
    paren_names: list[str] = []
    negated: list[str] = []
    for p in parens:
        p = _trim(p or "")
        if not p or _FILLER_PAREN_RE.match(p):
            continue
        if _OPEN_RE.search(p) or _HEDGE_RE.search(p):
            return _Analysis("multiple_diagnoses", f"bracket keeps '{p}' open")
        if _NEG_ANY_RE.search(p):
            pos, neg = _negation_split(p)
            negated += [n if n else main for n in neg]
            paren_names += pos
            continue
        toks = _tokens(p)
        if toks and all(_is_qual(t) for t in toks):
            paren_quals += toks
            continue
        paren_names.append(p)

    # 4. pieces, negation; "X cannot be excluded" / "X is also possible" keep X open
    positives: list[str] = []
    hedged = False
    for piece in _split_pieces(main):
        if _OPEN_RE.search(piece):
            hedged = True
            positives.append(piece)
            continue
        pos, neg = _negation_split(piece)
        for n in neg:
            if n:
                negated.append(n)
            elif positives:
                negated.append(positives.pop())
        positives += [_strip_fillers(p) for p in pos if _strip_fillers(p)]
    if any(accept.mentioned_in(n) or accept.match(n) for n in negated):
        return _Analysis("negated")

    # 5. qualifier-only pieces fold into their neighbour ("appendicitis, acute")
    merged: list[str] = []
    for p in positives:
        toks = _tokens(p)
        if toks and all(_is_qual(t) for t in toks):
            if merged:
                merged[-1] = merged[-1] + " " + p
            else:
                paren_quals += toks
            continue
        merged.append(p)
    positives = merged
    if not positives:
        return _Analysis("wrong_diagnosis", "no positive diagnosis left") if negated else _Analysis("no_conclusion")
    if hedged:
        if len(positives) > 1:
            return _Analysis("multiple_diagnoses", "keeps another diagnosis open")
        return _Analysis("no_conclusion", "leaves it open")
    if len(positives) > 1:
        # "Anemia, iron deficiency" (ICD order)
        if len(positives) == 2 and accept.match(positives[1] + " " + positives[0], paren_quals):
            positives = [positives[1] + " " + positives[0]]
        else:
            return _Analysis("multiple_diagnoses")

    dx = positives[0]
    if accept.match(dx, paren_quals):
        for p in paren_names:
            if accept.match(p) or accept.abbreviates(p, dx):
                continue
            if distract.match(p) or _MULTI_RE.search(p):
                return _Analysis("multiple_diagnoses", f"bracket names '{p}'")
            return _Analysis("wrong_diagnosis", f"bracket '{p}' is not an accepted name")
        return _Analysis("accepted")
    if _MULTI_RE.search(dx) or any(_MULTI_RE.search(p) for p in paren_names):
        return _Analysis("multiple_diagnoses")
    if distract.match(dx, paren_quals):
        return _Analysis("distractor")
    return _Analysis("wrong_diagnosis")


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
    s = _trim(concl)
    m = _MC_MULTI_RE.match(s)
    if m and all(_LETTERS.index(g) < n for g in m.groups()) and m.group(1) != m.group(2):
        return [_LETTERS.index(m.group(1)), _LETTERS.index(m.group(2))], ""
    for pat in _MC_PATTERNS:
        m = pat.match(s)
        if m:
            idx = _LETTERS.find(m.group(1).upper())
            if 0 <= idx < n:
                rest = _trim(m.group("rest"))
                if rest.startswith("(") and rest.endswith(")"):
                    rest = _trim(rest[1:-1])
                m2 = re.match(r"^(?:or|and|/|,|vs\.?|versus|&)\s*\(?([A-Z])\)?(?=$|[\s.):,])", rest)
                if m2 and _LETTERS.find(m2.group(1)) < n:
                    return [idx, _LETTERS.index(m2.group(1))], ""
                return [idx], rest
    m = _MC_TRAILING_RE.match(s)
    if m:
        idx = _LETTERS.find(m.group(2))
        if 0 <= idx < n:
            return [idx], _trim(m.group("rest"))
    return None


def _answer_index(case: Case) -> int | None:
    if case.answer_idx is not None and 0 <= case.answer_idx < len(case.options or []):
        return case.answer_idx
    target = _Name.of(case.answer)
    for i, opt in enumerate(case.options or []):
        if _Name.of(opt) == target:
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
        self.accept = _Matcher(accept_names)
        self.distract = _Matcher(distract_names, infer_bare=False)
        self.option_matchers = [_Matcher([o], infer_bare=False) for o in self.options]

    def __call__(self, concl: str) -> tuple[str, str]:
        """(code, detail) for one conclusion phrase."""
        if not self.options:
            a = _analyse(concl, self.accept, self.distract)
            return a.code, a.detail
        # Multiple choice: the whole phrase may be an option's text (e.g. "C. difficile colitis").
        whole = _strip_fillers(_trim(_basic(concl)))
        if not any(m.match(whole) for m in self.option_matchers):
            letters = _mc_letter(whole, len(self.options))
            if letters is not None:
                return self._lettered(*letters)
        a = _analyse(concl, self.accept, self.distract)
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
        a = _analyse(rest, self.accept, self.distract)
        named = [i for i, m in enumerate(self.option_matchers) if m.match(_strip_fillers(rest))]
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
        for piece in _split_pieces(_strip_markdown(sentence)):
            piece = _trim(piece)
            m = _PRONOUN_NEG_RE.search(piece)
            if m:
                target = _trim(m.group("x") if m.group("x") is not None else m.group("y") or "")
                if _FILLER_TARGET_RE.match(target) or judge.accept.mentioned_in(target):
                    return piece
            m = _SUBJECT_NEG_RE.match(piece)
            if m and judge.accept.mentioned_in(m.group("subj") or m.group("subj2") or ""):
                return piece
            if _DOUBT_RE.search(piece) and (judge.accept.mentioned_in(piece) or re.search(r"\b(?:it|this)\b", piece, re.I)):
                return piece
            _, negated = _negation_split(piece)
            if any(n and judge.accept.mentioned_in(n) for n in negated):
                return piece
    return None


def _label_rest(line: str) -> str | None:
    """The text after a Final diagnosis / Diagnosis / Answer label on ``line``, if any."""
    m = _LABEL_RE.match(_clean_line(line))
    if not m or not m.group("sep") or not m.group("rest").strip():
        return None
    if not m.group("label").lower().startswith("final") and m.group("sep")[0].isalpha():
        return None
    return m.group("rest")


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
        raises = judge.distract.mentioned_in(same_line) and not _NEG_ANY_RE.search(same_line)
        if _HEDGE_RE.search(same_line) or _OPEN_TAIL_RE.search(same_line) or raises:
            return "multiple_diagnoses", f"then adds '{_trim(same_line)[:60]}'"
        if _NEG_ANY_RE.search(same_line) and judge.accept.mentioned_in(same_line):
            return "negated", f"then adds '{_trim(same_line)[:60]}'"
    if _RETRACT_RE.search(tail):
        return "multiple_diagnoses", "takes it back afterwards"
    undone = _takes_back(tail, judge)
    if undone:
        return "negated", f"then says '{undone[:60]}'"
    later: list[str] = []
    for line in tail.splitlines():
        rest = _label_rest(line)
        if rest is not None:
            later.append(_trim(_first_sentence(_strip_markdown(rest))))
    for m in _LATER_LABEL_RE.finditer(_strip_markdown(tail)):  # also mid-line
        later.append(_trim(_first_sentence(m.group("x"))))
    rest = tail
    while True:
        sent = _sentence_conclusion(rest)
        if sent is None:
            break
        later.append(sent[1])
        rest = rest[: sent[0]]
    for phrase in later:
        if phrase and judge(phrase)[0] != "accepted":
            return "multiple_diagnoses", f"later concludes '{phrase}'"
    if tier == 3:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", tail):
            if _OPEN_TAIL_RE.search(sentence) or (
                judge.distract.mentioned_in(sentence) and not _NEG_ANY_RE.search(sentence)
            ):
                return "multiple_diagnoses", f"then raises '{_trim(sentence)[:60]}'"
    return None


def check_trace(text: str, case: Case) -> Verdict:
    """Did ``text`` conclude ``case``'s diagnosis? See the module docstring for the rules."""
    if text is None or not str(text).strip():
        return _verdict("empty", None)
    found = _extract(str(text))
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
