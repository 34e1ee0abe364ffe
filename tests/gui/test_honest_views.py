"""What the run page, the data page and the report say must be true, also when a run fails (issue 12)."""

import numpy as np

from modeldoctor.errors import DataError
from tests.gui.conftest import load, run_checkup


def test_unusable_text_file_is_refused_when_chosen(window, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n ", encoding="utf-8")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait".encode("latin-1"))
    page = window.data_page
    assert not page.set_user_file(str(empty))
    assert "contains no text" in page.file_label.text() and page.spec().source == "builtin"
    assert page.builtin.isChecked()
    assert not page.set_user_file(str(binary))
    assert "not UTF-8" in page.file_label.text() and page.spec().source == "builtin"
    good = tmp_path / "good.txt"
    good.write_text("One paragraph of text.\n\nAnd another one.", encoding="utf-8")
    assert page.set_user_file(str(good))
    assert page.spec().source == str(good) and "2 passages" in page.file_label.text()


def test_failed_checkup_says_so_everywhere(qtbot, window, llama_dir, monkeypatch, screenshots):
    shown = []
    monkeypatch.setattr("modeldoctor.gui.main_window.show_error",
                        lambda parent, message, details="": shown.append(message))
    load(qtbot, window, llama_dir)

    def broken(spec):
        raise DataError("The text has only 12 tokens; at least 128 are needed.")
    monkeypatch.setattr(window.state.session, "data", broken)
    window.start_checkup()
    qtbot.waitUntil(lambda: not window.runner.busy and bool(shown), timeout=30000)
    page = window.run_page
    assert not window.state.running and window.state.report is None
    assert page.progress.maximum() > 0, "no busy bar after a failure"
    assert page.eta.text() == "Failed" and not page.pause.isEnabled() and not page.cancel.isEnabled()
    assert page.problem.isVisible() and "only 12 tokens" in page.problem.text() and "Start checkup" in \
        page.problem.text()
    assert "failed: The text has only 12 tokens" in page.log.toPlainText()
    assert "failed" in window.statusBar().currentMessage() and "running" not in window.statusBar().currentMessage()
    assert page.heatmap.image.image[..., 3].max() == 0, "an empty heatmap, not a solid colour"
    assert "x0.001" not in page.bars.getAxis("bottom").labelString()
    assert window.plan_page.start.isEnabled()
    page.grab().save(str(screenshots / "tiny-run-failed.png"))


