"""Start the desktop app. Uncaught exceptions become a dialog and a line in the user log."""

from __future__ import annotations

import datetime
import sys
import threading
import traceback
from pathlib import Path


def log_path() -> Path:
    import platformdirs

    folder = Path(platformdirs.user_log_dir("modeldoctor"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "modeldoctor.log"


def log_exception_text(text: str) -> Path | None:
    try:
        path = log_path()
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n{text}\n")
        return path
    except OSError:
        return None


def install_exception_dialog(window_getter) -> None:
    """Any uncaught exception: log it, then show the error dialog (never a silent crash)."""
    from PySide6.QtCore import QTimer

    from modeldoctor.gui.dialogs import show_error

    def handle(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        path = log_exception_text(text)
        message = f"Something went wrong: {value}" + (f"\n\nThe details were written to {path}." if path else "")
        QTimer.singleShot(0, lambda: show_error(window_getter(), message, text))

    sys.excepthook = handle
    threading.excepthook = lambda args: handle(args.exc_type, args.exc_value, args.exc_traceback)


def apply_palette(app) -> None:
    """pyqtgraph plots follow the system's light or dark palette."""
    import pyqtgraph as pg
    from PySide6.QtGui import QPalette

    palette = app.palette()
    pg.setConfigOptions(background=palette.color(QPalette.ColorRole.Base),
                        foreground=palette.color(QPalette.ColorRole.Text), antialias=True)


def run_app(model: str | None = None) -> int:
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from modeldoctor.resources import RESOURCES

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Model Doctor")
    app.setOrganizationName("ModelDoctor")
    icon = RESOURCES / "icons" / "modeldoctor.svg"
    if icon.exists():
        app.setWindowIcon(QIcon(str(icon)))
    apply_palette(app)
    from modeldoctor.gui.main_window import MainWindow

    window = MainWindow()
    install_exception_dialog(lambda: window)
    window.show()
    if model == "sample":
        window.open_sample()
    elif model:
        window.open_model(model)
    return app.exec()
