"""The case record: ``Case`` and its ``SafetyInfo``, the limits every case file is held to,
and the errors that name the file and line of a problem."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path



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
        """The ``SafetyInfo`` of a ``to_dict`` dict (None or missing keys: the defaults)."""
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
        """The safety facts as a JSON-ready dict (the inverse of ``from_dict``)."""
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
        """True when the case has options to choose from."""
        return bool(self.options)

    def to_dict(self) -> dict:
        """The case as a JSON-ready dict (the inverse of ``from_dict``)."""
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
        """The ``Case`` of a ``to_dict`` dict (missing optional fields: the defaults)."""
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
    return Path(__file__).resolve().parents[2] / "cases"
