"""Who may reach the app: the login check with a back-off, and the model choices a
browser may ask for.

``ThrottledLogin`` is the callable Gradio's ``auth=`` takes. After
``free_failures`` wrong passwords for one user name, that name is refused
outright -- right password or not -- for a delay that doubles with every
further failure (1 s, 2 s, 4 s ... capped at ``max_delay_s``); a success
clears the count. 30 guesses then take minutes, not 0.8 s.
``LoginAddressThrottle`` applies the same back-off per client address (10 free
failures: a ward shares one address), so spraying user names does not help.
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


class BackOff:
    """Failures counted per key (a user name, an address): after ``free_failures`` the key is
    refused for a delay that doubles with every further failure (1 s, 2 s, 4 s ... capped at
    ``max_delay_s``); a success clears its count."""

    def __init__(self, free_failures: int = 3, max_delay_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.free_failures, self.max_delay_s, self._clock = free_failures, max_delay_s, clock
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        with self._lock:
            return max(0.0, self._locked_until.get(key, 0.0) - self._clock())

    def failed(self, key: str) -> None:
        """Count a failure of ``key`` (locking it once past the free ones)."""
        with self._lock:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            if failures > self.free_failures:
                delay = min(self.max_delay_s, 2.0 ** (failures - self.free_failures - 1))
                self._locked_until[key] = self._clock() + delay

    def succeeded(self, key: str) -> None:
        """Clear ``key``'s failures."""
        with self._lock:
            self._failures.pop(key, None)
            self._locked_until.pop(key, None)


class ThrottledLogin:
    """``auth(username, password) -> bool`` with a per-user back-off after failures."""

    def __init__(self, pairs: list[tuple[str, str]], free_failures: int = 3, max_delay_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self._passwords = dict(pairs)
        self.users = BackOff(free_failures, max_delay_s, clock)

    def retry_after(self, username: str) -> float:
        """Seconds until ``username`` may try again (0: now)."""
        return self.users.retry_after(username)

    def __call__(self, username: str, password: str) -> bool:
        username, password = str(username or ""), str(password or "")
        if self.users.retry_after(username) > 0:
            return False
        expected = self._passwords.get(username)
        # compare even for an unknown user, so timing does not tell which names exist
        ok = hmac.compare_digest(password.encode(), (expected or "\0" * len(password)).encode())
        if ok and expected is not None:
            self.users.succeeded(username)
            return True
        self.users.failed(username)
        return False


class LoginAddressThrottle:
    """ASGI middleware: the same back-off per client address on Gradio's ``POST /login``, so
    trying many user names from one address is slowed too. A locked address gets 429 with
    ``Retry-After`` before the password is even checked; a 200 clears its count, a 4xx counts."""

    def __init__(self, app, backoff: BackOff | None = None):
        self.app, self.backoff = app, backoff or BackOff(free_failures=10)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/") != "/login":
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.backoff.retry_after(address)
        if wait > 0:
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"retry-after", str(int(wait) + 1).encode()), (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"detail": "Too many failed logins from this address."}'})
            return

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 200:
                    self.backoff.succeeded(address)
                elif 400 <= status < 500:
                    self.backoff.failed(address)
            await send(message)

        return await self.app(scope, receive, recording_send)


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
