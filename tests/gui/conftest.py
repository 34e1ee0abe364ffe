import os

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"


@pytest.fixture()
def window(qtbot, tmp_path):
    from PySide6.QtCore import QSettings

    from modeldoctor.gui.main_window import MainWindow

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings)
    qtbot.addWidget(win)
    win.show()
    yield win
    # No thread or timer may outlive a test.
    if win.runner.busy:
        win.runner.cancel()
        assert win.runner.wait(60000)
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=60000)
    win.run_page.timer.stop()


@pytest.fixture()
def screenshots():
    from pathlib import Path

    folder = Path(os.environ.get("MODELDOCTOR_SCREENSHOTS", Path(__file__).parent.parent.parent / "build" / "screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load(qtbot, window, path):
    window.open_model(str(path))
    qtbot.waitUntil(lambda: window.state.session is not None and not window.runner.busy, timeout=60000)


def run_checkup(qtbot, window, timeout=120000):
    window.start_checkup()
    qtbot.waitUntil(lambda: window.state.report is not None and not window.runner.busy, timeout=timeout)
