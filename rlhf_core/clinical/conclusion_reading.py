"""Reading a trace's conclusion: where it concludes (a labelled line, else a concluding
sentence), and what the concluded phrase says (pieces, negations, hedges) before it is matched.

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

"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .diagnosis_names import NameMatcher, basic_text, first_sentence, is_qualifier, name_tokens, strip_fillers, strip_markdown, trim_text


# --------------------------------------------------------------------------- conclusion extraction

_LINE_PREFIX_RE = re.compile(r"^(?:\s*(?:>+|#+|[-+\u2022\u25cf\u25aa]|\d{1,2}[.)])\s+)*\s*")
LABEL_RE = re.compile(
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


def clean_line(line: str) -> str:
    """``line`` without markdown emphasis or leading quote, heading, bullet and number markers, stripped."""
    return _LINE_PREFIX_RE.sub("", strip_markdown(line)).strip()


def sentence_conclusion(text: str) -> tuple[int, str, int] | None:
    """(start, phrase, end) of the last clear concluding sentence in ``text``."""
    best: tuple[int, str, int] | None = None
    for pat in _SENTENCE_PATTERNS:
        backward = pat is _SENTENCE_PATTERNS[-1]
        for m in pat.finditer(text):
            start = m.start("x") if backward else m.start()
            sent_start = max(text.rfind(c, 0, start) for c in ".!?\n") + 1
            x = m.group("x")
            if not backward:
                x = first_sentence(x)
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
            x = trim_text(x)
            if x and (best is None or m.start() >= best[0]):
                best = (m.start(), x, end)
    return best


def extract_labelled(text: str) -> tuple[str, str, int] | None:
    """(conclusion, the text after it, tier) -- tier 1: a Final diagnosis/answer
    line, 2: a Diagnosis/Answer/Conclusion line, 3: a concluding sentence."""
    if not text or not text.strip():
        return None
    text = basic_text(text)
    lines = text.splitlines()
    found: dict[int, tuple[str, str]] = {}
    for i, line in enumerate(lines):
        clean = clean_line(line)
        m = LABEL_RE.match(clean)
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
                lm = LABEL_RE.match(clean_line(nxt))
                if lm and lm.group("sep"):
                    break
                block.append(nxt)
                after_idx = j + 1
                if not _BULLET_RE.match(strip_markdown(nxt)):
                    break
            if not block:
                continue
            if len(block) > 1 and all(_BULLET_RE.match(strip_markdown(b)) for b in block):
                rest = "; ".join(clean_line(_BULLET_RE.sub("", strip_markdown(b))) for b in block)
            else:
                rest = clean_line(block[0])
        body = strip_markdown(rest).strip()
        first = first_sentence(body)
        tail = "\n".join([body[len(first) :].lstrip(" .!")] + lines[after_idx:])
        inner = sentence_conclusion(first)
        concl = trim_text(inner[1] if inner else first)
        if concl:
            found[tier] = (concl, tail)
    for tier in (1, 2):
        if tier in found:
            return found[tier][0], found[tier][1], tier
    plain = strip_markdown(text)
    sent = sentence_conclusion(plain)
    if sent is None:
        return None
    return sent[1], plain[sent[2] :].lstrip(" .!"), 3


def extract_conclusion(text: str) -> str | None:
    """The diagnosis a trace concluded, as written (trimmed), or None.

    The last ``Final diagnosis:`` line wins; then the last ``Diagnosis:`` /
    ``Answer:`` / ``Conclusion:`` line; then the last concluding sentence.
    """
    found = extract_labelled(text)
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
NEG_ANY_RE = re.compile(
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
HEDGE_RE = re.compile(r"\b(?:or|vs|versus|either|alternatively|possibly|differential|ddx|otherwise)\b|/", re.I)
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
class Analysis:
    """The decision on one conclusion phrase: a verifier code and the detail for its reason."""

    code: str
    detail: str = ""  # extra words for the reason


def split_pieces(text: str) -> list[str]:
    """The pieces of a phrase between commas, semicolons, colons, spaced dashes and "but"-like words."""
    parts = re.split(r"\s*(?:[,;:]|\s-\s|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b)\s*", text, flags=re.I)
    return [p.strip() for p in parts if p and p.strip()]


def _strip_neg_target(text: str) -> str:
    text = re.sub(r"^(?:evidence\s+of|signs?\s+of|features\s+of|suggestion\s+of|to\s+be|be|of|for)\s+", "", text.strip(), flags=re.I)
    return trim_text(text)


def negation_split(piece: str) -> tuple[list[str], list[str]]:
    """(positive parts, negated parts) of one piece. A negated part '' means
    'whatever came just before' (``X, ruled out``)."""
    piece = piece.strip()
    m = _FWD_START_RE.match(piece)
    if m:
        return [], [_strip_neg_target(piece[m.end() :])]
    m = _BWD_RE.match(piece)
    if m and (m.group("cue").lower() != "not" or re.search(r"\b" + _COPULA + r"\s+$", piece[: m.start("cue")], re.I)):
        subj = trim_text(re.sub(r"\s*\b" + _COPULA + r"\s*$", "", m.group("subj"), flags=re.I))
        after = trim_text(m.group("after"))
        pos = []
        if after and not _AFTER_FILLER_RE.match(after):
            pos.append(strip_fillers(after))
        return [p for p in pos if p], [subj]
    m = _MID_FWD_RE.search(piece)
    if m and m.start() > 0:
        before = trim_text(piece[: m.start()])
        return ([before] if before else []), [_strip_neg_target(piece[m.end() :])]
    return [piece], []


def analyse_conclusion(concl: str, accept: NameMatcher, distract: NameMatcher) -> Analysis:
    """Decide on one conclusion phrase (not multiple choice)."""
    if "?" in concl:
        return Analysis("no_conclusion", "a question, not a conclusion")
    if re.match(r"\s*<[^<>]*>", concl):
        return Analysis("no_conclusion", "a template placeholder")
    text = strip_fillers(trim_text(basic_text(concl)))
    if not text:
        return Analysis("no_conclusion")
    # 1. the whole phrase is an accepted name (covers names with "and" / commas)
    if accept.match(text):
        return Analysis("accepted")
    if distract.match(text):
        return Analysis("distractor")

    # 2. cut a trailing explanation ("..., given the RLQ pain")
    m = _EXPLAIN_RE.search(text)
    if m:
        head, tail = text[: m.start()].strip(" ,"), text[m.end() :]
        if not head:
            head = text.split(",", 1)[1] if "," in text else ""
            tail = ""
        if HEDGE_RE.search(tail):
            return Analysis("multiple_diagnoses")
        if NEG_ANY_RE.search(tail) and (accept.mentioned_in(tail) or not distract.mentioned_in(tail)):
            return Analysis("negated", f"explanation '{trim_text(tail)}' contains a negation")
        text = strip_fillers(trim_text(head))
        if not text:
            return Analysis("no_conclusion")
        if accept.match(text):
            return Analysis("accepted")

    # 3. parentheticals
    parens = [p.group(1) or p.group(2) for p in re.finditer(r"\(([^()]*)\)|\[([^\[\]]*)\]", text)]
    main = trim_text(re.sub(r"\s*(?:\([^()]*\)|\[[^\[\]]*\])\s*", " ", text))
    paren_quals: list[str] = []
    paren_names: list[str] = []
    negated: list[str] = []
    for p in parens:
        p = trim_text(p or "")
        if not p or _FILLER_PAREN_RE.match(p):
            continue
        if _OPEN_RE.search(p) or HEDGE_RE.search(p):
            return Analysis("multiple_diagnoses", f"bracket keeps '{p}' open")
        if NEG_ANY_RE.search(p):
            pos, neg = negation_split(p)
            negated += [n if n else main for n in neg]
            paren_names += pos
            continue
        toks = name_tokens(p)
        if toks and all(is_qualifier(t) for t in toks):
            paren_quals += toks
            continue
        paren_names.append(p)

    # 4. pieces, negation; "X cannot be excluded" / "X is also possible" keep X open
    positives: list[str] = []
    hedged = False
    for piece in split_pieces(main):
        if _OPEN_RE.search(piece):
            hedged = True
            positives.append(piece)
            continue
        pos, neg = negation_split(piece)
        for n in neg:
            if n:
                negated.append(n)
            elif positives:
                negated.append(positives.pop())
        positives += [strip_fillers(p) for p in pos if strip_fillers(p)]
    if any(accept.mentioned_in(n) or accept.match(n) for n in negated):
        return Analysis("negated")

    # 5. qualifier-only pieces fold into their neighbour ("appendicitis, acute")
    merged: list[str] = []
    for p in positives:
        toks = name_tokens(p)
        if toks and all(is_qualifier(t) for t in toks):
            if merged:
                merged[-1] = merged[-1] + " " + p
            else:
                paren_quals += toks
            continue
        merged.append(p)
    positives = merged
    if not positives:
        return Analysis("wrong_diagnosis", "no positive diagnosis left") if negated else Analysis("no_conclusion")
    if hedged:
        if len(positives) > 1:
            return Analysis("multiple_diagnoses", "keeps another diagnosis open")
        return Analysis("no_conclusion", "leaves it open")
    if len(positives) > 1:
        # "Anemia, iron deficiency" (ICD order)
        if len(positives) == 2 and accept.match(positives[1] + " " + positives[0], paren_quals):
            positives = [positives[1] + " " + positives[0]]
        else:
            return Analysis("multiple_diagnoses")

    dx = positives[0]
    if accept.match(dx, paren_quals):
        for p in paren_names:
            if accept.match(p) or accept.abbreviates(p, dx):
                continue
            if distract.match(p) or _MULTI_RE.search(p):
                return Analysis("multiple_diagnoses", f"bracket names '{p}'")
            return Analysis("wrong_diagnosis", f"bracket '{p}' is not an accepted name")
        return Analysis("accepted")
    if _MULTI_RE.search(dx) or any(_MULTI_RE.search(p) for p in paren_names):
        return Analysis("multiple_diagnoses")
    if distract.match(dx, paren_quals):
        return Analysis("distractor")
    return Analysis("wrong_diagnosis")
