"""Who may reach the app: the login check with a back-off, and the model choices a
browser may ask for.

``ThrottledLogin`` is the callable Gradio's ``auth=`` takes. After
``free_failures`` wrong passwords for one user name, that name is refused
outright -- right password or not -- for a delay that doubles with every
further failure (1 s, 2 s, 4 s ... capped at ``max_delay_s``); a success
clears the count. 30 guesses then take minutes, not 0.8 s.
"""
from __future__ import annotations

import hmac
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from rlhf_core.model.models import REGISTRY

MODELS_DIR_ENV = "RLHF_MODELS_DIR"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ThrottledLogin:
    """``auth(username, password) -> bool`` with a per-user back-off after failures."""

    def __init__(self, pairs: list[tuple[str, str]], free_failures: int = 3, max_delay_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self._passwords = dict(pairs)
        self.free_failures, self.max_delay_s, self._clock = free_failures, max_delay_s, clock
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, username: str) -> float:
        """Seconds until ``username`` may try again (0: now)."""
        with self._lock:
            return max(0.0, self._locked_until.get(username, 0.0) - self._clock())

    def __call__(self, username: str, password: str) -> bool:
        username, password = str(username or ""), str(password or "")
        with self._lock:
            now = self._clock()
            if self._locked_until.get(username, 0.0) > now:
                return False
            expected = self._passwords.get(username)
            # compare even for an unknown user, so timing does not tell which names exist
            ok = hmac.compare_digest(password.encode(), (expected or "\0" * len(password)).encode())
            if ok and expected is not None:
                self._failures.pop(username, None)
                self._locked_until.pop(username, None)
                return True
            failures = self._failures.get(username, 0) + 1
            self._failures[username] = failures
            if failures > self.free_failures:
                delay = min(self.max_delay_s, 2.0 ** (failures - self.free_failures - 1))
                self._locked_until[username] = now + delay
            return False


def models_dir() -> Path | None:
    """The folder whose sub-folders a browser may load as models (``RLHF_MODELS_DIR``)."""
    value = os.environ.get(MODELS_DIR_ENV, "").strip()
    return Path(value).resolve() if value else None


def browser_model_choice(name: str) -> str:
    """What a model name typed in the browser may load: a registry name, a hub id
    (``org/name``), or a folder under ``RLHF_MODELS_DIR`` (given by its name there).
    Anything else -- an absolute or relative path elsewhere -- is refused with the
    same sentence whether or not it exists, so the box cannot probe the disk."""
    name = (name or "").strip()
    if name in REGISTRY:
        return name
    root = models_dir()
    if root is not None and "/" not in name and "\\" not in name and name not in ("", ".", ".."):
        candidate = root / name
        if candidate.is_dir():
            return str(candidate)
    if HUB_ID.fullmatch(name) and ".." not in name:
        return "hub:" + name
    where = f"a folder name under {root}" if root else f"a folder under {MODELS_DIR_ENV} (not set)"
    raise ValueError(f"choose a model from the list, a Hugging Face hub id like 'org/name', or {where}")


def exposure_warning(server_name: str, has_login: bool) -> str | None:
    """The loud start-up warning for a server anyone on the network can drive."""
    if has_login or server_name in LOOPBACK:
        return None
    return (f"WARNING: listening on {server_name} WITHOUT A LOGIN: anyone who can reach this port can rank, "
            "train, upload files and switch models (every UI event is callable over HTTP). "
            "Set RLHF_AUTH='user:password' or bind to 127.0.0.1.")
