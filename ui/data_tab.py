"""The Data tab: workspaces, downloads, import and the inter-annotator agreement.

* Workspaces: each is one policy with its own history (rankings, updates,
  checkpoints) in the app's database. The table lists them; "Create" adds an
  empty one for the loaded model and offers to switch to it; switching asks for
  confirmation (it changes the policy every session trains, and discards this
  session's unsubmitted traces).
* Downloads: TRL preference pairs (conversational or plain text), the lossless
  rankings file, the agreement rows, and a .zip of the current checkpoint.
* Import: a rankings export or a TRL pair file from another site goes into the
  active workspace (it does not train the policy; it counts for exports and
  the agreement view; importing the same file twice adds nothing).
* Agreement: where two or more annotators ranked the same trace group,
  Kendall's tau between each pair of them (1 = same order, -1 = reversed).
"""
from __future__ import annotations

import os

import gradio as gr

from rlhf_core.storage.export import agreement_summary

from .batch import cards_view, ranking_view, traces_title
from .generate_tab import CARD_OUTPUTS, CHART_OUTPUTS
from .metrics_panel import metrics_view
from .reward_panel import bind_reward_panel, build_reward_panel
from .views import esc, status_html
from .wiring import engine_event, light_event

WORKSPACE_COLUMNS = ["workspace", "model", "mode", "rankings", "updates", "version", "active"]
AGREEMENT_COLUMNS = ["case", "annotators", "traces", "Kendall's tau per pair", "mean tau"]
EXPORTS = {  # elem_id suffix -> (format, button label)
    "trl": ("trl", "TRL pairs (conversational)"),
    "trl-text": ("trl-text", "TRL pairs (plain text)"),
    "rankings": ("rankings", "Rankings (lossless, re-importable)"),
    "agreement": ("agreement", "Agreement (Kendall's tau)"),
}
DATA_OUTPUTS = ["workspace_table", "workspace_choice", "agreement_table", "agreement_summary", "data_info"]
TEMPORARY_DB = ("This session's database is temporary: it is deleted when the app stops. Export what you want to keep, "
                "or start the app with a database (the default) to keep rankings, workspaces and checkpoints.")


# ------------------------------------------------------------------ views


def workspace_rows(room) -> list[list]:
    rows = []
    for w in room.policies.workspaces():
        version = w.get("version") if w["active"] else w.get("checkpoint_version")
        rows.append([w["name"], w.get("model") or "", w.get("mode") or "", w["rankings"], w["updates"],
                     "" if version is None else version, "●" if w["active"] else ""])
    return rows


def agreement_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        pairs = "; ".join(f"{p['a']} vs {p['b']}: {p['tau']:+.2f}" for p in r["pairs"])
        out.append([r["case_id"], ", ".join(r["annotators"]), r["n_traces"], pairs, round(r["mean_tau"], 3)])
    return out


def agreement_html(rows: list[dict]) -> str:
    summary = agreement_summary(rows)
    if not summary["groups"]:
        return status_html("No trace group has been ranked by two annotators yet. A second clinician can rank the "
                           "same traces with “Record ranking only” (Control room tab), or import another site's rankings.",
                           "info")
    text = (f"{summary['groups']} trace group(s) ranked by two or more annotators · "
            f"{summary['annotator_pairs']} annotator pair(s) · mean Kendall's tau "
            f"{summary['mean_tau']:+.3f} (1 = same order, 0 = unrelated, -1 = reversed)")
    disputed = [r for r in rows if r["mean_tau"] < 0]
    if not disputed:
        return status_html(text, "ok")
    cases = ", ".join(sorted({r["case_id"] for r in disputed})[:8])
    return status_html(f"{text}. To adjudicate: {len(disputed)} group(s) where the annotators mostly disagree "
                       f"(mean tau < 0; cases {cases}); the reward model gives their rankings a weight of "
                       f"(1 + tau) / 2, so they count for little until someone decides.", "warn")


def data_info_html(room) -> str:
    info = room.describe()
    where = (f'<div class="cr-muted">database {esc(info.get("db"))}</div>' if room.persistent
             else status_html(TEMPORARY_DB, "warn"))
    return (f'<div class="cr-case-meta"><div>Active workspace <b>{esc(info["workspace"])}</b> · {esc(info["model"])} '
            f'({esc(info["mode"])}) · policy v{info["version"]} · {info["rankings"]} rankings</div>{where}</div>')


