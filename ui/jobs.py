"""Model work off the request thread: a worker runs the job, the handler streams its events.

Everything that reads or changes the weights runs in a worker thread under the
control room's one lock; the handler consumes what it emits from a queue, so a
browser that disconnects never leaves an update half applied, and the lock is
always released by the thread that took it.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator


class Event(dict):
    """An engine event for the UI (a dict); ``final`` ones are never coalesced away."""

    final = False


class FinalEvent(Event):
    final = True


class Cancelled(Exception):
    """The browser went away: stop a long read-only job (an evaluation)."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def stream_from_thread(work: Callable[[Callable, Callable[[], bool]], None]) -> Iterator:
    """Run ``work(emit, cancelled)`` in a thread and yield what it emits.

    Snapshots are coalesced: a slow consumer sees the latest one, never a
    backlog. Closing the iterator asks the worker to stop at its next event.
    """
    items: queue.Queue = queue.Queue()
    cancel = threading.Event()
    done = object()

    def target():
        try:
            work(items.put, cancel.is_set)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            items.put(_Failure(err))
        finally:
            items.put(done)

    threading.Thread(target=target, daemon=True, name="control-room-engine").start()
    try:
        while True:
            item = items.get()
            while not isinstance(item, _Failure) and item is not done:
                try:
                    nxt = items.get_nowait()
                except queue.Empty:
                    break
                if nxt is done or isinstance(nxt, _Failure) or getattr(nxt, "final", False):
                    yield item
                item = nxt
            if isinstance(item, _Failure):
                raise item.error
            if item is done:
                return
            yield item
    finally:
        cancel.set()
