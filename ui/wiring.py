"""Connecting plain handlers to Gradio events.

Handlers are ordinary functions (or generators) ``handler(room, *inputs)`` that
return (or yield) a dict keyed by component name; keys they leave out keep
their current value. Two keys are messages, not components: ``_warning`` and
``_info`` become Gradio toasts. Tests call the handlers directly.
"""
from __future__ import annotations

import html
import inspect
from typing import Callable

import gradio as gr

ENGINE_QUEUE = "engine"  # concurrency_id shared by everything that uses the weights


def _notify(out: dict) -> None:
    # Gradio renders toast messages as (sanitised) HTML; ours may quote user text, so escape it.
    if out.get("_warning"):
        gr.Warning(html.escape(out["_warning"]))
    if out.get("_info"):
        gr.Info(html.escape(out["_info"]))


def pack(out: dict, names: list[str]):
    _notify(out)
    values = tuple(out[n] if n in out else gr.skip() for n in names)
    return values[0] if len(values) == 1 else values


def adapt(handler: Callable, room, names: list[str]) -> Callable:
    """A Gradio callback calling ``handler(room, *inputs)`` and mapping its dicts to ``names``."""
    if inspect.isgeneratorfunction(handler):
        def run(*args):
            for out in handler(room, *args):
                yield pack(out, names)
    else:
        def run(*args):
            return pack(handler(room, *args), names)
    run.__name__ = f"ui_{handler.__name__}"  # private UI events never take the public API names
    return run


def engine_event(trigger, handler, room, ui: dict, inputs: list[str], outputs: list[str], **kwargs):
    """An event that uses the weights: one at a time across all sessions, in one queue."""
    return trigger(adapt(handler, room, outputs), [ui[n] for n in inputs], [ui[n] for n in outputs],
                   concurrency_id=ENGINE_QUEUE, concurrency_limit=1, api_visibility="private", **kwargs)


def light_event(trigger, handler, room, ui: dict, inputs: list[str], outputs: list[str], **kwargs):
    """A cheap event (reordering, picking a case): never waits behind the engine."""
    kwargs.setdefault("show_progress", "hidden")
    return trigger(adapt(handler, room, outputs), [ui[n] for n in inputs], [ui[n] for n in outputs],
                   concurrency_limit=None, api_visibility="private", **kwargs)
