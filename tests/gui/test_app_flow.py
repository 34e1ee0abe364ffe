"""Drive the whole flow with a tiny random model, as a user would with the mouse."""

import numpy as np
import pytest
from PySide6.QtCore import Qt

from modeldoctor.gui.viewmodel import SEVERITY_COLORS
from tests.gui.conftest import load, run_checkup


def _bar_colors(window):
    brushes = window.run_page.bars.bars.opts["brushes"]
    return [tuple(b.color().getRgb()[:3]) for b in brushes]


def test_steps_locked_until_model_loaded(window):
    for index in range(1, 7):
        item = window.steps.item(index)
        assert not item.flags() & Qt.ItemFlag.ItemIsEnabled
        assert item.toolTip()
    window.go(3)
    assert window.pages.currentIndex() == 0


def test_load_plan_run_diagnose(qtbot, window, llama_dir, screenshots):
    load(qtbot, window, llama_dir)
    card = window.load_page.card_text()
    assert "Architecture: LlamaForCausalLM" in card and "Blocks: 3" in card
    window.load_page.grab().save(str(screenshots / "tiny-load.png"))
    window.data_page.slider.setValue(2)  # 256 tokens
    window.plan_page.int8_dynamic.setChecked(False)
    window.plan_page.bits[4].setChecked(False)
    window.plan_page.bits[2].setChecked(True)
    window.plan_page.prune_on.setChecked(False)
    assert window.plan_page.modifications() == ["int2", "remove"]
    run_checkup(qtbot, window)
    report = window.state.report
    assert report.status == "completed"
    window.run_page.modification.setCurrentText("int2")
    window.run_page.redraw()
    chart = window.run_page.bars
    int2 = sorted((p for p in report.probes if p.spec.modification == "int2" and p.spec.mode == "isolated"),
                  key=lambda p: int(p.spec.targets[0]))
    assert list(chart.bars.opts["x"]) == [0, 1, 2] and chart.bottom.labels == ["0", "1", "2"] and len(int2) == 3
    # What a user reads off the chart: each bar's height, through the left axis's own tick labels,
    # is its block's mean KL from the report; bars over the threshold line are the ones over it.
    heights = np.asarray(chart.bars.opts["height"], dtype=float)
    axis = chart.getAxis("left")
    at0, at1 = (float(axis.tickStrings([v], 1.0, 1.0)[0]) for v in (0.0, 1.0))
    kl = np.array([p.metrics["kl_mean"] for p in int2])
    np.testing.assert_allclose(at0 * (at1 / at0) ** heights, kl, rtol=1e-6)
    threshold = report.plan["threshold"]
    assert list(heights > chart.threshold_line.value()) == list(kl > threshold)
    # Colours: green exactly for the probes that do not bleed, and never a milder colour for a larger KL.
    colors = _bar_colors(window)
    assert [c == SEVERITY_COLORS["healthy"] for c in colors] == [not p.bleeding for p in int2]
    scale = list(SEVERITY_COLORS.values())
    ranks = [scale.index(c) for _, c in sorted(zip(kl, colors))]
    assert ranks == sorted(ranks)
    window.run_page.grab().save(str(screenshots / "tiny-run.png"))
    window.go(4)
    text = window.diagnosis_page.text.toPlainText()
    assert "int2" in text and "bleed" in text
    assert window.steps.item(5).flags() & Qt.ItemFlag.ItemIsEnabled


