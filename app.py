"""The RLHF control room: ``python app.py`` serves it at http://127.0.0.1:7860.

Environment:
    RLHF_MODEL           model to load (default smollm2-135m, bundled)
    RLHF_LORA            1: train a LoRA adapter, 0: every weight; unset: the workspace's own
                         mode, else LoRA on CPU for models of 100M+ parameters (the default model)
    RLHF_AUTH            require a login: "user:password", several separated by commas
                         (wrong passwords back off per user: 1 s, 2 s, 4 s ... after 3)
    RLHF_MODELS_DIR      folders under it may be loaded as models from the browser
                         (otherwise only the registry's models and hub ids)
    RLHF_BOUNDS          widen a hyper-parameter's range, JSON: '{"lr": [1e-8, 0.01]}'
    RLHF_DATA_DIR        the data folder (default ./data): database, checkpoints, exports
    RLHF_DB              the database file (default $RLHF_DATA_DIR/rlhf.sqlite)
    RLHF_WORKSPACE       the workspace to open (default: the one used last, else "default")
    RLHF_CHECKPOINT_EVERY  checkpoint the policy every N updates (default 10; the
                         updates in between are replayed from the database on restart)
    RLHF_CHECKPOINT_DIR  where named checkpoints (Model tab) are saved (default ./checkpoints)
    RLHF_CASES_DIR       case library folder (default the bundled ./cases)
    PORT / GRADIO_SERVER_PORT   port (default 7860; Spaces and Docker set PORT)
    GRADIO_SERVER_NAME   interface to bind (default 127.0.0.1; Docker sets 0.0.0.0)
    RLHF_MALLOC          auto (default): restart once on jemalloc/tcmalloc when installed
                         (less memory per update, see rlhf_core/model/allocator.py); system: keep glibc
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: the process may restart itself
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()

import logging
import os
import signal
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from rlhf_core.model.models import DEFAULT_MODEL
from ui.autopilot_panel import bind_autopilot_panel, build_autopilot_panel
from ui.access import BackOff, LoginAddressThrottle, ThrottledLogin, exposure_warning
from ui.api import build_api
from ui.case_panel import bind_case_panel, build_case_panel
from ui.data_tab import bind_data_tab, build_data_tab
from ui.eval_tab import bind_eval_tab, build_eval_tab
from ui.generate_tab import bind_generate, build_generate_controls, build_trace_cards, conclusion_setting
from ui.guide import build_guide
from ui.metrics_panel import bind_metrics, build_charts
from ui.model_tab import bind_model_tab, build_model_tab
from ui.rank_tab import bind_rank, build_rank_panel
from ui.settings import lora_from_env
from ui.state import ControlRoom, new_session
from ui.theme import launch_style
from ui.views import header_html

TITLE = "RLHF control room"


def prefill_annotator(request: gr.Request):
    """With a login, the annotator's name starts as their user name."""
    name = getattr(request, "username", None)
    return name if name else gr.skip()


