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


THEMES = ("system", "light", "dark")


def system_is_dark(app) -> bool:
    from PySide6.QtCore import Qt

    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def dark_palette():
    from PySide6.QtGui import QColor, QPalette

    palette = QPalette()
    role = QPalette.ColorRole
    for name, color in ((role.Window, (45, 45, 48)), (role.WindowText, (230, 230, 230)), (role.Base, (30, 30, 32)),
                        (role.AlternateBase, (45, 45, 48)), (role.Text, (230, 230, 230)),
                        (role.Button, (55, 55, 58)), (role.ButtonText, (230, 230, 230)),
                        (role.ToolTipBase, (60, 60, 64)), (role.ToolTipText, (230, 230, 230)),
                        (role.Highlight, (42, 130, 218)), (role.HighlightedText, (255, 255, 255)),
                        (role.Link, (90, 170, 255)), (role.PlaceholderText, (150, 150, 150))):
        palette.setColor(name, QColor(*color))
    for name in (role.WindowText, role.Text, role.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, name, QColor(120, 120, 120))
    return palette


def apply_palette(app, theme: str = "system") -> bool:
    """Light or dark widgets ("system" follows the desktop's colour scheme); pyqtgraph plots follow
    the palette. Returns whether the result is dark. Plots created before a change keep their colours
    until the window is reopened."""
    import pyqtgraph as pg
    from PySide6.QtGui import QPalette

    dark = theme == "dark" or (theme == "system" and system_is_dark(app))
    if dark:
        app.setStyle("Fusion")
        app.setPalette(dark_palette())
    else:
        app.setPalette(app.style().standardPalette())
    palette = app.palette()
    pg.setConfigOptions(background=palette.color(QPalette.ColorRole.Base),
                        foreground=palette.color(QPalette.ColorRole.Text), antialias=True)
    return dark


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
    from modeldoctor.gui.main_window import MainWindow

    window = MainWindow()
    install_exception_dialog(lambda: window)
    window.show()
    if model == "sample":
        window.open_sample()
    elif model:
        window.open_model(model)
    return app.exec()
