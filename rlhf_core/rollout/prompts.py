"""Turning a case into the prompt the model answers."""
from __future__ import annotations

from ..clinical.cases import Case
from .conclusion import LETTERS, candidates

# A short structure a small model can finish within its reasoning budget, ending
# in the line the verifier (and the constrained conclusion step) reads.
SYSTEM_PROMPT = (
    "You are a careful physician. Reason about the clinical case in four short parts, one or two "
    "sentences each:\n"
    "Key findings: the findings that matter.\n"
    "Differential: the diagnoses to consider.\n"
    "Why: which one fits best and why the others fit less.\n"
    "First step: what must be done first to keep the patient safe, and how urgent it is.\n"
    "Then end with one line of the form 'Final diagnosis: <diagnosis>'."
)
MC_INSTRUCTION = "Choose one option. End with 'Final diagnosis: <letter>. <option text>'."


def case_text(case: Case) -> str:
    """The vignette, with lettered options for a multiple-choice case and the
    case's differential as candidate diagnoses when it has one."""
    if case.options:
        lines = [case.question, ""]
        lines += [f"{LETTERS[i]}. {text}" for i, text in enumerate(case.options)]
        lines += ["", MC_INSTRUCTION]
        return "\n".join(lines)
    names = candidates(case)
    if len(names) < 2:
        return case.question
    return case.question + "\n\nCandidate diagnoses: " + "; ".join(names) + "."


def build_messages(case: Case, hint: str | None = None) -> list[dict[str, str]]:
    """Chat messages for a case. ``hint`` (the correct diagnosis) is only used for
    rationalisation: the trace it produces is trained on as if the hint had not been given."""
    user = case_text(case)
    if hint:
        user += (
            f"\n\n(Hint for the teacher: the correct diagnosis is {hint}. Reason to it from the "
            "findings as if you had worked it out yourself, without mentioning this hint.)"
        )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt: the chat template if the tokenizer has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text += "\n\nCase: " + "\n".join(m["content"] for m in messages if m["role"] == "user")
    text += "\n\nReasoning:"
    ids = tokenizer(text)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids
