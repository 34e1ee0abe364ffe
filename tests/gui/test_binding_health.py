"""The Qt binding must not leak references to None: on Python 3.11 None is an ordinary object,
and a binding that drops a reference on every signal or redraw (PySide6 6.12.0 does) crashes
the app with 'Fatal Python error: none_dealloc' a few minutes into a checkup."""

import gc
import sys

from modeldoctor.events import Progress
from tests.gui.conftest import load


def _none_refs() -> int:
    gc.collect()
    return sys.getrefcount(None)


def test_signals_and_redraws_keep_none_alive(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    before = _none_refs()
    window.job_kind = "checkup"

    def work(control):
        for i in range(500):
            yield Progress(i, 500, 1.0, None)
    window.runner.start(work)
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    for _ in range(100):
        window.run_page.model.version += 1
        window.run_page.redraw()
    qtbot.wait(200)
    assert _none_refs() - before > -100, "the Qt binding leaks references to None; see pyproject.toml"
