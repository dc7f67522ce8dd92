"""The case library a session works from: the bundled cases (or a folder given),
falling back to a few built-in cases, plus the cases users upload."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

from .clinical.cases import Case, CaseFormatError, SafetyInfo, default_cases_dir, load_library
from .rollout.conclusion import candidates as conclusion_candidates
from .rollout.prompts import build_messages

BUILTIN_CASES = [
    Case(
        id="builtin-appendicitis",
        question=(
            "A 22-year-old man has 18 hours of periumbilical pain that moved to the right lower "
            "quadrant, with nausea, a temperature of 38.1 C and rebound tenderness at McBurney's "
            "point. White cell count is 14,000/uL. What is the most likely diagnosis?"
        ),
        answer="acute appendicitis",
        aliases=["appendicitis"],
        distractors=["mesenteric adenitis", "Crohn disease", "renal colic"],
        specialty="surgery",
        icd10="K35.80",
    ),
    Case(
        id="builtin-dka",
        question=(
            "A 19-year-old woman with type 1 diabetes has vomiting, abdominal pain and deep rapid "
            "breathing. Glucose is 520 mg/dL, pH 7.12, bicarbonate 9 mEq/L, and urine ketones are "
            "strongly positive. What is the most likely diagnosis?"
        ),
        answer="diabetic ketoacidosis",
        aliases=["DKA"],
        distractors=["hyperosmolar hyperglycemic state", "gastroenteritis", "lactic acidosis"],
        specialty="endocrinology",
        icd10="E10.10",
        safety=SafetyInfo(emergency=True, red_flags=["insulin|fluids|emergency|urgent"]),
    ),
    Case(
        id="builtin-pe",
        question=(
            "A 58-year-old woman, 5 days after hip replacement, has sudden pleuritic chest pain and "
            "shortness of breath. Heart rate 118/min, oxygen saturation 89% on room air, and a "
            "swollen left calf. What is the most likely diagnosis?"
        ),
        answer="pulmonary embolism",
        aliases=["PE"],
        distractors=["pneumonia", "myocardial infarction", "pneumothorax"],
        specialty="pulmonology",
        icd10="I26.99",
        safety=SafetyInfo(emergency=True, red_flags=["anticoagula|heparin|CT|emergency|urgent"]),
    ),
]


def load_case_library(directory: str | Path | None = None) -> tuple[list[Case], str | None]:
    """(the cases of ``directory`` (default: the bundled library), a problem or None);
    the built-in cases when the folder is missing, unreadable or empty."""
    directory = Path(directory) if directory else default_cases_dir()
    try:
        cases = load_library(directory)
    except (CaseFormatError, FileNotFoundError) as err:
        return list(BUILTIN_CASES), f"Case library not loaded ({err}); showing the built-in cases."
    return (cases, None) if cases else (list(BUILTIN_CASES), None)


def library_or_builtin() -> list[Case]:
    """The bundled case library when it is there, else a few built-in cases."""
    return load_case_library()[0]


class CaseLibrary(Mapping):
    """Cases by id, in the order they were loaded or added (a read-only mapping; ``add``
    takes uploads). ``problem`` says why the library fell back to the built-in cases."""

    def __init__(self, cases: list[Case], problem: str | None = None):
        self._cases: dict[str, Case] = {c.id: c for c in cases}
        self.problem = problem

    @classmethod
    def load(cls, directory: str | Path | None = None) -> "CaseLibrary":
        """The library of ``directory`` (default: the bundled one); the built-in cases when it is
        missing, unreadable or empty."""
        return cls(*load_case_library(directory))

    def __getitem__(self, case_id: str) -> Case:
        return self._cases[case_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def case(self, case_id: str) -> Case:
        """The case ``case_id``; KeyError naming it when the library has none."""
        if case_id not in self._cases:
            raise KeyError(f"unknown case {case_id!r}")
        return self._cases[case_id]

    def specialties(self) -> list[str]:
        """The specialties of the library's cases, sorted, each once."""
        return sorted({c.specialty for c in self._cases.values()})

    def add(self, cases: list[Case]) -> list[Case]:
        """Add uploaded cases, all or none: an id already used by a different case, or a
        case that cannot make a prompt, is a ValueError naming it."""
        clashes = [c.id for c in cases if c.id in self._cases and self._cases[c.id] != c]
        if clashes:
            raise ValueError(f"case id(s) already in the library with other content: {', '.join(clashes[:5])}")
        for c in cases:
            try:
                build_messages(c)
                conclusion_candidates(c)
            except (ValueError, IndexError, KeyError) as err:
                raise ValueError(f"case {c.id!r} cannot be prompted: {err}") from None
        self._cases.update({c.id: c for c in cases})
        return cases
