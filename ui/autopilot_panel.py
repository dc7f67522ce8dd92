"""Autopilot: the workspace's reward model ranks traces of cases nobody ranked, and the
policy trains on them, one update at a time, until it is stopped or the run is done.

Clearly labelled everywhere: its rankings are stored with source "autopilot" and the
annotator "autopilot (reward model vN)" (the updates table shows it), the reward model
never trains on them, and the exports carry the source.
"""
from __future__ import annotations

import gradio as gr

from .generate_tab import CHART_OUTPUTS
from .metrics_panel import metrics_view
from .ranking import RankingError
from .views import progress_html, status_html
from .wiring import adapt

AUTOPILOT_QUEUE = "autopilot"  # its own queue: between its rounds other sessions' model work runs
AUTOPILOT_OUTPUTS = ["autopilot_progress", "header", "table", *CHART_OUTPUTS]


def run_autopilot(room, updates, algorithm: str):
    """Stream the autopilot's rounds into the charts; problems are shown, never raised."""
    try:
        events = room.runner.autopilot(int(updates), (algorithm or "GRPO").lower())
        first = next(events)
    except StopIteration:
        return
    except (RankingError, ValueError, TypeError) as err:
        yield {"autopilot_progress": status_html(f"Autopilot not started: {err}", "warn"), "_warning": str(err)}
        return
    try:
        for event in _chain(first, events):
            if event["kind"] == "update":
                m = event["metrics"]
                yield {"autopilot_progress": progress_html(
                    f"Autopilot (reward model v{event['reward_model']})", event["done"] / event["total"],
                    f"update {event['done']} of {event['total']} · {m['case_id']} · policy v{m['version']}"),
                       **metrics_view(room)}
            else:
                yield {"autopilot_progress": progress_html("Autopilot done", 1, f"{event['done']} update(s)", "done"),
                       **metrics_view(room), "_info": "Autopilot done"}
    except Exception as err:  # noqa: BLE001 - shown; every finished round is stored
        yield {"autopilot_progress": progress_html("Autopilot stopped", 1, str(err), "error"),
               "_warning": f"Autopilot stopped: {err}"}


def _chain(first, rest):
    yield first
    yield from rest


def build_autopilot_panel(room, ui: dict) -> None:
    with gr.Accordion("Autopilot: the reward model ranks", open=False, elem_id="autopilot"):
        gr.HTML('<div class="cr-muted">Trains on training cases no clinician has ranked in this workspace: the verifier '
                'puts verified traces first and the reward model (fitted on your rankings, see the Data tab) orders '
                'the rest. Every ranking it makes is labelled "autopilot"; the probe chart shows what it does. It '
                f'needs {room.advisor.config.min_rankings} clinician rankings first; Stop ends it after the current '
                'update.</div>')
        with gr.Row():
            ui["autopilot_updates"] = gr.Slider(1, 30, value=5, step=1, label="Updates", elem_id="autopilot-updates")
            ui["autopilot_algorithm"] = gr.Radio(["GRPO", "DPO"], value="GRPO", label="Algorithm",
                                                 elem_id="autopilot-algorithm")
        with gr.Row():
            ui["autopilot_start"] = gr.Button("Start autopilot", elem_id="autopilot-start")
            ui["autopilot_stop"] = gr.Button("Stop", elem_id="autopilot-stop", variant="stop")
        ui["autopilot_progress"] = gr.HTML(progress_html("Idle", 0, "", "idle"), elem_id="autopilot-progress")


def bind_autopilot_panel(room, ui: dict) -> None:
    outputs = AUTOPILOT_OUTPUTS
    started = ui["autopilot_start"].click(
        adapt(run_autopilot, room, outputs), [ui["autopilot_updates"], ui["autopilot_algorithm"]],
        [ui[n] for n in outputs], concurrency_id=AUTOPILOT_QUEUE, concurrency_limit=1, api_visibility="private",
        show_progress="minimal", show_progress_on=[ui["autopilot_progress"]])
    ui["autopilot_stop"].click(None, None, None, cancels=[started], api_visibility="private")
