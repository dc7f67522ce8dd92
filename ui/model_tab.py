"""The model panel: registry, switching model / mode, checkpoints, reset.

Switching, loading and resetting replace the policy, so each first shows a
confirmation saying what would be lost (updates not in a checkpoint, this
session's unsubmitted ranking) and offers to save a checkpoint first.
"""
from __future__ import annotations

import time

import gradio as gr

from rlhf_core.model.models import REGISTRY

from .access import browser_model_choice
from .batch import cards_view, ranking_view, traces_title
from .generate_tab import CARD_OUTPUTS, CHART_OUTPUTS
from .metrics_panel import metrics_view
from .views import esc, model_info, status_html
from .wiring import engine_event, light_event

MODEL_COLUMNS = ["model", "state", "why", "description"]
CONFIRM_OUTPUTS = ["session", "confirm_panel", "confirm_message"]


def models_rows(room) -> list[list[str]]:
    return [[r[c] for c in MODEL_COLUMNS] for r in room.policies.models()]


def checkpoint_choices(room) -> list[tuple[str, str]]:
    return [(f"{c['name']} · {c['model']} {c['mode']} · v{c['version']} · {c['created']}", c["name"]) for c in room.policies.checkpoints()]


def model_info_html(room) -> str:
    return model_info(room.describe())


def _what_is_lost(room, session: dict, action: dict) -> str:
    lines = []
    count, who = room.unsaved_count(), ", ".join(room.unsaved_annotators()) or "unknown"
    if action["action"] == "switch":
        lines.append(f"The current policy is checkpointed in workspace {room.workspace} first, so nothing is lost. "
                     "The new model opens the last workspace it was used in (this one if it fits, else a new one).")
    elif count:
        kept = ("Every ranking stays in the database" if room.persistent
                else "Every ranking stays in this session's temporary database")
        lines.append(f"{count} ranking update(s) by {who} have changed the weights since the last checkpoint; "
                     f"those weights are lost unless you save first. {kept} "
                     f"(workspace {room.workspace}) and in its exports.")
    else:
        lines.append("Every update is in a checkpoint; nothing is lost.")
    batch = session.get("batch")
    if batch and not batch.get("submitted"):
        if action["action"] == "switch":
            lines.append(f"Your unsubmitted ranking of {len(batch['traces'])} traces will be discarded: they were sampled from the current model.")
        else:
            lines.append(f"Your unsubmitted ranking of {len(batch['traces'])} traces is kept and can still be submitted.")
    return "".join(f"<li>{esc(x)}</li>" for x in lines)


def _request(room, session: dict, action: dict, title: str) -> dict:
    message = (f'<div><b>{esc(title)}?</b></div><ul>{_what_is_lost(room, session, action)}</ul>')
    return {"session": {**session, "pending": action}, "confirm_panel": gr.update(visible=True), "confirm_message": message}


def request_switch(room, session: dict, model: str, lora: bool) -> dict:
    if not model:
        return {"_warning": "Choose a model first."}
    try:
        model = browser_model_choice(model)
    except ValueError as err:
        return {"model_status": status_html(f"Cannot switch: {err}.", "error"), "_warning": str(err)}
    mode = "LoRA" if lora else "full fine-tuning"
    return _request(room, session, {"action": "switch", "model": model, "lora": bool(lora)}, f"Switch to {model} ({mode})")


def request_reset(room, session: dict) -> dict:
    return _request(room, session, {"action": "reset"}, f"Reset the policy to the reference (v{room.version} → v0)")


def request_load(room, session: dict, name: str | None) -> dict:
    if not name:
        return {"_warning": "Choose a checkpoint to load."}
    return _request(room, session, {"action": "load", "name": name}, f"Load checkpoint {name}")


def cancel(room, session: dict) -> dict:
    return {"session": {**session, "pending": None}, "confirm_panel": gr.update(visible=False), "confirm_message": ""}


def _refreshed(room) -> dict:
    return {"model_info": model_info_html(room), "models_table": models_rows(room), "lr": room.default_lr(),
            "checkpoint_choice": gr.update(choices=checkpoint_choices(room)), **metrics_view(room)}


def save(room, name: str) -> dict:
    name = (name or "").strip() or f"{room.engine.lm.name.replace('/', '_')}-v{room.version}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        path = room.policies.save(name)
    except (ValueError, OSError) as err:
        return {"model_status": status_html(f"Could not save: {err}", "error"), "_warning": f"Could not save: {err}"}
    return {"model_status": status_html(f"Saved policy v{room.version} to {path}", "ok"), **_refreshed(room)}