def data_view(room) -> dict:
    """Everything the tab shows, fresh (other sessions may have changed it)."""
    rows = room.policies.agreement()
    names = [w[0] for w in workspace_rows(room)]
    return {"workspace_table": workspace_rows(room), "workspace_choice": gr.update(choices=names, value=room.workspace),
            "agreement_table": agreement_rows(rows), "agreement_summary": agreement_html(rows),
            "data_info": data_info_html(room)}


def refresh_data(room) -> dict:
    try:
        return data_view(room)
    except Exception as err:  # noqa: BLE001 - e.g. the database is locked by a long import elsewhere
        return {"data_info": status_html(f"Could not read the database: {err}", "error")}


# ------------------------------------------------------------ workspaces


def _ask_switch(room, session: dict, name: str, created: bool = False) -> dict:
    lines = [f"Every session will then rank and train the policy of workspace {name}: its latest checkpoint is loaded "
             f"(and any updates since it replayed); workspace {room.workspace} keeps its policy and history and is "
             "checkpointed first if it needs it."]
    batch = session.get("batch")
    if batch and not batch.get("submitted"):
        lines.append(f"Your unsubmitted ranking of {len(batch['traces'])} traces will be discarded: they were sampled "
                     f"from workspace {room.workspace}'s policy.")
    title = f"Workspace {name} created. Switch to it now" if created else f"Switch to workspace {name}"
    message = f'<div><b>{esc(title)}?</b></div><ul>{"".join(f"<li>{esc(x)}</li>" for x in lines)}</ul>'
    return {"session": {**session, "pending_workspace": name}, "workspace_confirm_panel": gr.update(visible=True),
            "workspace_confirm_message": message}


def create_workspace(room, session: dict, name: str) -> dict:
    name = (name or "").strip()
    if not name:
        return {"workspace_status": status_html("Enter a name for the new workspace.", "warn")}
    try:
        room.policies.create_workspace(name)
    except ValueError as err:
        return {"workspace_status": status_html(f"Could not create workspace: {err}", "error"),
                "_warning": f"Could not create workspace: {err}"}
    return {**data_view(room), **_ask_switch(room, session, name, created=True), "workspace_name": "",
            "workspace_status": status_html(f"Created workspace {name} for {room.engine.lm.name} "
                                            f"({room.engine.mode}); its policy starts from the reference.", "ok")}


def request_workspace_switch(room, session: dict, name: str | None) -> dict:
    if not name:
        return {"_warning": "Choose a workspace first."}
    if name == room.workspace:
        return {"workspace_status": status_html(f"Workspace {name} is already active.", "info")}
    return _ask_switch(room, session, name)


def cancel_workspace_switch(room, session: dict) -> dict:
    return {"session": {**session, "pending_workspace": None}, "workspace_confirm_panel": gr.update(visible=False),
            "workspace_confirm_message": ""}


def confirm_workspace_switch(room, session: dict):
    name = session.get("pending_workspace")
    session = {**session, "pending_workspace": None}
    if not name:
        yield {"session": session, "workspace_confirm_panel": gr.update(visible=False), "_warning": "Nothing to confirm."}
        return
    yield {"workspace_confirm_panel": gr.update(visible=False),
           "workspace_status": status_html(f"Opening workspace {name}…", "info")}
    try:
        info = room.policies.switch_workspace(name)
    except Exception as err:  # noqa: BLE001 - the previous workspace stays active
        yield {"session": session, "workspace_status": status_html(f"Could not switch: {err}", "error"),
               "_warning": f"Could not switch: {err}"}
        return
    replayed = f", {info['replayed']} update(s) replayed" if info.get("replayed") else ""
    message = f"Now in workspace {name}: policy v{info['version']}, {info.get('updates', 0)} update(s){replayed}."
    session["batch"] = None
    yield {"session": session, "workspace_status": status_html(message, "ok"), "_info": message, **data_view(room),
           **metrics_view(room), **cards_view(None, reset_comments=True), **ranking_view(None),
           "traces_title": traces_title(None)}


# --------------------------------------------------------- export / import