def test_heatmap_shares_the_bars_colours_and_leaves_unmeasured_cells_empty(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    window.plan_page.int8_dynamic.setChecked(False)
    window.plan_page.bits[2].setChecked(True)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.threshold.setValue(0.05)
    run_checkup(qtbot, window)
    page = window.run_page
    page.redraw()
    cells = page.model.heatmap()
    for column, name in enumerate(cells.cols):
        page.modification.setCurrentText(name)
        page.redraw()
        bars = [tuple(b.color().getRgb()[:3]) for b in page.bars.bars.opts["brushes"]]
        image = page.heatmap.image.image
        assert [tuple(image[row, column, :3]) for row in range(len(cells.rows))] == bars
    assert (page.heatmap.image.image[..., 3] == 255).all()
    assert "healthy" not in page.heatmap.cell_text(0, 0) or "mean KL" in page.heatmap.cell_text(0, 0)
    # A run under way: the cells of probes not measured yet are transparent, not green.
    page.model.expect([r.spec for r in page.model.records])
    page.model.replace_all(page.model.records[:2])
    page.redraw()
    alpha = page.heatmap.image.image[..., 3]
    assert (alpha == 0).sum() == alpha.size - 2
    assert page.heatmap.cell_text(len(cells.rows) - 1, len(cells.cols) - 1) == "not measured yet"


def test_no_knowledge_probes_no_nan_and_one_image_per_modification(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    window.data_page.knowledge.setChecked(False)
    window.plan_page.prune_on.setChecked(False)
    run_checkup(qtbot, window)
    report = window.state.report
    assert report.reference_knowledge() is None
    window.go(4)
    assert "nan" not in window.diagnosis_page.text.toPlainText()
    images = window.report_images()
    names = [n for n in images if n.startswith("Bleeding per layer under ")]
    assert names == [f"Bleeding per layer under {m}" for m in window.run_page.model.modifications()]
    assert len(set(images.values())) == len(images), "each image shows something different"
    path = tmp_path / "report.html"
    window.write_html(path)
    text = path.read_text(encoding="utf-8")
    assert "nan%" not in text and all(name in text for name in names)


def test_bar_labels_never_overlap(qtbot):
    from modeldoctor.gui.plots import BleedingBarChart
    from modeldoctor.gui.viewmodel import Bars

    chart = BleedingBarChart()
    qtbot.addWidget(chart)
    chart.resize(900, 400)
    chart.show()
    values = [0.001] * 30
    values[28], values[29], values[2], values[9] = 0.113, 0.109, 0.05, 0.04
    bars = Bars([str(i) for i in range(30)], values,
                ["healthy" if v < 0.01 else "moderate" for v in values], [None] * 30, [False] * 30)
    chosen = chart.labelled_bars(bars, 30)
    assert 28 in chosen and 29 not in chosen
    assert all(abs(a - b) > 1 for a in chosen for b in chosen if a != b)
    assert chart.threshold_label.zValue() > chart.bars.zValue()
    assert np.isfinite(chart.threshold_line.value())


def test_bar_labels_follow_the_width(qtbot):
    """Bars drawn while the chart is narrow get labelled again once it is wide (the worst-layers
    chart: adjacent bars, each wide enough for its label)."""
    from modeldoctor.gui.plots import BleedingBarChart
    from modeldoctor.gui.viewmodel import Bars

    chart = BleedingBarChart()
    qtbot.addWidget(chart)
    chart.resize(220, 300)
    chart.show()
    qtbot.waitExposed(chart)
    values = [0.163, 0.113, 0.109, 0.0555, 0.0233]
    bars = Bars(["11", "28", "29", "2", "9"], values, ["moderate"] * 5, [None] * 5, [False] * 5)
    chart.update_bars(bars, 5)

    def labelled():
        return [label.toPlainText().split()[0] for label in chart.labels if label.isVisible()]

    assert labelled() != ["11", "28", "29"], "too narrow for three adjacent labels"
    chart.resize(1000, 300)
    qtbot.waitUntil(lambda: labelled() == ["11", "28", "29"], timeout=3000)
    # Each label stands over its own bar, at the ends of the axis too (it leans inwards from there).
    qtbot.wait(100)  # text items take their anchors into account when next drawn
    view = chart.plotItem.vb
    for label in chart.labels:
        if label.isVisible():
            index = ["11", "28", "29", "2", "9"].index(label.toPlainText().split()[0])
            centre = view.mapSceneToView(label.sceneBoundingRect().center()).x()
            assert index - 0.4 <= centre <= index + 0.4, (label.toPlainText(), centre)


def test_category_axis_labels_fit_side_by_side(qtbot):
    """60 linear names under the Export page's chart: the axis shows every k-th name, far enough
    apart that none overlaps its neighbour, more of them on a wider chart, all when they fit."""
    import pyqtgraph as pg
    from PySide6.QtGui import QFontMetrics

    from modeldoctor.gui.plots import LabelAxis

    axis = LabelAxis(orientation="bottom")
    plot = pg.PlotWidget(axisItems={"bottom": axis})
    qtbot.addWidget(plot)
    names = [f"{i}.mlp.down_proj" for i in range(60)]
    axis.set_labels(names)
    plot.setXRange(-0.5, 59.5, padding=0)
    widest = max(QFontMetrics(axis.style.get("tickFont") or plot.font()).horizontalAdvance(n) for n in names)

    def shown(width: int) -> list[float]:
        plot.resize(width, 300)
        plot.show()
        qtbot.waitExposed(plot)
        qtbot.wait(50)
        positions = [x for x, _ in axis._tickLevels[0]]
        spacing_px = min(b - a for a, b in zip(positions, positions[1:])) * axis.width() / 60
        assert spacing_px > widest, (width, spacing_px, widest)
        return positions

    narrow, wide = shown(500), shown(1800)
    assert 1 < len(narrow) < len(wide)
    axis.set_labels([str(i) for i in range(30)])
    assert len(axis._tickLevels[0]) == 30  # short labels: every one


def test_a_pause_is_not_probe_time_and_the_plan_shows_a_range(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    window.plan_page.exhaustive.setChecked(True)
    window.plan_page.bits[2].setChecked(True)
    summary = window.plan_page.summary.text()
    assert "on this computer (estimated from a timed pass)" in summary and ("–" in summary or "about" in summary)
    from modeldoctor.events import Progress

    progress = []
    window.runner.event.connect(lambda e: progress.append(e) if isinstance(e, Progress) else None)
    window.start_checkup()
    # Paused once a few probes are measured: an ETA from one probe's rate swings with the next one.
    qtbot.waitUntil(lambda: sum(not r.estimated for r in window.run_page.model.records) >= 3
                    and any(e.eta_s is not None for e in progress), timeout=60000)
    window.run_page.pause.click()
    paused_at = len(progress)
    assert window.run_page.eta.text() == "paused"
    qtbot.wait(3000)
    window.run_page.pause.click()
    assert window.run_page.eta.text() != "paused"
    qtbot.waitUntil(lambda: window.state.report is not None and not window.runner.busy, timeout=120000)
    slowest = max(p.seconds for p in window.state.report.probes)
    assert slowest < 2.5, f"a probe took {slowest:.2f} s: the 3 s pause was counted"
    assert min(p.seconds for p in window.state.report.probes) >= 0, "the pause was subtracted twice"
    # The ETA after the pause knows nothing of it (it includes the knowledge stage still to come,
    # so it is compared with itself, not with the probes left). A probe charged the 3 s pause would
    # have a rate tens of times the others' and multiply the ETA; the rates' own spread on these
    # tiny probes (tens of milliseconds) moves it by less than double.
    before = [e.eta_s for e in progress[:paused_at] if e.eta_s is not None and e.stage == "probes"]
    after = [e.eta_s for e in progress[paused_at + 1:] if e.eta_s is not None and e.stage == "probes"]
    assert before and after and all(eta >= 0 for eta in after)
    assert after[0] <= 2 * before[-1] + 1.0, (before[-1], after[0])


def test_every_page_fits_a_1280x720_screen_and_recent_paths_are_whole(qtbot, window, llama_dir):
    from PySide6.QtCore import Qt

    window.resize(1280, 720)
    qtbot.waitUntil(lambda: window.size().width() == 1280 and window.size().height() == 720, timeout=5000)
    load(qtbot, window, llama_dir)
    from PySide6.QtWidgets import QScrollArea

    for index in range(window.pages.count()):
        window.pages.setCurrentIndex(index)
        widget = window.pages.widget(index)
        if isinstance(widget, QScrollArea):  # a form: scrolls when it does not fit, never sideways here
            page, room = widget.widget(), widget.viewport().size()
            assert widget.widgetResizable()
            assert page.minimumSizeHint().width() <= room.width(), (type(page).__name__, room)
        else:  # a page of plots: fits as it is
            page, room = widget, window.pages.size()
            hint = page.minimumSizeHint()
            assert hint.width() <= room.width() and hint.height() <= room.height(), (type(page).__name__, hint)
    window.load_page.set_recent([str(llama_dir), "/a/very/long/path/" + "deep/" * 20 + "model"])
    item = window.load_page.recent.item(1)
    assert item.toolTip().endswith("/model") and item.data(Qt.ItemDataRole.UserRole).startswith("/a/very")
    assert item.text().startswith("model  —  ")
    assert window.load_page.recent.textElideMode() == Qt.TextElideMode.ElideMiddle


def test_dark_theme_is_applied_and_remembered(qtbot, window, tmp_path):
    from PySide6.QtCore import QSettings
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QApplication

    from modeldoctor.gui.main_window import MainWindow

    window.set_theme("dark")
    try:
        assert window.dark and QApplication.instance().palette().color(QPalette.ColorRole.Window).lightness() < 80
        assert window.settings.value("view/theme") == "dark"
        again = MainWindow(window.settings)
        qtbot.addWidget(again)
        assert again.dark
    finally:
        window.set_theme("light")
    assert QApplication.instance().palette().color(QPalette.ColorRole.Window).lightness() > 150