def confirm(room, session: dict, save_first: bool, checkpoint_name: str):
    """Carry out the pending switch / reset / load (optionally saving first)."""
    action = session.get("pending")
    if not action:
        yield {"confirm_panel": gr.update(visible=False), "_warning": "Nothing to confirm."}
        return
    yield {"confirm_panel": gr.update(visible=False), "model_status": status_html("Working…", "info")}
    out = {}
    if save_first:
        out = save(room, checkpoint_name)
        if "_warning" in out:
            yield {**out, "session": {**session, "pending": None}}
            return
    session = {**session, "pending": None}
    try:
        if action["action"] == "switch":
            info = room.policies.switch_model(action["model"], action["lora"])
            session["batch"] = None
            where = f" in workspace {info['workspace']}" if info.get("workspace") else ""
            message = f"Now running {info['model']} ({info['mode']}){where}, policy v{info['version']}."
        elif action["action"] == "reset":
            room.policies.reset()
            message = "Policy reset to the reference (v0)."
        else:
            manifest = room.policies.load(action["name"])
            message = f"Loaded checkpoint {action['name']} (policy v{manifest['version']})."
    except Exception as err:  # noqa: BLE001 - the previous policy stays in place
        yield {"session": session, "model_status": status_html(f"Failed: {err}. The previous policy is still loaded.", "error"),
               "_warning": str(err)}
        return
    saved = (out.get("model_status") or "") if save_first else ""
    view = {}
    if session.get("batch") is None:
        view = {**cards_view(None), **ranking_view(None), "traces_title": traces_title(None)}
    yield {"session": session, "model_status": saved + status_html(message, "ok"), "_info": message,
           "model_choice": room.engine.lm.name, "model_lora": room.describe()["mode"] == "lora",
           **_refreshed(room), **view}


def build_model_tab(room, ui: dict) -> None:
    ui["model_info"] = gr.HTML(model_info_html(room), elem_id="model-info")
    ui["models_table"] = gr.Dataframe(models_rows(room), headers=MODEL_COLUMNS, interactive=False,
                                      label="Models", elem_id="models-table")
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            gr.HTML('<div class="cr-section-title">Model</div>')
            ui["model_choice"] = gr.Dropdown(list(REGISTRY), value=room.engine.lm.name, label="Model",
                                             allow_custom_value=True, elem_id="model-choice",
                                             info="a registry name, a local folder or a hub id")
            ui["model_lora"] = gr.Checkbox(room.describe()["mode"] == "lora", label="LoRA adapter (otherwise full fine-tuning)",
                                           info="the default on CPU for models of 100M+ parameters; "
                                           "a workspace keeps the mode and adapter it was trained with",
                                           elem_id="model-lora")
            ui["switch_model"] = gr.Button("Switch model", elem_id="switch-model")
        with gr.Column(variant="panel"):
            gr.HTML('<div class="cr-section-title">Checkpoints</div>')
            ui["checkpoint_name"] = gr.Textbox(label="Checkpoint name", placeholder="empty: model-version-time",
                                               elem_id="checkpoint-name", max_length=64)
            ui["save_checkpoint"] = gr.Button("Save checkpoint", elem_id="save-checkpoint")
            ui["checkpoint_choice"] = gr.Dropdown(checkpoint_choices(room), label="Saved checkpoints", elem_id="checkpoint-choice")
            ui["load_checkpoint"] = gr.Button("Load checkpoint", elem_id="load-checkpoint")
        with gr.Column(variant="panel"):
            gr.HTML('<div class="cr-section-title">Reference</div><div class="cr-muted">Throw away all training: '
                    'the policy becomes the frozen reference again (version 0).</div>')
            ui["reset_policy"] = gr.Button("Reset policy to reference", variant="stop", elem_id="reset-policy")
    with gr.Column(visible=False, elem_id="confirm-panel", elem_classes=["cr-confirm"], variant="panel") as panel:
        ui["confirm_panel"] = panel
        ui["confirm_message"] = gr.HTML("", elem_id="confirm-message", padding=True)
        with gr.Row():
            ui["confirm_save"] = gr.Button("Save a checkpoint first, then continue", variant="primary", elem_id="confirm-save")
            ui["confirm_action"] = gr.Button("Continue without saving", variant="stop", elem_id="confirm-action")
            ui["confirm_cancel"] = gr.Button("Cancel", elem_id="confirm-cancel")
    ui["model_status"] = gr.HTML("", elem_id="model-status")


def refresh_model_tab(room) -> dict:
    """When the tab is opened: current state, registry and checkpoints (others may have changed them)."""
    return {"model_info": model_info_html(room), "models_table": models_rows(room),
            "checkpoint_choice": gr.update(choices=checkpoint_choices(room))}


def bind_model_tab(room, ui: dict) -> None:
    light_event(ui["tab_model"].select, refresh_model_tab, room, ui, [], ["model_info", "models_table", "checkpoint_choice"])
    light_event(ui["switch_model"].click, request_switch, room, ui, ["session", "model_choice", "model_lora"], CONFIRM_OUTPUTS)
    light_event(ui["reset_policy"].click, request_reset, room, ui, ["session"], CONFIRM_OUTPUTS)
    light_event(ui["load_checkpoint"].click, request_load, room, ui, ["session", "checkpoint_choice"], CONFIRM_OUTPUTS)
    light_event(ui["confirm_cancel"].click, cancel, room, ui, ["session"], CONFIRM_OUTPUTS)
    outputs = ["session", "confirm_panel", "model_status", "model_info", "models_table", "lr", "checkpoint_choice",
               "model_choice", "model_lora", "traces_title", "ranking", "rank_message",
               "header", "table", *CHART_OUTPUTS, *CARD_OUTPUTS]
    ui["save_first"] = gr.State(True)
    ui["no_save"] = gr.State(False)
    engine_event(ui["confirm_save"].click, confirm, room, ui, ["session", "save_first", "checkpoint_name"], outputs)
    engine_event(ui["confirm_action"].click, confirm, room, ui, ["session", "no_save", "checkpoint_name"], outputs)
    save_outputs = ["model_status", "model_info", "models_table", "lr", "checkpoint_choice", "header", "table",
                    *CHART_OUTPUTS]
    engine_event(ui["save_checkpoint"].click, save, room, ui, ["checkpoint_name"], save_outputs)
