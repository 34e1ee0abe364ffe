"""What every step controller shares: the window (state, runner, navigation) and the job lifecycle."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from PySide6.QtWidgets import QMessageBox, QScrollArea

from modeldoctor.events import Failed


class Controller:
    kinds: tuple[str, ...] = ()  # the job kinds this controller runs

    def __init__(self, window) -> None:
        self.window = window

    @property
    def state(self):
        return self.window.state

    @property
    def runner(self):
        return self.window.runner

    def status(self, message: str) -> None:
        self.window.statusBar().showMessage(message)

    def reveal(self, widget) -> None:
        """Scroll the page so `widget` (a job's progress bar) is on screen: on a small screen the
        form pages scroll, and a job whose progress sits below the fold looks frozen."""
        parent = widget.parentWidget()
        while parent is not None and not isinstance(parent, QScrollArea):
            parent = parent.parentWidget()
        if parent is not None:
            parent.ensureWidgetVisible(widget, 0, 40)

    def busy_refuse(self) -> bool:
        """True (after telling the user) when another job is running."""
        if self.runner.busy:
            QMessageBox.information(self.window, "Model Doctor", "Wait for the current job to finish, or cancel it.")
            return True
        return False

    def start(self, kind: str, work: Callable[[Any], Iterable[Any]]) -> None:
        """Run a generator job; its events come back to on_event."""
        self.window.job_kind = kind
        self.runner.start(work)
        self.window.update_steps()

    def start_call(self, kind: str, call: Callable[[Any], Any]) -> None:
        """Run a plain function; its result comes back to on_event as a JobResult."""
        self.window.job_kind = kind
        self.runner.start_call(call)
        self.window.update_steps()

    def on_event(self, event) -> None:
        """An event of this controller's job (Failed events go to on_failed first)."""

    def on_failed(self, event: Failed) -> bool:
        """Put the page into its failed state; True when the page says all there is to say
        (no error dialog needed)."""
        return False

    def on_done(self) -> None:
        """The job's thread has finished."""