def export_data(room, key: str, exclude_rationalised: bool, all_workspaces: bool) -> dict:
    fmt, label = EXPORTS[key]
    try:
        path = room.policies.export(fmt, exclude_rationalised=bool(exclude_rationalised), all_workspaces=bool(all_workspaces))
    except (ValueError, OSError) as err:
        return {"export_status": status_html(f"Could not export: {err}", "error"), "_warning": f"Could not export: {err}"}
    with open(path, encoding="utf-8") as fh:
        rows = sum(1 for line in fh if line.strip())
    scope = "all workspaces" if all_workspaces else f"workspace {room.workspace}"
    note = " (rationalised traces left out)" if exclude_rationalised and fmt != "agreement" else ""
    empty = " — nothing to export yet" if rows == 0 else ""
    return {"export_file": str(path), "export_status": status_html(
        f"{label}: {rows} row(s) from {scope}{note}{empty}. Download: {os.path.basename(path)}", "warn" if empty else "ok")}


def _exporter(key: str):
    def export(room, exclude_rationalised: bool, all_workspaces: bool) -> dict:
        return export_data(room, key, exclude_rationalised, all_workspaces)

    export.__name__ = f"export_{key.replace('-', '_')}"
    return export


def export_checkpoint(room) -> dict:
    try:
        path = room.policies.checkpoint_archive()
    except (ValueError, OSError) as err:
        return {"export_status": status_html(f"Could not package the checkpoint: {err}", "error"),
                "_warning": f"Could not package the checkpoint: {err}"}
    size = os.path.getsize(path) / 1e6
    return {"export_file": str(path), "export_status": status_html(
        f"Checkpoint of policy v{room.version} ({size:.1f} MB): unzip it and load the folder (Model tab or "
        f"Engine.load). Download: {os.path.basename(path)}", "ok"), "header": metrics_view(room)["header"]}


def import_rankings(room, path: str | None) -> dict:
    """Import an uploaded rankings / TRL file into the active workspace; problems are shown, never raised."""
    if not path:
        return {}
    name = os.path.basename(path)
    try:
        counts = room.policies.import_rankings(path)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        message = str(err).replace(str(path), name)
        return {"import_status": status_html(f"Could not import {name}: {message}", "error"),
                "_warning": f"Could not import {name}"}
    text = (f"Imported {name} into workspace {room.workspace}: {counts['rankings_added']} ranking(s) added, "
            f"{counts['rankings_skipped']} already there, {counts['traces_added']} new trace(s). "
            "Imported rankings do not train the policy; they are in the exports and the agreement view.")
    return {"import_status": status_html(text, "ok"), "_info": f"Imported {counts['rankings_added']} ranking(s)",
            **data_view(room)}


# ------------------------------------------------------------------ layout