def build_app(model_name: str = DEFAULT_MODEL, lora: bool | None = None, cases_dir: str | Path | None = None,
              generate_fn=None, checkpoint_dir: str | Path | None = None, room: ControlRoom | None = None,
              db_path: str | Path | None = None, checkpoint_every: int | None = None,
              export_dir: str | Path | None = None, background_replay: bool = False) -> gr.Blocks:
    """The whole app around one ``ControlRoom`` (built here unless given).

    ``db_path``: the database (``main`` passes ``rlhf_core.storage.store.default_db_path()``;
    None keeps rankings and history in memory only). ``generate_fn`` swaps the
    trace source (see ``ui.backends``); ``demo.room`` is the control room, for
    tests and embedding.
    """
    if room is None:
        room = ControlRoom(model_name, lora=lora, cases_dir=cases_dir, generate_fn=generate_fn,
                           checkpoint_dir=checkpoint_dir or os.environ.get("RLHF_CHECKPOINT_DIR", "checkpoints"),
                           db_path=db_path, checkpoint_every=checkpoint_every, export_dir=export_dir,
                           background_replay=background_replay)
    ui: dict = {}
    with gr.Blocks(title=TITLE) as demo:
        ui["session"] = gr.State(new_session())
        ui["seen_revision"] = gr.State(-1)
        ui["header"] = gr.HTML(header_html(room.describe()), elem_id="header")
        build_guide(ui)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Control room", id="control", elem_id="tab-control"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=340):
                        build_case_panel(room, ui)
                        build_generate_controls(ui)
                    with gr.Column(scale=8, min_width=480):
                        build_trace_cards(ui)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=340):
                        build_rank_panel(room, ui)
                        build_autopilot_panel(room, ui)
                    with gr.Column(scale=8, min_width=480):
                        build_charts(room, ui)
            with gr.Tab("Model", id="model", elem_id="tab-model") as ui["tab_model"]:
                build_model_tab(room, ui)
            with gr.Tab("Data", id="data", elem_id="tab-data") as ui["tab_data"]:
                build_data_tab(room, ui)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as ui["tab_eval"]:
                build_eval_tab(room, ui)
        bind_case_panel(room, ui)
        bind_generate(room, ui)
        bind_rank(room, ui)
        bind_autopilot_panel(room, ui)
        bind_metrics(room, ui)
        bind_model_tab(room, ui)
        bind_data_tab(room, ui)
        bind_eval_tab(room, ui)
        build_api(room)
        demo.load(prefill_annotator, None, ui["annotator"], api_visibility="private", show_progress="hidden")
        demo.load(lambda: conclusion_setting(room), None, ui["conclusion"], api_visibility="private", show_progress="hidden")
    demo.room = room
    demo.ui = ui
    return demo


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """"alice:secret,bob:pw" -> [("alice", "secret"), ("bob", "pw")]; empty -> None (no login)."""
    if not value or not value.strip():
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("RLHF_AUTH must be 'user:password' pairs separated by commas")
        pairs.append((user, password))
    return pairs


def launch(demo: gr.Blocks, address_backoff: BackOff | None = None, **kwargs):
    """Queue and launch with the app's look (Gradio 6 takes theme and CSS at launch). With a login
    (``auth=``) failed logins also back off per client address (``LoginAddressThrottle``)."""
    demo.queue(default_concurrency_limit=8)
    if kwargs.get("auth") is not None:
        kwargs.setdefault("app_kwargs", {})["middleware"] = [Middleware(LoginAddressThrottle, backoff=address_backoff)]
    return demo.launch(**launch_style(), footer_links=["api"], **kwargs)


def _stop(signum, frame):
    """SIGTERM (docker stop, systemd) ends the server like Ctrl-C, so ``main`` can checkpoint."""
    raise KeyboardInterrupt


def main() -> None:
    from rlhf_core.storage.store import default_db_path

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lora = lora_from_env()
    demo = build_app(os.environ.get("RLHF_MODEL") or DEFAULT_MODEL, lora=lora,
                     cases_dir=os.environ.get("RLHF_CASES_DIR") or None, db_path=default_db_path(),
                     background_replay=True)
    room = demo.room
    info = room.engine.resume_info
    logging.getLogger("app").info(
        "database %s, workspace %r: policy v%s, %s update(s), %s ranking(s)%s%s", room.store.path, info["workspace"],
        info["version"], info["updates"], info["rankings"],
        f", loaded {info['checkpoint']}" if info["checkpoint"] else "",
        f", replayed {info['replayed']} update(s)" if info["replayed"] else "")
    if room.restoring:
        logging.getLogger("app").info("replaying the rankings no checkpoint holds yet in the background")
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    server_name = os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    pairs = parse_auth(os.environ.get("RLHF_AUTH"))
    warning = exposure_warning(server_name, pairs is not None)
    if warning:
        banner = "!" * 100
        logging.getLogger("app").warning("\n%s\n%s\n%s", banner, warning, banner)
    signal.signal(signal.SIGTERM, _stop)
    try:
        launch(demo, server_name=server_name, server_port=port, auth=ThrottledLogin(pairs) if pairs else None,
               auth_message="RLHF control room: sign in to rank traces.")
    finally:
        saved = room.close()  # a clean shutdown checkpoints updates made since the last checkpoint
        if saved:
            logging.getLogger("app").info("saved the policy to %s", saved)


if __name__ == "__main__":
    main()