def test_cancel_mid_run_restores_model(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    before = window.state.session.weights_digest()
    window.plan_page.bits[2].setChecked(True)
    window.plan_page.duplicate.setChecked(True)
    window.plan_page.cumulative.setChecked(True)
    window.start_checkup()
    qtbot.waitUntil(lambda: len(window.run_page.model.records) >= 2, timeout=60000)
    window.run_page.cancel.click()
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    report = window.state.report  # kept as a partial checkup, not thrown away
    assert report is not None and report.status == "cancelled" and report.probes and not window.state.running
    assert "cancelled" in window.run_page.eta.text()
    assert window.state.session.weights_digest() == before


def test_pause_and_resume(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.plan_page.exhaustive.setChecked(True)  # probes one by one (estimates arrive all at once)
    window.start_checkup()
    qtbot.waitUntil(lambda: len(window.run_page.model.records) >= 1, timeout=60000)
    window.run_page.pause.click()
    assert window.runner.control.paused
    count = len(window.run_page.model.records)
    qtbot.wait(700)
    assert len(window.run_page.model.records) <= count + 1  # at most the probe under way finishes
    window.run_page.pause.click()
    qtbot.waitUntil(lambda: window.state.report is not None, timeout=120000)


def test_save_reopen_session_redraws_identically(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    window.plan_page.cumulative.setChecked(True)
    run_checkup(qtbot, window)
    window.run_page.redraw()
    before = (np.array(window.run_page.bars.bars.opts["height"]), _bar_colors(window),
              window.run_page.heatmap.image.image.copy())
    path = tmp_path / "session.json"
    window.write_session(path)

    from PySide6.QtCore import QSettings

    from modeldoctor.gui.main_window import MainWindow

    other = MainWindow(QSettings(str(tmp_path / "other.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(other)
    other.open_session(str(path))
    assert other.state.report is not None and other.state.session is None
    other.run_page.modification.setCurrentText(window.run_page.model.selected)
    other.run_page.redraw()
    assert np.array_equal(np.array(other.run_page.bars.bars.opts["height"]), before[0])
    assert _bar_colors(other) == before[1]
    assert np.array_equal(other.run_page.heatmap.image.image, before[2], equal_nan=True)
    assert other.pages.currentIndex() == 4


def test_html_export_contains_plots(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    run_checkup(qtbot, window)
    path = tmp_path / "report.html"
    window.write_html(path)
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") >= 2
    assert "Bleeding per layer" in text and "Diagnosis" in text


def test_bad_model_shows_dialog_not_crash(qtbot, window, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("modeldoctor.gui.main_window.show_error",
                        lambda parent, message, details="": shown.append(message))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    window.open_model(str(bad))
    qtbot.waitUntil(lambda: not window.runner.busy and bool(shown), timeout=30000)
    assert "not a valid GGUF" in shown[0]
    assert window.state.session is None
    assert window.load_page.open_folder.isEnabled()


def test_clicking_a_bar_opens_details_with_continuations(qtbot, window, llama_dir):
    from modeldoctor.gui.dialogs import ProbeDetailsDialog

    load(qtbot, window, llama_dir)
    window.plan_page.prune_on.setChecked(False)
    run_checkup(qtbot, window)
    window.run_page.redraw()
    window.run_page.bars.barClicked.emit(1)
    dialogs = [d for d in window.findChildren(ProbeDetailsDialog) if d.isVisible()]
    assert len(dialogs) == 1
    dialog = dialogs[0]
    assert dialog.record.spec.targets == ("1",)
    assert dialog.tabs.count() >= 3  # metrics, cascade, continuations
    dialog.samples_button.click()
    qtbot.waitUntil(lambda: "reference (greedy)" in dialog.samples_view.toHtml(), timeout=60000)
    assert "modified" in dialog.samples_view.toHtml()
    dialog.close()


def test_uncaught_exception_shows_dialog_and_logs(qtbot, window, monkeypatch, tmp_path):
    import sys
    import threading

    from modeldoctor.gui import app as gui_app

    shown = []
    monkeypatch.setattr("modeldoctor.gui.dialogs.show_error", lambda parent, message, details="": shown.append(
        (message, details)))
    monkeypatch.setattr(gui_app, "log_path", lambda: tmp_path / "modeldoctor.log")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    gui_app.install_exception_dialog(lambda: window)
    try:
        raise ValueError("surprise")
    except ValueError:
        sys.excepthook(*sys.exc_info())
    qtbot.waitUntil(lambda: bool(shown), timeout=5000)
    assert "surprise" in shown[0][0] and "Traceback" in shown[0][1]
    assert "surprise" in (tmp_path / "modeldoctor.log").read_text()


def test_export_page_exports_and_validates(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    assert window.steps.item(6).flags() & Qt.ItemFlag.ItemIsEnabled
    window.plan_page.scope_linears.setChecked(True)
    window.plan_page.bits[4].setChecked(False)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.remove.setChecked(False)
    window.plan_page.threshold.setValue(0.0005)
    run_checkup(qtbot, window)
    page = window.export_page
    window.go(6)
    page.precisions["int8-dynamic"].setChecked(True)  # the format the checkup probed
    page.budget.setValue(0.001)
    assert page.kept(), "the checkup's worst layers are ticked to fit a tight budget"
    page.folder.setText(str(tmp_path / "onnx"))
    page.budget.setValue(5.0)
    page.start.click()
    qtbot.waitUntil(lambda: not window.runner.busy and page.table.rowCount() > 0, timeout=120000)
    assert page.table.item(0, 1).text().startswith("passed")
    assert (tmp_path / "onnx" / "model.onnx").exists() and (tmp_path / "onnx" / "modeldoctor.json").exists()
    assert page.measured.isVisible()
    # Predicted beside measured, and both speeds against the fp32 export, as the table says them.
    rows = {page.table.item(r, 0).text(): page.table.item(r, 1).text() for r in range(page.table.rowCount())}
    assert [k for k in rows][1:3] == ["mean KL (budget)", "predicted mean KL"]
    assert float(rows["predicted mean KL"].split()[0]) == pytest.approx(page.last_result.predicted_kl, abs=1e-4)
    speeds = [k for k in rows if k.startswith(("prefill time", "decode time"))]
    assert len(speeds) == 2 and all(rows[k].startswith("×") and ("faster" in rows[k] or "slower" in rows[k]
                                                                  or "same" in rows[k]) for k in speeds), rows


def test_export_over_budget_offers_next_step(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    page = window.export_page
    page.precisions["int4"].setChecked(True)
    page.folder.setText(str(tmp_path / "onnx"))
    page.budget.setValue(0.001)
    page.start.click()
    qtbot.waitUntil(lambda: not window.runner.busy and page.table.rowCount() > 0, timeout=120000)
    assert "over budget" in page.table.item(0, 1).text()
    assert not (tmp_path / "onnx").exists()
    assert page.more.isEnabled()
    page.more.click()
    assert sum(f == "int8" for f in page.formats().values()) == 5 + 1  # five raised, and the head
