"""A scripted clinical scenario for the UI tests (handlers and browser).

The tiny-random model's own samples are random bytes that never pass the
verifier, so the tests plug a ``ScriptedBackend`` into the control room: the
texts below are tokenised and scored by the real tiny policy and reference, so
the DPO / GRPO updates on them are real computations. The real verifier and
safety checker judge them.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.clinical.cases import Case, SafetyInfo
from ui.backends import ScriptedBackend

CASE = Case(
    id="ui-strep",
    question=(
        "A 9-year-old boy has 2 days of sore throat and fever of 38.9 C, tonsillar exudate, tender anterior "
        "cervical nodes and no cough. A rapid antigen test is positive. He is allergic to penicillin. "
        "What is the most likely diagnosis?"
    ),
    answer="streptococcal pharyngitis",
    aliases=["strep throat"],
    distractors=["infectious mononucleosis", "viral pharyngitis"],
    specialty="pediatrics",
    safety=SafetyInfo(allergies=["penicillin"]),
)
OTHER = Case(
    id="ui-appendicitis",
    question="A 22-year-old man has right lower quadrant pain, fever and rebound tenderness. What is the most likely diagnosis?",
    answer="acute appendicitis",
    aliases=["appendicitis"],
    distractors=["mesenteric adenitis"],
    specialty="surgery",
)
# held out for evaluation by evaluate.split_cases (its id hashes below 0.2); CASE and OTHER train
HELD_OUT = Case(
    id="ui-cellulitis",
    question="A 60-year-old diabetic has a hot, red, tender, spreading area on the shin and a fever. What is the diagnosis?",
    answer="cellulitis",
    distractors=["deep vein thrombosis"],
    specialty="dermatology",
)

XSS = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">"
SAFE = ("Exudate, fever, tender nodes and no cough give a Centor score of 4 and the rapid test is positive. "
        "Avoid penicillins given the allergy; azithromycin is an option.\nFinal diagnosis: streptococcal pharyngitis")
SCRIPTED = (f"{XSS} Tonsillar exudate with fever and a positive rapid antigen test.\n"
            "Final diagnosis: streptococcal pharyngitis")
HARD = ("Exudate, fever and a positive rapid test make this bacterial. Treat with amoxicillin 500 mg twice daily "
        "for 10 days.\nFinal diagnosis: streptococcal pharyngitis")
WRONG = "Exudative tonsillitis in a child may be EBV; a monospot test would help.\nFinal diagnosis: infectious mononucleosis"
FOURTH = ("Group A streptococcus is confirmed by the rapid antigen test; oral clindamycin suits the "
          "penicillin-allergic child.\nFinal diagnosis: streptococcal pharyngitis")

# Batch 1: SAFE, SCRIPTED, HARD accepted, WRONG rejected. Batch 2: FOURTH accepted, the rest duplicates.
STREP_TEXTS = [SAFE, SCRIPTED, HARD, WRONG, FOURTH]


def script(case: Case, hint: str | None) -> list[str]:
    if case.id == CASE.id:
        return STREP_TEXTS
    why = "The history, the examination and the tests point to one cause. "
    return [
        f"{why}Migratory pain with rebound tenderness.\nFinal diagnosis: {case.answer}",
        f"{why}Fever and leukocytosis support it.\nFinal diagnosis: {case.answer}",
        f"{why}Imaging would confirm; surgery should be consulted urgently.\nFinal diagnosis: {case.answer}",
        f"{why}Could be lymph nodes.\nFinal diagnosis: {(case.distractors or ['gastroenteritis'])[0]}",
    ]


def backend(delay: float = 0.0) -> ScriptedBackend:
    return ScriptedBackend(script, delay=delay)


def write_cases(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ui_cases.jsonl"
    path.write_text("\n".join(json.dumps(c.to_dict()) for c in (CASE, OTHER, HELD_OUT)) + "\n")
    return directory
