"""Cooperative cancellation and pausing, checked between probes and between batches."""

from __future__ import annotations

import threading
import time

from modeldoctor.errors import CancelledError


class RunControl:
    """Shared by the thread that runs a job and the one that wants to stop or pause it."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._paused_at: float | None = None
        self._paused_total = 0.0

    def cancel(self) -> None:
        self._cancel.set()
        self.resume()  # a paused job must wake up to notice the cancel

    def pause(self) -> None:
        with self._lock:
            if self._paused_at is None:
                self._paused_at = time.monotonic()
            self._running.clear()

    def resume(self) -> None:
        with self._lock:
            if self._paused_at is not None:
                self._paused_total += time.monotonic() - self._paused_at
                self._paused_at = None
            self._running.set()

    def clock(self) -> float:
        """Seconds of a clock that stops while the job is paused: probe times and ETAs come from
        it, so a pause never reads as a slow probe."""
        with self._lock:
            paused = self._paused_total + (time.monotonic() - self._paused_at if self._paused_at is not None else 0)
        return time.monotonic() - paused

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def checkpoint(self) -> None:
        """Block while paused; raise CancelledError once cancelled."""
        self._running.wait()
        if self._cancel.is_set():
            raise CancelledError()
