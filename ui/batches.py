"""Batches handed to API clients, kept so a later rank+update call can name them by id."""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

MAX_CACHED_BATCHES = 64  # API batches kept for rank+update calls


class BatchCache:
    """The most recent ``limit`` batches by id, oldest dropped first (thread-safe)."""

    def __init__(self, limit: int = MAX_CACHED_BATCHES):
        self.limit = limit
        self._lock = threading.Lock()
        self._batches: OrderedDict[str, dict] = OrderedDict()

    def remember(self, **batch) -> str:
        """Keep ``batch`` (traces, negatives, case id, model key, ...) under a new id."""
        batch_id = uuid.uuid4().hex[:12]
        with self._lock:
            self._batches[batch_id] = {**batch, "submitted": False}
            while len(self._batches) > self.limit:
                self._batches.popitem(last=False)
        return batch_id

    def get(self, batch_id: str) -> dict:
        with self._lock:
            if batch_id not in self._batches:
                raise KeyError(f"unknown or expired batch {batch_id!r}; generate again")
            return self._batches[batch_id]