def build_data_tab(room, ui: dict) -> None:
    ui["data_info"] = gr.HTML(data_info_html(room), elem_id="data-info")
    view = data_view(room)
    with gr.Row(equal_height=False):
        with gr.Column(scale=6, variant="panel"):
            gr.HTML('<div class="cr-section-title">Workspaces</div><div class="cr-muted">Each workspace is one policy '
                    'with its own rankings, updates and checkpoints.</div>')
            ui["workspace_table"] = gr.Dataframe(view.get("workspace_table", []), headers=WORKSPACE_COLUMNS,
                                                 interactive=False, elem_id="workspace-table", wrap=True)
            with gr.Row():
                ui["workspace_choice"] = gr.Dropdown([r[0] for r in view.get("workspace_table", [])],
                                                     value=room.workspace, label="Workspace", elem_id="workspace-choice")
                ui["workspace_switch"] = gr.Button("Switch workspace", elem_id="workspace-switch")
            with gr.Row():
                ui["workspace_name"] = gr.Textbox(label="New workspace", placeholder="letters, digits, '.', '_' or '-'",
                                                  max_length=64, elem_id="workspace-name")
                ui["workspace_create"] = gr.Button("Create workspace", elem_id="workspace-create")
            with gr.Column(visible=False, elem_id="workspace-confirm-panel", elem_classes=["cr-confirm"],
                           variant="panel") as panel:
                ui["workspace_confirm_panel"] = panel
                ui["workspace_confirm_message"] = gr.HTML("", elem_id="workspace-confirm-message", padding=True)
                with gr.Row():
                    ui["workspace_confirm"] = gr.Button("Switch", variant="primary", elem_id="workspace-confirm")
                    ui["workspace_cancel"] = gr.Button("Cancel", elem_id="workspace-cancel")
            ui["workspace_status"] = gr.HTML("", elem_id="workspace-status")
        with gr.Column(scale=5, variant="panel"):
            gr.HTML('<div class="cr-section-title">Downloads</div><div class="cr-muted">JSON lines; TRL pairs load '
                    'with <code>datasets.load_dataset("json", ...)</code> and train with TRL\'s DPOTrainer.</div>')
            with gr.Row():
                ui["export_exclude_rationalised"] = gr.Checkbox(False, label="Exclude rationalised traces",
                                                                elem_id="export-exclude-rationalised")
                ui["export_all_workspaces"] = gr.Checkbox(False, label="All workspaces", elem_id="export-all-workspaces")
            with gr.Row():
                for key, (_, label) in EXPORTS.items():
                    ui[f"export_{key}"] = gr.Button(label, size="sm", elem_id=f"export-{key}")
            ui["export_checkpoint"] = gr.Button("Current checkpoint (.zip)", size="sm", elem_id="export-checkpoint")
            ui["export_file"] = gr.File(label="Download", interactive=False, elem_id="export-file", height=80)
            ui["export_status"] = gr.HTML("", elem_id="export-status")
            gr.HTML('<div class="cr-section-title">Import</div><div class="cr-muted">A rankings export or TRL pair '
                    'file (e.g. from another site) is added to the active workspace.</div>')
            ui["import_file"] = gr.File(label="Rankings or TRL file (.jsonl)", file_types=[".jsonl", ".json"],
                                        file_count="single", type="filepath", elem_id="import-file", height=120)
            ui["import_status"] = gr.HTML("", elem_id="import-status")
    with gr.Column(variant="panel"):
        with gr.Row():
            gr.HTML('<div class="cr-section-title">Inter-annotator agreement</div><div class="cr-muted">Trace groups '
                    'ranked by two or more clinicians, with Kendall\'s tau between each pair of them '
                    '(each annotator\'s latest ranking of the group counts).</div>')
            ui["agreement_refresh"] = gr.Button("Refresh", size="sm", scale=0, elem_id="agreement-refresh")
        ui["agreement_summary"] = gr.HTML(view.get("agreement_summary", ""), elem_id="agreement-summary")
        ui["agreement_table"] = gr.Dataframe(view.get("agreement_table", []), headers=AGREEMENT_COLUMNS,
                                             interactive=False, elem_id="agreement-table", wrap=True,
                                             column_widths=["14%", "26%", "8%", "40%", "12%"])
    build_reward_panel(room, ui)


def bind_data_tab(room, ui: dict) -> None:
    light_event(ui["tab_data"].select, refresh_data, room, ui, [], DATA_OUTPUTS)
    light_event(ui["agreement_refresh"].click, refresh_data, room, ui, [], DATA_OUTPUTS)
    confirm = ["session", "workspace_confirm_panel", "workspace_confirm_message"]
    light_event(ui["workspace_create"].click, create_workspace, room, ui, ["session", "workspace_name"],
                [*DATA_OUTPUTS, *confirm, "workspace_name", "workspace_status"])
    light_event(ui["workspace_switch"].click, request_workspace_switch, room, ui, ["session", "workspace_choice"],
                [*confirm, "workspace_status"])
    light_event(ui["workspace_cancel"].click, cancel_workspace_switch, room, ui, ["session"], confirm)
    switched = ["session", "workspace_confirm_panel", "workspace_status", *DATA_OUTPUTS, "header", "model_info", "table",
                *CHART_OUTPUTS, *CARD_OUTPUTS, "ranking", "rank_message", "traces_title"]
    engine_event(ui["workspace_confirm"].click, confirm_workspace_switch, room, ui, ["session"], switched)
    options = ["export_exclude_rationalised", "export_all_workspaces"]
    for key in EXPORTS:  # exports read the database only
        light_event(ui[f"export_{key}"].click, _exporter(key), room, ui, options, ["export_file", "export_status"],
                    show_progress="minimal")
    engine_event(ui["export_checkpoint"].click, export_checkpoint, room, ui, [],
                 ["export_file", "export_status", "header"], show_progress="minimal")
    light_event(ui["import_file"].upload, import_rankings, room, ui, ["import_file"],
                ["import_status", *DATA_OUTPUTS], show_progress="minimal")
    bind_reward_panel(room, ui)
