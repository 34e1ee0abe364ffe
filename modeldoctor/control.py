"""Cooperative cancellation and pausing, checked between probes and between batches."""

from __future__ import annotations

import threading

from modeldoctor.errors import CancelledError


class RunControl:
    """Shared by the thread that runs a job and the one that wants to stop or pause it."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._running.set()  # a paused job must wake up to notice the cancel

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

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
