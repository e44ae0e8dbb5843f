"""The long poll behind ``GET /jobs/{id}?wait=S``: request handlers sleep on an asyncio event per job
until the record store pushes a state change (worker/store.py: ``MemoryRecords.subscribe`` for the
embedded queue, ``RedisRecords.listen`` -- Redis pub/sub -- for Celery), never by polling the record.

A waiting request holds no thread: it awaits its event in the server's event loop; the writer (the
embedded worker thread, the Redis subscriber thread, a DELETE in the thread pool) wakes it with
``loop.call_soon_threadsafe``.  The handler re-reads the record at least every ``RECHECK_SECONDS``
as well, so a notification lost with a Redis reconnect delays an answer by that much, no more."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

WAIT_MAX_SECONDS = 60.0  # the longest a request may wait (a larger ?wait= is capped to it)
RECHECK_SECONDS = 5.0


class JobWaits:
    """Waiters per job id, woken from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``notify(job_id)`` (or ``notify(None)``) is called while the block
        runs.  Register before reading the record, clear before each read: no wake-up is lost."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]

    def notify(self, job_id: str | None) -> None:
        """Wake the waiters of ``job_id`` (None: every waiter, e.g. after a Redis reconnect)."""
        with self._lock:
            if job_id is None:
                entries = [e for waiters in self._waiters.values() for e in waiters]
            else:
                entries = list(self._waiters.get(job_id, ()))
        for loop, event in entries:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed (its server stopped)
                pass

    def waiting(self) -> int:
        """Requests waiting now (for tests and diagnostics)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())
