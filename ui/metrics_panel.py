"""The live charts and the table of the last updates, shared by every session."""
from __future__ import annotations

import gradio as gr

from .charts import CHARTS, TABLE_COLUMNS, all_figures, updates_table
from .views import header_html, model_info
from .wiring import light_event

REFRESH_SECONDS = 3.0  # how often a browser checks for other sessions' updates


def metrics_view(room) -> dict:
    """Charts, table and header from the room's history (one snapshot)."""
    rows = room.metrics()
    out = {f"chart_{name}": fig for name, fig in all_figures(rows, room.run).items()}
    out["table"] = updates_table(rows)
    info = room.describe()
    out["header"] = header_html(info)
    out["model_info"] = model_info(info)
    return out


def refresh(room, seen: int | None) -> dict:
    """Timer tick: re-render only when the shared history changed since this browser last looked.
    (The revision seen lives in its own state, so a tick never overwrites the session's traces.)"""
    revision = room.revision
    if seen == revision:
        return {}
    return {"seen_revision": revision, **metrics_view(room)}


def build_charts(room, ui: dict) -> None:
    figures = all_figures(room.metrics(), room.run)
    names = list(CHARTS)
    for row in (names[:3], names[3:5], names[5:]):  # what changed first: belief, distance, loss
        with gr.Row():
            for name in row:
                ui[f"chart_{name}"] = gr.Plot(figures[name], show_label=False, elem_id=f"chart-{name}")
    ui["table"] = gr.Dataframe(updates_table(room.metrics()), headers=TABLE_COLUMNS, label="Last updates",
                               interactive=False, elem_id="updates-table", max_height=300, wrap=False)


OUTPUTS = ["seen_revision", "header", "model_info", "table", *[f"chart_{n}" for n in CHARTS]]


def bind_metrics(room, ui: dict) -> None:
    ui["timer"] = gr.Timer(REFRESH_SECONDS)
    light_event(ui["timer"].tick, refresh, room, ui, ["seen_revision"], OUTPUTS)
