"""Ranges for every number a user may set: one definition, enforced by the configs.

A config field carries its range in its metadata (``field(metadata={"help": ...,
"range": Range(...)})``); ``check_fields`` enforces them in ``__post_init__``, so
the UI, the API and the CLI refuse the same values with the same sentence.
The ranges are what a clinician could sensibly want on a shared policy;
an administrator widens (or narrows) one with the ``RLHF_BOUNDS`` environment
variable, a JSON object of ``{"field": [low, high]}``, e.g.
``RLHF_BOUNDS='{"lr": [1e-8, 0.05]}'`` for experiments on tiny models.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

BOUNDS_ENV = "RLHF_BOUNDS"


def knob(default, help: str, range_: "Range | None" = None, **extra):
    """A config field documented once: its help text and accepted range."""
    metadata = {"help": help, **extra}
    if range_ is not None:
        metadata["range"] = range_
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Range:
    """Accepted values: ``low <= x <= high`` (``low < x`` with ``open_low``); whole
    numbers only with ``integer``."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False

    def describe(self) -> str:
        """The range in words, e.g. ``a whole number in [1, 64]``."""
        left = "(" if self.open_low else "["
        kind = "a whole number" if self.integer else "a number"
        return f"{kind} in {left}{self.low:g}, {self.high:g}]"


def admin_overrides() -> dict[str, Range]:
    """Ranges set by the administrator in ``RLHF_BOUNDS`` (read on every check, so a
    change takes effect without a restart of the Python process's config classes)."""
    raw = os.environ.get(BOUNDS_ENV, "").strip()
    if not raw:
        return {}
    try:
        spec = json.loads(raw)
        out = {}
        for name, (low, high) in spec.items():
            if not (math.isfinite(float(low)) and math.isfinite(float(high)) and float(low) <= float(high)):
                raise ValueError(name)
            out[str(name)] = (float(low), float(high))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{BOUNDS_ENV} must be a JSON object of {{\"field\": [low, high]}}, got {raw!r} ({err})") from None
    return out


def effective(name: str, declared: Range) -> Range:
    """The declared range, or the administrator's override of it."""
    override = admin_overrides().get(name)
    if override is None:
        return declared
    return Range(override[0], override[1], declared.integer, declared.open_low and override[0] == declared.low)


def checked(name: str, value: Any, declared: Range, label: str = "") -> int | float:
    """``value`` as a number inside its range; ValueError naming the field otherwise.
    Non-finite values and (for ``integer``) fractions are refused, never rounded."""
    rng = effective(name, declared)
    what = label or name
    if isinstance(value, bool):
        raise ValueError(f"{what} must be {rng.describe()}, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be {rng.describe()}, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be {rng.describe()}, got {value}")
    if rng.integer:
        if float(value) != int(value):
            raise ValueError(f"{what} must be a whole number, got {value}")
        value = int(value)
    too_low = value <= rng.low if rng.open_low else value < rng.low
    if too_low or value > rng.high:
        hint = f" (an administrator can change this range with {BOUNDS_ENV})"
        raise ValueError(f"{what} must be {rng.describe()}, got {value:g}{hint}")
    return value


def check_fields(config: Any, prefix: str = "") -> None:
    """Enforce (and normalise: 3.0 steps -> 3) every ranged field of a dataclass
    instance; None passes where the field allows it (its default is None)."""
    for f in fields(config):
        declared = f.metadata.get("range")
        if declared is None:
            continue
        value = getattr(config, f.name)
        if value is None and f.default is None:
            continue
        setattr(config, f.name, checked(f"{prefix}{f.name}", value, declared, label=f.metadata.get("label", f.name)))


def help_text(config_cls: type, name: str) -> str:
    """A field's help sentence and its range, for the UI."""
    for f in fields(config_cls):
        if f.name == name:
            declared = f.metadata.get("range")
            tail = f" Allowed: {effective(name, declared).describe()}." if declared else ""
            return f.metadata.get("help", "") + tail
    raise KeyError(name)
