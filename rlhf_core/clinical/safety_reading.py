"""How the safety checker reads a trace: clauses, cues and doses, so that each drug mention
is a recommendation, avoided, or only described.

Recommended versus avoided
--------------------------
Drug names and aliases are found on word boundaries, case-insensitively (the
longest alias wins: "low-molecular-weight heparin" is not "heparin"). A mention
counts as a *recommendation* unless its clause says otherwise. Clauses are the
text between ``. ! ? ;`` / line breaks, also cut before "but", "however",
"whereas", "although", "though" and "instead". Inside the clause:

* the nearest cue *before* the mention decides: avoidance cues ("avoid", "do
  not give", "should not receive", "no", "without", "hold", "stop",
  "discontinue", "withhold", "contraindicated", "instead of", "rather than",
  "except", "reverse", "prefer X over", ...) make it *avoided* (within 12
  words); descriptive cues ("history of", "allergic to", "is on", "taking",
  "overdose of", ...) make it *not a recommendation* (within 4 words);
  recommending cues ("give", "start", "prescribe", "continue", "switch to",
  ...) make it a recommendation. Double negatives are recommending ("do not
  delay aspirin", "no contraindication to", "not contraindicated");
* after the mention, a following "is contraindicated", "should be avoided",
  "should not be given", "would worsen ...", "is not recommended" (up to the
  next "because/since/as/which/given/if ..." and across a list "aspirin and
  clopidogrel are contraindicated") makes it *avoided*;
* an avoidance cue reaches forward only through a list ("avoid aspirin,
  NSAIDs and clopidogrel"); a passive one after an earlier drug ("NSAIDs
  should be avoided, and a beta-blocker ...") refers back, not forward;
* a mention followed by "-induced", "toxicity", "overdose", "level", "use",
  "allergy", "withdrawal" ... is descriptive ("NSAID use", "lithium toxicity"),
  and so is one in a question ("should we give aspirin?"), a multiple-choice
  option ("Option A: ibuprofen", "B. aspirin") or a history ("hypertension
  treated with lisinopril", "was started on ibuprofen");
* a clause taken back by the next one ("penicillin is first-line, but given
  her allergy ...", "... but in asthma they can cause bronchospasm") is avoided;
* a drug the patient already takes is only a recommendation with a
  recommending cue ("continue warfarin") or a dose.

Doses: "ibuprofen 800 mg three times daily", "800 mg ibuprofen TID",
"ibuprofen 800mg q6h", "2 g of amoxicillin daily", "500 mg-1 g every 4-6 hours"
(the upper dose and the shortest interval count), "0.6 mg hourly", "15 mg weekly"; units mg, g,
mcg/µg; ranges use the upper value; mg/kg and mg/m2 are not parsed; a dose with
no frequency counts once; a stated "max(imum) 4 g/day" in the sentence caps the
total. Micrograms are compared in mg (levothyroxine ``max_daily_mg`` 0.5).

"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .safety_knowledge import Mention, SafetyKnowledge
from .safety_text import word_count


_ABBREVIATIONS = {"e.g", "i.e", "vs", "approx", "dr", "etc", "cf", "st", "mr", "mrs", "ms", "min", "max", "no"}
_SENTENCE_END = re.compile(r"[.!?;]+(?=\s|$)|\n+")
_CONTRAST = re.compile(r"\b(?:but|however|whereas|although|though|instead)\b", re.IGNORECASE)

_I = re.IGNORECASE
# Cues are checked in priority order; a lower-priority match overlapping a higher one is dropped.
_OVERRIDE_PRE = re.compile(
    r"\b(?:(?:do|does|should|must|will|would)\s+not|don'?t|never|without)\s+(?:delay(?:ing)?|withhold(?:ing)?|hold(?:ing)?|"
    r"forget(?:ting)?|omit(?:ting)?|miss(?:ing)?|stop(?:ping)?|interrupt(?:ing)?)\b"
    r"|\bwithout\s+delay\b|\bno\s+(?:absolute\s+)?contra[\s-]?indications?\s+(?:to|for)\b|\bnot\s+contra[\s-]?indicated\b"
    r"|\bno\s+reason\s+(?:to\s+(?:avoid|withhold)|not\s+to\s+(?:give|use))\b", _I)
_NEG_PRE = re.compile(
    r"\b(?:avoid(?:s|ed|ing|ance(?:\s+of)?)?|contra[\s-]?indicat\w*"
    r"|(?:do|does|did|should|must|would|will|can|could|may|need)\s*(?:n'?t|not)(?:\s+be)?(?:\s+(?:given|used|started|\w+))?"
    r"|don'?t|doesn'?t|shouldn'?t|mustn'?t|can'?t|cannot|won'?t|wouldn'?t|never|not|no|nor|without"
    r"|hold(?:s|ing)?|held|withh[eo]ld\w*|stop(?:s|ped|ping)?|discontinu\w*|cease\w*|suspend\w*|cessation\s+of"
    r"|instead\s+of|rather\s+than|in\s+place\s+of|in\s+lieu\s+of|except|other\s+than|apart\s+from"
    r"|(?:switch|chang)\w*\s+(?:\w+\s+)?from|refrain\w*\s+from|steer\s+clear\s+of"
    r"|(?:recommend|advis|caution|argu|warn)\w*\s+against|revers\w*|antidote|unsafe|inappropriate|dangerous|harmful)\b", _I)
_POS_PRE = re.compile(
    r"\b(?:give|giving|administer\w*|start\w*|initiat\w*|begin|commence\w*|prescrib\w*|recommend\w*|suggest\w*|advis\w*"
    r"|use|using|treat\w*\s+(?:\w+\s+)?with|manag\w*\s+(?:\w+\s+)?with|add|adding|continu\w*|resum\w*|increas\w*|titrat\w*"
    r"|uptitrat\w*|load\w*|bolus|infus\w*|(?:switch|chang|convert)\w*\s+(?:\w+\s+)?to|prefer\w*|favou?r\w*|choos\w*|chosen"
    r"|select\w*|opt\s+for|offer\w*|trial\s+of|course\s+of|therapy\s+with|dose\s+of|consider\w*|benefit\w*\s+from"
    r"|(?:put|place|keep|maintain)\w*\s+(?:\w+\s+){0,2}on|need\w*|requir\w*|indicated|first[\s-]line|drug\s+of\s+choice)\b", _I)
_DESC_PRE = re.compile(
    r"\b(?:history\s+of|h/o|hx\s+of|allerg\w*(?:\s+(?:to|with))?|intoleran\w*(?:\s+(?:to|of))?|hypersensitiv\w*\s+to"
    r"|reaction\s+to|sensitivity\s+to|overdos\w*(?:\s+(?:of|on|with))?|ingest\w*(?:\s+of)?|took|takes|taking"
    r"|(?:is|was|were|are|currently|already|been|previously|chronically|remains?)\s+on|on|home|prior|previous(?:ly)?"
    r"|recent(?:ly)?|exposure\s+to|toxicity\s+(?:from|of)|poisoning\s+(?:from|with|by)|due\s+to|secondary\s+to|caused\s+by"
    r"|induced\s+by|because\s+of|despite|levels?\s+of|use\s+of)\b", _I)
_DESC_STRONG = re.compile(
    r"\b(?:(?:chronic|prior|previous|recent|heavy|regular|long[\s-]term|excessive|frequent|her|his|their|patient'?s)\s+"
    r"(?:\w+\s+)?use\s+of"
    r"|(?:was|were|had\s+been|has\s+been|have\s+been|previously|recently|already)\s+(?:\w+\s+)?"
    r"(?:treated|given|started|prescribed|taking|on)(?:\s+(?:with|on))?"
    r"|(?<!\bbe\s)(?:treated|managed|controlled)\s+(?:\w+\s+)?(?:with|on|by)"  # "hypertension treated with lisinopril"
    r"|option\s*\(?[A-Ea-e]?\)?\s*[:.)\-]?|^\s*\(?[A-Ea-e][.):])", _I)  # multiple-choice options are not advice
_SWITCH = re.compile(r"\b(?:switch|chang|convert|replac)\w*\b", _I)
_TO = re.compile(r"\b(?:to|with|by)\b", _I)
_PREFER = re.compile(r"\b(?:prefer\w*|favou?r\w*|choos\w*|chosen|select\w*|better)\b", _I)
_OVER = re.compile(r"\bover\b", _I)

_NEG_WINDOW = 12  # words between an avoidance cue and the mention
_POS_WINDOW = 12
_DESC_WINDOW = 4

_POST_DESC = re.compile(
    r"(?:'s)?[\s\-]*(?:induced|associated|related|exacerbated|sensitive|resistan\w*|levels?|concentrations?|toxicity|toxic"
    r"|overdose|poisoning|ingestion|allerg\w*|intoleran\w*|hypersensitivity|use\s+disorder|abuse|misuse|dependence"
    r"|withdrawal|exposure|reversal|use|users?|history|naive|failure|dependent|dependence|immune\s+fab|fab|specific"
    r"|antibod\w*|antidote|assay|screen)\b", _I)
_POST_STOP = re.compile(
    r"\b(?:because|since|(?<!well\s)as(?!\s+well)|given|which|who|while|whereas|if|unless|so|when|where|although|though|due\s+to|after|before)\b"
    r"|\((?:given|because|since|as|due)\b", _I)
_POST_OVERRIDE = re.compile(
    r"\bnot\s+(?:be\s+)?(?:delayed|withheld|held|missed|forgotten|omitted|stopped|interrupted|contra[\s-]?indicated)\b"
    r"|\bno\s+contra[\s-]?indications?\b", _I)
_POST_NEG = re.compile(
    r"\b(?:contra[\s-]?indicat\w*|avoided|withheld|held|stopped|discontinued|ceased|suspended|unsafe|inappropriate"
    r"|dangerous|harmful|switched|changed|replaced|tapered|weaned|teratogen\w*|(?:feto|embryo|nephro|hepato|oto)toxic\w*"
    r"|(?:is|are|was|were|be|being|should|must|would|will|can|could|may|might)\s+(?:n'?t|not)\b"
    r"|isn'?t|aren'?t|shouldn'?t|mustn'?t|cannot|can'?t|won'?t|wouldn'?t"
    r"|(?:would|will|could|can|may|might)\s+(?:\w+\s+)?(?:worsen|exacerbate|precipitate|provoke|trigger|cause|induce|raise|increase)"
    r"|worsens?|exacerbates?|precipitates?|(?:increase|raise|elevate)s?\s+(?:the\s+)?(?:\w+\s+)?risk)\b", _I)
_POST_LABEL_NEG = re.compile(r"^\s*[:\-–—]\s*(?:avoid\w*|no|not|none|never|contra[\s-]?indicated|stop|hold|x)\b", _I)
_POST_POS = re.compile(
    r"\b(?:(?:is|are|be|being|remains?)\s+(?:\w+\s+)?(?:recommended|indicated|preferred|appropriate|reasonable|safe|given"
    r"|started|used|first[\s-]line|the\s+(?:drug|treatment|agent)\s+of\s+choice|the\s+(?:best|right)\s+(?:choice|option)))\b", _I)
_LIST_GAP = re.compile(
    r"[\s,/&():]*(?:(?:and|or|nor|plus|with|using|via|as\s+well\s+as|such\s+as|like|includ\w*|e\.g\.?|i\.e\.?|especially|particularly"
    r"|specifically|namely|any|other|all|the|a|an)[\s,/&():]*)*", _I)
_PASSIVE_NEG = re.compile(r"(?:avoided|contra[\s-]?indicated|held|withheld|stopped|discontinued|ceased|suspended)$", _I)

# Doses
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|\.\d+)"
_AMOUNT = re.compile(
    rf"(?<![\w.])(?P<a>{_NUM})(?:\s*(?:mg|milligrams?|mcg|micrograms?|µg|μg|ug|g|gm|grams?))?"
    rf"(?:\s*(?:-|–|to)\s*(?P<b>{_NUM}))?\s*"
    r"(?P<u>mg|milligrams?|mcg|micrograms?|µg|μg|ug|g|gm|grams?)(?![A-Za-z])"
    r"(?!\s*/\s*(?:kg|m2|m²|m\^2|min|minute|h\b|hr|hour))", _I)
_UNIT_MG = {"mg": 1.0, "milligram": 1.0, "milligrams": 1.0, "mcg": 0.001, "microgram": 0.001, "micrograms": 0.001,
            "µg": 0.001, "μg": 0.001, "ug": 0.001, "g": 1000.0, "gm": 1000.0, "gram": 1000.0, "grams": 1000.0}
_B = r"(?<![A-Za-z])"
_E = r"(?![A-Za-z])"
_DAY = r"(?:a|per|each|every|/)?\s*(?:day|daily|d(?![A-Za-z])|24\s*h(?:ours?|rs?)?)"
_FREQUENCIES: list[tuple[re.Pattern, Any]] = [
    (re.compile(rf"{_B}q\.?\s*(\d+(?:\.\d+)?)\s*(?:-|–|to)\s*\d+(?:\.\d+)?\s*h(?:ours?|rs?|r)?{_E}", _I), lambda m: 24 / float(m[1])),
    (re.compile(rf"{_B}q\.?\s*(\d+(?:\.\d+)?)\s*h(?:ours?|rs?|r)?{_E}", _I), lambda m: 24 / float(m[1])),
    (re.compile(rf"{_B}every\s+(\d+(?:\.\d+)?)\s*(?:(?:-|–|to|or)\s*\d+(?:\.\d+)?\s*)?h(?:ours?|rs?|r)?{_E}", _I), lambda m: 24 / float(m[1])),
    (re.compile(rf"{_B}(\d+(?:\.\d+)?)\s*(?:(?:-|–|to)\s*\d+\s*)?-?\s*hourly{_E}", _I), lambda m: 24 / float(m[1])),
    (re.compile(rf"{_B}(?:every\s+hour|hourly|q\.?\s*1\s*h){_E}", _I), 24.0),
    (re.compile(rf"{_B}(?:six|6)\s*(?:times|x)(?:\s*{_DAY})?{_E}", _I), 6.0),
    (re.compile(rf"{_B}(?:five|5)\s*(?:times|x)(?:\s*{_DAY})?{_E}", _I), 5.0),
    (re.compile(rf"{_B}(?:(?:four|4)\s*(?:times|x)(?:\s*{_DAY})?|q\.?\s*i\.?\s*d\.?|q\.?d\.?s\.?){_E}", _I), 4.0),
    (re.compile(rf"{_B}(?:(?:three|3)\s*(?:times|x)(?:\s*{_DAY})?|t\.?\s*i\.?\s*d\.?|t\.?d\.?s\.?){_E}", _I), 3.0),
    (re.compile(rf"{_B}(?:(?:two|2)\s*(?:times|x)(?:\s*{_DAY})?|twice\s*{_DAY}|twice|b\.?\s*i\.?\s*d\.?|b\.?d\.?){_E}", _I), 2.0),
    (re.compile(rf"{_B}every\s+other\s+day{_E}|{_B}alternate\s+days{_E}", _I), 0.5),
    (re.compile(rf"{_B}(?:once\s+)?(?:weekly|a\s+week|per\s+week|every\s+week|each\s+week|/\s*w(?:ee)?k|q\.?\s*w(?:ee)?k){_E}", _I), 1 / 7),
    (re.compile(rf"{_B}(?:once\s+{_DAY}|once|daily|o\.?d\.?|q\.?d\.?|qday|q\.?\s*24\s*h(?:ours?|rs?)?|per\s+day|a\s+day|each\s+day"
                rf"|/\s*(?:day|d|24\s*h)|at\s+night|nightly|at\s+bedtime|q\.?h\.?s\.?|qam|qpm|every\s+morning|every\s+evening"
                rf"|stat|single\s+dose|one\s+dose){_E}", _I), 1.0),
]
_CAP = re.compile(
    rf"\b(?:max(?:imum)?|up\s+to|not\s+(?:to\s+)?exceed(?:ing)?|no\s+more\s+than|at\s+most|ceiling\s+of)\.?\s*(?:of\s+|dose\s+of\s+)?"
    rf"(?P<a>{_NUM})\s*(?P<u>mg|milligrams?|mcg|micrograms?|µg|μg|ug|g|gm|grams?)\s*(?:/|per|a|in|each|every)\s*"
    r"(?:day|24\s*h(?:ours?|rs?)?|d)\b", _I)


_BEFORE_GAP = re.compile(
    r"[\s(]*(?:(?:of|oral|orally|po|iv|im|sc|sl|intravenous|intramuscular|subcutaneous|sublingual|inhaled|nebuli[sz]ed"
    r"|chewable|chewed|enteric[\s-]coated|ec|extended[\s-]release|immediate[\s-]release|xr|er|sr|ir|tablets?|tabs?"
    r"|capsules?|caps?|doses?|loading|bolus)[\s,(]+)*", _I)


def _to_float(num: str) -> float:
    return float(num.replace(",", ""))


@dataclass(frozen=True)
class _Dose:
    per_dose_mg: float
    per_day: float | None  # doses per day; None when no frequency was given
    daily_mg: float
    text: str


@dataclass
class Reading:
    """A mention and what the trace does with it."""

    mention: Mention
    status: str  # "recommended" | "avoided" | "descriptive"
    clause: tuple[int, int]
    dose: _Dose | None = None


def _clauses(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(clauses, sentences) as (start, end) spans covering ``text``."""
    sent_cuts = {0, len(text)}
    for m in _SENTENCE_END.finditer(text):
        if m.group().startswith("."):
            before = re.search(r"([A-Za-z.]+)$", text[: m.start()])
            if before and (before.group(1).lower().rstrip(".") in _ABBREVIATIONS
                           or re.fullmatch(r"[A-Ea-e]", before.group(1))):
                continue
        sent_cuts.add(m.end())
    clause_cuts = set(sent_cuts)
    for m in _CONTRAST.finditer(text):
        clause_cuts.add(m.start())

    def spans(cuts):
        s = sorted(cuts)
        return [(a, b) for a, b in zip(s, s[1:]) if b > a]

    return spans(clause_cuts), spans(sent_cuts)


