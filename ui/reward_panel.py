"""The Data tab's reward-model panel: its versions with their held-out accuracy, and a download."""
from __future__ import annotations

import os
import time
from pathlib import Path

import gradio as gr

from rlhf_core.storage.export import checkpoint_archive

from .wiring import light_event
from .views import status_html

REWARD_COLUMNS = ["version (rankings)", "head", "held-out pairwise accuracy", "Kendall's tau", "held-out pairs", "fit"]


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.1%}"


def reward_rows(room) -> list[list]:
    """One row per saved reward-model version of the active workspace, newest first."""
    rows = []
    for v in room.advisor.versions(room.workspace):
        cv = v.get("cross_validated") or {}
        tau = cv.get("kendall_tau")
        rows.append([v.get("version"), v.get("head"), _pct(cv.get("pairwise_accuracy")),
                     "n/a" if tau is None or tau != tau else f"{tau:+.2f}", cv.get("pairs"),
                     f"{1000 * v.get('seconds', 0):.0f} ms"])
    return rows


def reward_summary(room) -> str:
    versions = room.advisor.versions(room.workspace)
    need = room.advisor.config.min_rankings
    if not versions:
        return status_html(f"No reward model yet: it is fitted once the workspace has {need} rankings whose traces "
                           "carry features (traces sampled here do; imported ones do not).", "info")
    latest = versions[0]
    cv = latest.get("cross_validated") or {}
    return status_html(f"Reward model v{latest['version']} ({latest['head']} head, fitted on {latest['version']} "
                       f"rankings): {_pct(cv.get('pairwise_accuracy'))} of held-out pairs ordered as the clinicians "
                       f"did ({cv.get('folds')}-fold cross-validation over {cv.get('pairs')} pairs). It suggests the "
                       "starting order of new traces; clinicians always decide.", "ok")


def reward_view(room) -> dict:
    room.advisor.model(room.workspace)  # refit if rankings arrived (milliseconds)
    return {"reward_summary": reward_summary(room), "reward_table": reward_rows(room)}


def export_reward_model(room) -> dict:
    """The latest version as a .zip (safetensors + manifest), for a download."""
    versions = room.advisor.versions(room.workspace)
    if not versions:
        return {"reward_status": status_html("No reward model to download yet.", "warn")}
    latest = versions[0]
    out = Path(room.export_dir) / f"{room.workspace}-reward-model-v{latest['version']}-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    path = checkpoint_archive(latest["folder"], out)
    return {"export_file": str(path), "reward_status": status_html(
        f"Reward model v{latest['version']}: {os.path.basename(path)} (load with rlhf_core.reward.reward_model.RewardModel.load "
        "on the unzipped folder).", "ok")}


def build_reward_panel(room, ui: dict) -> None:
    with gr.Column(variant="panel"):
        with gr.Row():
            gr.HTML('<div class="cr-section-title">Reward model</div><div class="cr-muted">Learned from this '
                    "workspace's rankings (Plackett-Luce over each whole order, on the reference model's view of each "
                    "trace); refitted after every ranking. Accuracy is measured on rankings each version was not "
                    "fitted on.</div>")
            ui["reward_download"] = gr.Button("Download (.zip)", size="sm", scale=0, elem_id="reward-download")
        view = reward_view(room)
        ui["reward_summary"] = gr.HTML(view["reward_summary"], elem_id="reward-summary")
        ui["reward_table"] = gr.Dataframe(view["reward_table"], headers=REWARD_COLUMNS, interactive=False,
                                          elem_id="reward-table", wrap=True, max_height=260)
        ui["reward_status"] = gr.HTML("", elem_id="reward-status")


def bind_reward_panel(room, ui: dict) -> None:
    light_event(ui["tab_data"].select, reward_view, room, ui, [], ["reward_summary", "reward_table"])
    light_event(ui["reward_download"].click, export_reward_model, room, ui, [], ["export_file", "reward_status"],
                show_progress="minimal")
