"""The page's one-line "how to use" and its glossary: every term the charts and cards use,
explained once, where a newcomer looks first."""
from __future__ import annotations

import gradio as gr

from .views import esc

HOW_TO = ("Pick a case → <b>Generate traces</b> → order the verified traces best first (the ones below the line "
          "are trained as worse than all of them) → <b>Submit ranking &amp; update policy</b> → watch the charts and "
          "“What the model believes” move.")

GLOSSARY = {
    "policy, reference": "The policy is the model being taught; the reference is the frozen model it started as. "
                         "Version vN counts the updates applied.",
    "verified, rejected": "A trace is verified when its concluded diagnosis is the case's correct one; only "
                          "verified traces can be ranked.",
    "below the line": "Rejected traces offered as negatives: trained as worse than every ranked trace, never "
                      "rankable above one.",
    "rationalised": "A trace sampled with the answer given as a hint (when too few verified traces came without "
                    "one); labelled everywhere, a last resort.",
    "DPO, GRPO": "The two update rules: DPO trains on every ranked pair (better vs worse); GRPO gives each trace a "
                 "reward from its rank and follows the policy gradient. Their losses are on different scales.",
    "β (beta)": "How strongly an update is held near the reference: larger β, smaller steps away from it.",
    "KL, nats/token": "How far the policy has moved from the reference, in nats per token (0: identical), "
                      "measured on fixed probe completions so the line is cumulative.",
    "probe set": "A few taught and held-out cases whose probability of the correct diagnosis is scored after "
                 "every update: the curves that show learning.",
    "held out": "Cases kept for evaluation (the Evaluate tab, the probe's held-out line); training on one needs "
                "a second press.",
    "suggested order": "The reward model's guess at your ranking, learned from earlier rankings; never submitted "
                       "without you.",
    "autopilot": "GRPO on cases nobody ranked, ranked by the reward model behind the verifier; labelled "
                 "model-ranked in data and charts.",
    "run": "The updates since the policy was last reset or replaced; earlier runs are drawn in grey.",
}


def glossary_html() -> str:
    """The glossary as a definition list."""
    rows = "".join(f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>" for term, text in GLOSSARY.items())
    return f'<dl class="cr-glossary">{rows}</dl>'


def build_guide(ui: dict) -> None:
    """The how-to line and the (closed) glossary, under the header."""
    ui["how_to"] = gr.HTML(f'<div class="cr-muted" id="how-to">How to use: {HOW_TO}</div>', elem_id="how-to-line")
    with gr.Accordion("Glossary", open=False, elem_id="glossary"):
        gr.HTML(glossary_html())