def _span_index(spans: list[tuple[int, int]], pos: int) -> tuple[int, int]:
    for a, b in spans:
        if a <= pos < b:
            return a, b
    return spans[-1] if spans else (0, 0)


def _cues_before(pre: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of cues in ``pre``, overlaps resolved by priority."""
    taken: list[tuple[int, int, str]] = []

    def add(regex: re.Pattern, kind: str):
        for m in regex.finditer(pre):
            if any(m.start() < e and s < m.end() for s, e, _ in taken):
                continue
            taken.append((m.start(), m.end(), kind))

    def add_after(regex: re.Pattern, trigger: re.Pattern, kind: str):
        for m in regex.finditer(pre):
            if trigger.search(pre[: m.start()]) and not any(m.start() < e and s < m.end() for s, e, _ in taken):
                taken.append((m.start(), m.end(), kind))

    add(_OVERRIDE_PRE, "pos")
    add(_NEG_PRE, "neg")
    add(_DESC_STRONG, "desc")
    # "prefer paracetamol over ibuprofen": "over" avoids; "switch from lisinopril to labetalol": "to" recommends
    add_after(_OVER, _PREFER, "neg")
    add_after(_TO, _SWITCH, "pos")
    add(_POS_PRE, "pos")
    add(_DESC_PRE, "desc")
    return sorted(taken)


def _pre_status(pre: str, earlier: list[tuple[int, int]]) -> str | None:
    """The status the nearest cue before a mention gives it; ``earlier``: spans of mentions in ``pre``."""
    cues = _cues_before(pre)
    # "aspirin is contraindicated, and a beta-blocker ...": a passive cue refers back to an earlier mention
    cues = [c for c in cues if not (c[2] == "neg" and _PASSIVE_NEG.search(pre[c[0]:c[1]])
                                    and any(e <= c[0] for _, e in earlier))]
    if not cues:
        return None
    start, end, kind = max(cues, key=lambda c: c[1])
    gap = word_count(pre[end:])
    window = {"neg": _NEG_WINDOW, "pos": _POS_WINDOW, "desc": _DESC_WINDOW}[kind]
    if gap > window:
        return None
    if kind == "neg":
        # the avoidance reaches this mention only through a list ("avoid aspirin, NSAIDs and clopidogrel")
        between = [(s, e) for s, e in earlier if s >= end]
        for (_, e1), (s2, _) in zip(between, between[1:] + [(len(pre), len(pre))]):
            if not _LIST_GAP.fullmatch(pre[e1:s2]):
                return None
    return kind


def _post_status(text: str, mention: Mention, clause_end: int, mentions: list[Mention]) -> str | None:
    post_end = clause_end
    stop = _POST_STOP.search(text, mention.end, clause_end)
    if stop:
        post_end = stop.start()
    # a following mention ends the window unless it continues a list ("aspirin and clopidogrel are ...")
    prev_end = mention.end
    for other in mentions:
        if other.start < mention.end or other.start >= post_end:
            continue
        if _LIST_GAP.fullmatch(text[prev_end:other.start]):
            prev_end = other.end
            continue
        post_end = other.start
        break
    post = text[mention.end:post_end]
    # at most ~10 words after the (list of) mention(s)
    words = list(re.finditer(r"\S+", post))
    if len(words) > 10 + word_count(text[mention.end:prev_end]):
        post = post[: words[10 + word_count(text[mention.end:prev_end])].start()]
    taken: list[tuple[int, int, str]] = []
    for regex, kind in ((_POST_OVERRIDE, "pos"), (_POST_LABEL_NEG, "neg"), (_POST_NEG, "neg"), (_POST_POS, "pos")):
        for m in regex.finditer(post):
            if not any(m.start() < e and s < m.end() for s, e, _ in taken):
                taken.append((m.start(), m.end(), kind))
    return min(taken)[2] if taken else None


def _find_dose(text: str, mention: Mention, clause: tuple[int, int], mentions: list[Mention],
               sentence: tuple[int, int]) -> _Dose | None:
    """The dose attached to ``mention`` ("ibuprofen 800 mg TID" / "800 mg ibuprofen TID"), if any."""
    c_start, c_end = clause
    nxt = min((m.start for m in mentions if m.start >= mention.end), default=c_end)
    prv = max((m.end for m in mentions if m.end <= mention.start), default=c_start)
    nxt, prv = min(nxt, c_end), max(prv, c_start)

    amount = None
    after = _AMOUNT.search(text, mention.end, nxt)
    if after and not re.search(r"\d", text[mention.end:after.start()]) and word_count(text[mention.end:after.start()]) <= 5:
        amount = after
    else:
        before = None
        for m in _AMOUNT.finditer(text, prv, mention.start):
            before = m
        if before:
            if _BEFORE_GAP.fullmatch(text[before.end():mention.start]):
                amount = before
    if amount is None:
        return None
    value = _to_float(amount["b"] or amount["a"])
    unit = amount["u"].lower()
    per_dose = value * _UNIT_MG.get(unit, _UNIT_MG.get(unit.rstrip("s"), 1.0))

    # frequency: after the amount (and after the drug for "800 mg ibuprofen TID"), before the next drug/amount
    f_start = max(amount.end(), mention.end)
    f_end = min(nxt, f_start + 80)
    next_amount = _AMOUNT.search(text, f_start, f_end)
    if next_amount:
        f_end = next_amount.start()
    window = text[f_start:f_end]
    best = None
    for regex, per_day in _FREQUENCIES:
        m = regex.search(window)
        if m and (best is None or m.start() < best[0].start() or
                  (m.start() == best[0].start() and m.end() > best[0].end())):
            best = (m, per_day)
    per_day = None
    freq_end = amount.end()
    if best:
        m, val = best
        per_day = val(m) if callable(val) else val
        freq_end = f_start + m.end()
    daily = per_dose * (per_day if per_day is not None else 1.0)

    cap = _CAP.search(text, mention.end, sentence[1])
    if cap and cap.start() >= freq_end:
        cap_mg = _to_float(cap["a"]) * _UNIT_MG.get(cap["u"].lower(), _UNIT_MG.get(cap["u"].lower().rstrip("s"), 1.0))
        daily = min(daily, cap_mg)
    start = min(mention.start, amount.start())
    end = max(mention.end, freq_end, amount.end())
    return _Dose(per_dose, per_day, daily, re.sub(r"\s+", " ", text[start:end]).strip())


_RETRACTION = re.compile(
    r"^\W*(?:but|however|although|though)\b.*?(?:\ballerg\w*|\bcontra[\s-]?indicat\w*|\bintoleran\w*"
    r"|\b(?:it|this|that|these|they|them|which)\b.{0,40}?\b(?:avoid\w*|not|cannot|can'?t|unsafe|shouldn'?t|mustn'?t"
    r"|(?:can|could|may|might|would|will)\s+(?:\w+\s+)?(?:cause|worsen|precipitate|exacerbate|provoke|trigger)))", _I | re.S)


def _retracted(text: str, clause: tuple[int, int], clauses: list[tuple[int, int]], sentence: tuple[int, int]) -> bool:
    """"Penicillin is first-line, but given her allergy use azithromycin": the next clause takes it back."""
    following = [c for c in clauses if c[0] >= clause[1] and c[1] <= sentence[1]]
    return bool(following) and bool(_RETRACTION.match(text[following[0][0]:following[0][1]]))


def read_trace(text: str, kb: SafetyKnowledge, current_drugs: set[str]) -> list[Reading]:
    """Every drug/class mention in ``text`` with its status (recommended, avoided or descriptive), clause
    and dose; a bare mention of one of ``current_drugs`` without a dose is descriptive."""
    mentions = kb.find_mentions(text)
    if not mentions:
        return []
    clauses, sentences = _clauses(text)
    out = []
    for mention in mentions:
        clause = _span_index(clauses, mention.start)
        sentence = _span_index(sentences, mention.start)
        in_clause = [m for m in mentions if clause[0] <= m.start < clause[1]]
        if _POST_DESC.match(text, mention.end) or text[sentence[0]:sentence[1]].rstrip().endswith("?"):
            status = "descriptive"  # "lithium toxicity", "NSAID use", or a question ("what about aspirin?")
        else:
            earlier = [(m.start - clause[0], m.end - clause[0]) for m in in_clause if m.end <= mention.start]
            pre = _pre_status(text[clause[0]:mention.start], earlier)
            if pre == "neg":
                status = "avoided"
            elif pre == "desc":
                status = "descriptive"
            else:
                post = _post_status(text, mention, clause[1], in_clause)
                if post == "neg" or _retracted(text, clause, clauses, sentence):
                    status = "avoided"
                elif pre == "pos" or post == "pos":
                    status = "recommended"
                else:
                    status = "default"
        dose = None
        if mention.drug is not None and status in ("recommended", "default"):
            dose = _find_dose(text, mention, clause, mentions, sentence)
        if status == "default":
            # a bare mention is a recommendation, except a drug the patient already takes
            status = "recommended" if (mention.drug not in current_drugs or dose is not None) else "descriptive"
        out.append(Reading(mention, status, clause, dose))
    return out
