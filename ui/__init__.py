"""The control room's Gradio UI, on top of ``rlhf_core``.

``state.ControlRoom`` holds the one policy (the engine) shared by every browser
session; ``backends`` is where traces come from; each screen section is one
module exposing ``build_*`` (components) and ``bind_*`` (events):
``case_panel``, ``generate_tab`` (trace cards), ``rank_tab`` (ranking control
and update), ``metrics_panel`` (charts from ``charts``), ``model_tab``; ``api``
registers the named endpoints. Handlers are plain functions returning dicts
keyed by component name (``wiring``), so tests call them directly.
"""
