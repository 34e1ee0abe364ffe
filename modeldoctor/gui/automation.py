"""Drive the app without a person: used by the screenshot script and the responsiveness benchmark."""

from __future__ import annotations

import time

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication


def make_window(settings_path: str | None = None):
    from modeldoctor.gui.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    settings = QSettings(settings_path, QSettings.Format.IniFormat) if settings_path else None
    window = MainWindow(settings)
    window.resize(1280, 720)
    window.show()
    return app, window


def wait_until(predicate, timeout_s: float = 3600.0, step_ms: int = 20) -> None:
    """Spin the event loop until predicate() holds."""
    app = QApplication.instance()
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not reach the expected state in time")
        app.processEvents()
        time.sleep(step_ms / 1000)
    app.processEvents()


def load_sample(window) -> None:
    window.open_sample()
    wait_until(lambda: window.state.session is not None and not window.runner.busy, 900)


def run_default_checkup(window) -> None:
    window.start_checkup()
    wait_until(lambda: window.state.report is not None and not window.runner.busy)
