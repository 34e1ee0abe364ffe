"""Run engine work on a QThread; its events reach the GUI thread through a queued signal."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from modeldoctor.control import RunControl
from modeldoctor.errors import CancelledError, ModelDoctorError
from modeldoctor.events import Failed


@dataclass(frozen=True)
class JobResult:
    """The value a non-generator job returned."""

    value: Any


class _Job(QObject):
    event = Signal(object)
    done = Signal()

    def __init__(self, work: Callable[[], Iterable[Any]]) -> None:
        super().__init__()
        self.work = work

    @Slot()
    def run(self) -> None:
        try:
            for item in self.work():
                self.event.emit(item)
        except CancelledError as exc:
            self.event.emit(Failed(str(exc), "cancelled"))
        except ModelDoctorError as exc:
            self.event.emit(Failed(str(exc)))
        except MemoryError:
            self.event.emit(Failed("Out of memory. Try fewer tokens or a smaller model."))
        except Exception as exc:  # never let a worker die silently
            self.event.emit(Failed(f"Unexpected error: {exc}", traceback.format_exc()))
        finally:
            self.done.emit()


class JobRunner(QObject):
    """Starts one background job at a time and tells the GUI about it."""

    event = Signal(object)
    finished = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._thread: QThread | None = None
        self._job: _Job | None = None
        self.control = RunControl()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, work: Callable[[RunControl], Iterable[Any]]) -> RunControl:
        if self.busy:
            raise RuntimeError("a job is already running")
        self.control = RunControl()
        control = self.control
        thread = QThread()
        job = _Job(lambda: work(control))
        job.moveToThread(thread)
        thread.started.connect(job.run)
        job.event.connect(self.event)
        job.done.connect(thread.quit)
        thread.finished.connect(self._cleanup)
        self._thread, self._job = thread, job
        thread.start()
        return control

    def start_call(self, call: Callable[[RunControl], Any]) -> RunControl:
        """Run a plain function; its return value arrives as a JobResult event."""
        return self.start(lambda control: iter([JobResult(call(control))]))

    def cancel(self) -> None:
        self.control.cancel()

    def wait(self, timeout_ms: int = 30000) -> bool:
        thread = self._thread
        return thread.wait(timeout_ms) if thread is not None else True

    @Slot()
    def _cleanup(self) -> None:
        thread, job = self._thread, self._job
        self._thread = self._job = None
        if job is not None:
            job.deleteLater()
        if thread is not None:
            thread.deleteLater()
        self.finished.emit()
