"""Picking a case: the library filtered by specialty, or an uploaded case file."""
from __future__ import annotations

import os
import warnings

import gradio as gr

from rlhf_core.clinical.cases import CaseFormatError, load_cases
from rlhf_core.rollout.prompts import case_text

from .batch import CLEARED_OUTPUTS, cleared_view
from .charts import belief_figure
from .views import case_meta_html, status_html
from .wiring import engine_event, light_event

ALL = "All specialties"


def case_choices(room, specialty: str | None = None) -> list[tuple[str, str]]:
    """(label, case id) for the picker; held-out cases say so in their label."""
    out = []
    heldout = room.heldout_ids()
    for case in room.cases.values():
        if specialty and specialty != ALL and case.specialty != specialty:
            continue
        question = " ".join(case.question.split())
        short = question if len(question) <= 70 else question[:67] + "…"
        mark = " (held out for evaluation)" if case.id in heldout else ""
        out.append((f"{case.id}{mark} · {short}", case.id))
    return out


def case_count(room, choices: list[tuple[str, str]], specialty: str | None = None) -> str:
    """The picker's counter: how many cases it lists (of how many), and how many of those are held out."""
    total, held = len(room.cases), len(room.heldout_ids() & {value for _, value in choices})
    if specialty and specialty != ALL and len(choices) != total:
        return f"{len(choices)} of {total} cases ({specialty}), {held} held out for evaluation"
    return f"{total} cases in the library, {held} held out for evaluation"


def filter_cases(room, specialty: str, current: str | None = None) -> dict:
    """Narrow the picker to one specialty, keeping the picked case when it is in it."""
    choices = case_choices(room, specialty)
    keep = current if current in {value for _, value in choices} else None
    return {"case_picker": gr.update(choices=choices, value=keep, info=case_count(room, choices, specialty))}


def pick_case(room, session: dict, case_id: str | None) -> dict:
    """Show the picked case; the traces of another case are cleared from the cards."""
    batch = session.get("batch")
    cleared = {}
    if batch and batch.get("case_id") != case_id:
        session, cleared = {**session, "batch": None}, cleared_view()
    session = {**session, "case_id": case_id or None}
    if not case_id or case_id not in room.cases:
        return {"session": session, "vignette": "", "case_meta": case_meta_html(None), **cleared}
    case = room.case(case_id)
    return {"session": session, "vignette": case_text(case),
            "case_meta": case_meta_html(case, heldout=case.id in room.heldout_ids()), **cleared}


def upload_cases(room, session: dict, path: str | None) -> dict:
    """Load an uploaded case file; problems are shown, never raised."""
    if not path:
        return {}
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cases = load_cases(path)
        room.add_cases(cases)
    except (CaseFormatError, ValueError, OSError) as err:
        message = str(err).replace(str(path), name)
        return {"upload_status": status_html(f"Could not load {name}: {message}", "error"),
                "_warning": f"Could not load {name}"}
    notes = [str(w.message).replace(str(path), name) for w in caught]
    text = f"Loaded {len(cases)} case(s) from {name}."
    if notes:
        text += f" {len(notes)} note(s): " + "; ".join(notes[:3])
    first = cases[0].id
    out = pick_case(room, session, first)
    choices = case_choices(room)
    out.update({
        "upload_status": status_html(text, "warn" if notes else "ok"),
        "specialty": gr.update(choices=[ALL] + room.specialties(), value=ALL),
        "case_picker": gr.update(choices=choices, value=first, info=case_count(room, choices)),
    })
    return out


def build_case_panel(room, ui: dict) -> None:
    ui["specialty"] = gr.Dropdown([ALL] + room.specialties(), value=ALL, label="Specialty", elem_id="specialty-filter")
    choices = case_choices(room)
    ui["case_picker"] = gr.Dropdown(choices, value=None, label="Case", elem_id="case-picker",
                                    info=case_count(room, choices), filterable=True)
    with gr.Accordion("Upload a case file (.jsonl, .json, .csv)", open=False):
        ui["case_upload"] = gr.File(label="Case file", file_types=[".jsonl", ".ndjson", ".json", ".csv"],
                                    file_count="single", type="filepath", elem_id="case-upload", height=90)
        ui["upload_status"] = gr.HTML("", elem_id="upload-status")
    if room.case_problem:
        gr.HTML(status_html(room.case_problem, "warn"), elem_id="library-status")
    ui["vignette"] = gr.Textbox(label="Vignette", lines=7, max_lines=16, interactive=False, elem_id="vignette")
    ui["case_meta"] = gr.HTML(case_meta_html(None), elem_id="case-meta")
    ui["belief"] = gr.Plot(belief_figure(None, None), show_label=False, elem_id="belief-chart")


def belief_view(room, session: dict) -> dict:
    """The belief chart for the session's case (reference vs the policy now)."""
    case_id = (session or {}).get("case_id")
    if not case_id or case_id not in room.cases:
        return {"belief": belief_figure(None, None)}
    found = room.beliefs(case_id)
    return {"belief": belief_figure(found["reference"], found["policy"], found["version"])}


def bind_case_panel(room, ui: dict) -> None:
    light_event(ui["specialty"].input, filter_cases, room, ui, ["specialty", "case_picker"], ["case_picker"])
    picked = light_event(ui["case_picker"].change, pick_case, room, ui, ["session", "case_picker"],
                         ["session", "vignette", "case_meta", *CLEARED_OUTPUTS])
    engine_event(picked.then, belief_view, room, ui, ["session"], ["belief"], show_progress="hidden")
    light_event(ui["case_upload"].upload, upload_cases, room, ui, ["session", "case_upload"],
                ["session", "vignette", "case_meta", "upload_status", "specialty", "case_picker", *CLEARED_OUTPUTS])
