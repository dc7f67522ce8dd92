"""The safety checker's knowledge: drugs, classes, contraindication rules and allergy
cross-reactivity, read from the editable ``data/safety_kb.json`` (its ``_doc`` explains every
field) and validated once at load, every problem named by its place in the file."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .safety_text import norm_key, term_regex

DEFAULT_KNOWLEDGE_PATH = Path(__file__).resolve().parent / "data" / "safety_kb.json"
SEVERITIES = ("hard", "soft")


@dataclass(frozen=True)
class DrugInfo:
    """One drug: its canonical name, aliases, class ids and adult maximum daily dose in mg (None: no ceiling)."""

    name: str
    aliases: tuple[str, ...]
    classes: tuple[str, ...]
    max_daily_mg: float | None


@dataclass(frozen=True)
class DrugClass:
    """A drug class: its id, the label used in messages, its aliases and its member drugs."""

    id: str
    label: str
    aliases: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """One contraindication rule: the drugs it covers, what triggers it (conditions, current medications,
    pregnancy; ``require`` any or all of them), its severity and the reason shown."""

    id: str
    drugs: frozenset[str]
    classes: frozenset[str]
    except_drugs: frozenset[str]
    condition_terms: tuple[str, ...]
    unless_condition_terms: tuple[str, ...]
    also_if_medication: tuple[str, ...]
    pregnancy: bool
    require: str
    severity: str
    reason: str
    condition_re: re.Pattern | None = field(default=None, compare=False, repr=False)
    unless_re: re.Pattern | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Forbid:
    """What an allergy forbids: a drug or a class (the other is None), with the severity and reason."""

    drug: str | None
    cls: str | None
    severity: str
    reason: str


@dataclass(frozen=True)
class AllergyEntry:
    """An allergy term with its aliases, what it forbids (cross-reactivity) and its compiled matcher."""

    term: str
    aliases: tuple[str, ...]
    forbids: tuple[Forbid, ...]
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Mention:
    """A drug or class name found in a text: its span [start, end), the text, and what it names."""

    start: int
    end: int
    text: str
    drug: str | None  # canonical drug name, or None for a class mention
    cls: str | None  # class id for a class mention


class SafetyKnowledge:
    """The validated knowledge table with its compiled matchers. Build it with :func:`load_knowledge`."""

    def __init__(
        self,
        drugs: dict[str, DrugInfo],
        classes: dict[str, DrugClass],
        rules: tuple[Rule, ...],
        allergies: tuple[AllergyEntry, ...],
        source: str = "<memory>",
        red_flag_severity: str = "soft",
    ):
        self.red_flag_severity = red_flag_severity  # severity of a missing red flag
        self.drugs = drugs
        self.classes = classes
        self.rules = rules
        self.allergies = allergies
        self.source = source
        self._lookup: dict[str, tuple[str, str]] = {}
        for d in drugs.values():
            for a in (d.name, *d.aliases):
                self._lookup[norm_key(a)] = ("drug", d.name)
        for c in classes.values():
            for a in c.aliases:
                self._lookup[norm_key(a)] = ("class", c.id)
        names = [d.name for d in drugs.values()] + [a for d in drugs.values() for a in d.aliases]
        names += [a for c in classes.values() for a in c.aliases]
        self._mention_re = term_regex(names, acronyms_exact=False)

    def __repr__(self) -> str:
        return (
            f"SafetyKnowledge({len(self.drugs)} drugs, {len(self.classes)} classes, "
            f"{len(self.rules)} rules, {len(self.allergies)} allergy entries from {self.source})"
        )

    # -- lookups ---------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, str] | None:
        """("drug", canonical) or ("class", id) for a drug/class name or alias, else None."""
        key = norm_key(name)
        for k in (key, key[:-1] if key.endswith("s") else None, key[:-2] if key.endswith("es") else None):
            if k and k in self._lookup:
                return self._lookup[k]
        return None

    def find_mentions(self, text: str) -> list[Mention]:
        """Every drug/class mention in ``text``, left to right, longest alias first."""
        out = []
        if self._mention_re is None:
            return out
        for m in self._mention_re.finditer(text):
            hit = self.resolve(m.group(0))
            if hit is None:  # pragma: no cover - the regex is built from the lookup
                continue
            kind, name = hit
            out.append(Mention(m.start(), m.end(), m.group(0), name if kind == "drug" else None,
                               name if kind == "class" else None))
        return out

    def classes_of(self, drug: str) -> tuple[str, ...]:
        """The class ids of the canonical drug ``drug``."""
        return self.drugs[drug].classes

    def display(self, mention: Mention) -> str:
        """The mention as messages name it: the drug (with the alias written, if another), or the class label."""
        if mention.drug is not None:
            if norm_key(mention.text).rstrip("s") in (norm_key(mention.drug), norm_key(mention.drug).rstrip("s")):
                return mention.drug
            return f"{mention.drug} ({mention.text})"
        return self.classes[mention.cls].label


# -- validation ---------------------------------------------------------------


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str):
        raise ValueError(f"safety knowledge {self.source}: {where}: {problem}")

    def obj(self, value, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be an object, got {type(value).__name__}")
        return value

    def keys(self, value: dict, where: str, allowed: set[str], required: set[str] = frozenset()):
        for k in value:
            if not isinstance(k, str) or (k not in allowed and not k.startswith("_")):
                self.fail(where, f"unknown key {k!r} (allowed: {', '.join(sorted(allowed))}; '_'-keys are comments)")
        for k in required:
            if k not in value:
                self.fail(where, f"missing required key {k!r}")

    def str_list(self, value, where: str, *, allow_empty: bool = True) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(where, f"must be a list of strings, got {type(value).__name__}")
        for i, x in enumerate(value):
            if not isinstance(x, str) or not x.strip():
                self.fail(f"{where}[{i}]", f"must be a non-empty string, got {x!r}")
        if not allow_empty and not value:
            self.fail(where, "must not be empty")
        return [x.strip() for x in value]

    def text(self, value, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def severity(self, value, where: str) -> str:
        if value not in SEVERITIES:
            self.fail(where, f"severity must be 'hard' or 'soft', got {value!r}")
        return value


def _parse_knowledge(data: Any, source: str) -> SafetyKnowledge:
    v = _Validator(source)
    top = v.obj(data, "top level")
    v.keys(top, "top level", {"drugs", "classes", "term_sets", "contraindications", "allergy_cross", "red_flag_severity"},
           {"drugs", "classes", "contraindications", "allergy_cross"})
    if not isinstance(top.get("_doc"), str) or not top["_doc"].strip():
        v.fail("top level", "missing the '_doc' string that documents the table")

    # classes (labels and aliases; members come from drugs)
    raw_classes = v.obj(top["classes"], "classes")
    class_defs: dict[str, tuple[str, list[str]]] = {}
    for cid, entry in raw_classes.items():
        if cid.startswith("_"):
            continue
        where = f"classes.{cid}"
        v.obj(entry, where)
        v.keys(entry, where, {"label", "aliases"}, {"label", "aliases"})
        class_defs[cid] = (v.text(entry["label"], f"{where}.label"), v.str_list(entry["aliases"], f"{where}.aliases"))

    # drugs
    raw_drugs = v.obj(top["drugs"], "drugs")
    drugs: dict[str, DrugInfo] = {}
    for name, entry in raw_drugs.items():
        if name.startswith("_"):
            continue
        where = f"drugs.{name}"
        if name != name.strip().lower() or not name.strip():
            v.fail(where, "drug names must be lower case without surrounding spaces")
        v.obj(entry, where)
        v.keys(entry, where, {"aliases", "classes", "max_daily_mg"}, {"aliases", "classes", "max_daily_mg"})
        aliases = v.str_list(entry["aliases"], f"{where}.aliases")
        classes = v.str_list(entry["classes"], f"{where}.classes")
        for c in classes:
            if c not in class_defs:
                v.fail(f"{where}.classes", f"unknown class {c!r} (declare it in 'classes')")
        mx = entry["max_daily_mg"]
        if mx is not None and (isinstance(mx, bool) or not isinstance(mx, (int, float))
                               or not math.isfinite(mx) or mx <= 0):
            v.fail(f"{where}.max_daily_mg", f"must be a positive number of mg or null, got {mx!r}")
        drugs[name] = DrugInfo(name, tuple(aliases), tuple(classes), None if mx is None else float(mx))
    if not drugs:
        v.fail("drugs", "no drugs defined")

    classes = {
        cid: DrugClass(cid, label, tuple(aliases), tuple(d.name for d in drugs.values() if cid in d.classes))
        for cid, (label, aliases) in class_defs.items()
    }

    # every alias names exactly one drug or class
    owner: dict[str, str] = {}
    for d in drugs.values():
        for a in (d.name, *d.aliases):
            k, who = norm_key(a), f"drug {d.name!r}"
            if owner.setdefault(k, who) != who:
                v.fail(f"drugs.{d.name}.aliases", f"name {a!r} already belongs to {owner[k]}")
    for c in classes.values():
        for a in c.aliases:
            k, who = norm_key(a), f"class {c.id!r}"
            if owner.setdefault(k, who) != who:
                v.fail(f"classes.{c.id}.aliases", f"name {a!r} already belongs to {owner[k]}")

    # term sets
    term_sets: dict[str, list[str]] = {}
    raw_sets = top.get("term_sets", {})
    v.obj(raw_sets, "term_sets")
    for sname, terms in raw_sets.items():
        if sname.startswith("_"):
            continue
        term_sets[sname] = v.str_list(terms, f"term_sets.{sname}", allow_empty=False)

    def expand(terms: list[str], where: str) -> tuple[str, ...]:
        out: list[str] = []
        for t in terms:
            if t.startswith("@"):
                if t[1:] not in term_sets:
                    v.fail(where, f"unknown term set {t!r} (define it in 'term_sets')")
                out.extend(term_sets[t[1:]])
            else:
                out.append(t)
        return tuple(dict.fromkeys(out))

    def known_drug_or_class(names: list[str], where: str, *, drugs_only: bool = False):
        for n in names:
            if n in drugs:
                continue
            if n in classes and not drugs_only:
                continue
            v.fail(where, f"unknown {'drug' if drugs_only else 'drug or class'} {n!r}")

    # contraindication rules
    raw_rules = top["contraindications"]
    if not isinstance(raw_rules, list):
        v.fail("contraindications", "must be a list of rules")
    rules: list[Rule] = []
    seen_ids: set[str] = set()
    allowed = {"id", "drug", "class", "except_drugs", "condition_terms", "unless_condition_terms",
               "also_if_medication", "pregnancy", "require", "severity", "reason"}
    for i, entry in enumerate(raw_rules):
        where = f"contraindications[{i}]"
        v.obj(entry, where)
        rid = entry.get("id", f"rule-{i}")
        if not isinstance(rid, str) or not rid.strip():
            v.fail(where, f"id must be a non-empty string, got {rid!r}")
        where = f"contraindications[{i}] ({rid})"
        if rid in seen_ids:
            v.fail(where, f"duplicate rule id {rid!r}")
        seen_ids.add(rid)
        v.keys(entry, where, allowed, {"severity", "reason"})
        rdrugs = v.str_list(entry.get("drug", []), f"{where}.drug")
        rclasses = v.str_list(entry.get("class", []), f"{where}.class")
        if not rdrugs and not rclasses:
            v.fail(where, "needs a 'drug' or a 'class'")
        known_drug_or_class(rdrugs, f"{where}.drug", drugs_only=True)
        for c in rclasses:
            if c not in classes:
                v.fail(f"{where}.class", f"unknown class {c!r}")
        except_drugs = v.str_list(entry.get("except_drugs", []), f"{where}.except_drugs")
        known_drug_or_class(except_drugs, f"{where}.except_drugs", drugs_only=True)
        cond = expand(v.str_list(entry.get("condition_terms", []), f"{where}.condition_terms"), f"{where}.condition_terms")
        unless = expand(v.str_list(entry.get("unless_condition_terms", []), f"{where}.unless_condition_terms"),
                        f"{where}.unless_condition_terms")
        meds = v.str_list(entry.get("also_if_medication", []), f"{where}.also_if_medication")
        known_drug_or_class(meds, f"{where}.also_if_medication")
        preg = entry.get("pregnancy", False)
        if not isinstance(preg, bool):
            v.fail(f"{where}.pregnancy", f"must be true or false, got {preg!r}")
        require = entry.get("require", "any")
        if require not in ("any", "all"):
            v.fail(f"{where}.require", f"must be 'any' or 'all', got {require!r}")
        if not cond and not meds and not preg:
            v.fail(where, "has no trigger: give condition_terms, also_if_medication or pregnancy: true")
        rules.append(Rule(
            id=rid, drugs=frozenset(rdrugs), classes=frozenset(rclasses), except_drugs=frozenset(except_drugs),
            condition_terms=cond, unless_condition_terms=unless, also_if_medication=tuple(meds),
            pregnancy=preg, require=require, severity=v.severity(entry["severity"], f"{where}.severity"),
            reason=v.text(entry["reason"], f"{where}.reason"),
            condition_re=term_regex(cond, acronyms_exact=True), unless_re=term_regex(unless, acronyms_exact=True),
        ))

    # allergy cross-reactivity
    raw_allergy = v.obj(top["allergy_cross"], "allergy_cross")
    allergies: list[AllergyEntry] = []
    for term, entry in raw_allergy.items():
        if term.startswith("_"):
            continue
        where = f"allergy_cross.{term}"
        v.obj(entry, where)
        v.keys(entry, where, {"aliases", "forbids"}, {"forbids"})
        aliases = v.str_list(entry.get("aliases", []), f"{where}.aliases")
        raw_f = entry["forbids"]
        if not isinstance(raw_f, list) or not raw_f:
            v.fail(f"{where}.forbids", "must be a non-empty list of {drug|class, severity, reason}")
        forbids = []
        for j, f in enumerate(raw_f):
            fw = f"{where}.forbids[{j}]"
            v.obj(f, fw)
            v.keys(f, fw, {"drug", "class", "severity", "reason"}, {"severity"})
            if ("drug" in f) == ("class" in f):
                v.fail(fw, "needs exactly one of 'drug' or 'class'")
            if "drug" in f and f["drug"] not in drugs:
                v.fail(f"{fw}.drug", f"unknown drug {f['drug']!r}")
            if "class" in f and f["class"] not in classes:
                v.fail(f"{fw}.class", f"unknown class {f['class']!r}")
            reason = v.text(f["reason"], f"{fw}.reason") if "reason" in f else ""
            forbids.append(Forbid(f.get("drug"), f.get("class"), v.severity(f["severity"], f"{fw}.severity"), reason))
        allergies.append(AllergyEntry(term, tuple(aliases), tuple(forbids),
                                      term_regex([term, *aliases], acronyms_exact=True)))

    red_flag_severity = v.severity(top.get("red_flag_severity", "soft"), "red_flag_severity")
    return SafetyKnowledge(drugs, classes, tuple(rules), tuple(allergies), source, red_flag_severity)


_CACHE: dict[str, tuple[int, SafetyKnowledge]] = {}


def load_knowledge(path: str | Path | None = None) -> SafetyKnowledge:
    """Load and validate the knowledge table (default: ``rlhf_core/clinical/data/safety_kb.json``).

    Cached per file and modification time, so an edited table is picked up on the
    next call. Raises ``ValueError`` naming the problem when the table is malformed
    and ``FileNotFoundError`` when it is missing.
    """
    p = Path(path) if path is not None else DEFAULT_KNOWLEDGE_PATH
    p = p.resolve()
    mtime = p.stat().st_mtime_ns
    cached = _CACHE.get(str(p))
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"safety knowledge {p}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    kb = _parse_knowledge(data, str(p))
    _CACHE[str(p)] = (mtime, kb)
    return kb
