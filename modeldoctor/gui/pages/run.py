"""Step 4: the live checkup. Plots redraw from the view model at most ~30 times a second."""

from __future__ import annotations

import time

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton, QSplitter, QTabWidget,
    QVBoxLayout, QWidget,
)
from PySide6.QtCore import Qt

from modeldoctor.gui.pages.data import format_duration, format_range
from modeldoctor.gui.anatomy import AnatomyView
from modeldoctor.gui.plots import BleedingBarChart, BleedingHeatmap, CurvePlot
from modeldoctor.gui.viewmodel import CheckupViewModel

REDRAW_MS = 33


class RunPage(QWidget):
    pauseToggled = Signal(bool)
    cancelRequested = Signal()
    resumeRequested = Signal()  # continue a cancelled checkup, keeping its measured probes
    probeClicked = Signal(object)  # ProbeRecord

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = CheckupViewModel()
        self._drawn_version = -1
        self.total_probes = 0
        self.redraws = 0
        self._eta_text = ""
        self._began = time.monotonic()
        self.expected_per_modification: dict[str, int] = {}
        layout = QVBoxLayout(self)
        intro = QLabel("<b>Checkup.</b> Each bar is one layer modified alone, measured against the original: "
                       "bars above the dashed line bleed (and a clear outlier among its peers is marked bleeding too). Click a bar for its full story. <b>Next:</b> when it "
                       "finishes, read the diagnosis.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        top = QHBoxLayout()
        self.progress = QProgressBar()
        self.eta = QLabel("Not started")
        self.pause = QPushButton("Pause")
        self.pause.setCheckable(True)
        self.cancel = QPushButton("Cancel")
        self.resume = QPushButton("Resume checkup")
        self.resume.setToolTip("Continue the cancelled checkup: the probes it measured are kept, not run again.")
        self.resume.hide()
        for widget in (self.pause, self.cancel):
            widget.setEnabled(False)
        top.addWidget(self.progress, 1)
        top.addWidget(self.eta)
        top.addWidget(self.pause)
        top.addWidget(self.cancel)
        top.addWidget(self.resume)
        layout.addLayout(top)
        self.problem = QLabel()  # why a run failed and what to do next
        self.problem.setWordWrap(True)
        self.problem.setStyleSheet("QLabel { color: #c8373b; font-weight: bold; }")
        self.problem.hide()
        layout.addWidget(self.problem)

        splitter = QSplitter(Qt.Orientation.Vertical)
        upper = QSplitter(Qt.Orientation.Horizontal)
        bar_panel = QWidget()
        bar_layout = QVBoxLayout(bar_panel)
        bar_layout.setContentsMargins(0, 0, 0, 0)
        chooser = QHBoxLayout()
        chooser.addWidget(QLabel("Bleeding per layer under"))
        self.modification = QComboBox()
        chooser.addWidget(self.modification, 1)
        chooser.addWidget(QLabel("(click a bar for details)"))
        self.glossary = QPushButton("What does this mean?")
        chooser.addWidget(self.glossary)
        bar_layout.addLayout(chooser)
        self.basis_note = QLabel()  # which bars are estimates and which are measurements
        self.basis_note.setWordWrap(True)
        self.basis_note.hide()
        bar_layout.addWidget(self.basis_note)
        self.bars = BleedingBarChart()
        bar_layout.addWidget(self.bars)
        upper.addWidget(bar_panel)
        self.right_tabs = QTabWidget()
        self.anatomy = AnatomyView()  # the model itself, coloured by the selected modification
        self.anatomy.setToolTip("The model as its blocks (rows) and their linears (columns); click a cell for "
                                "its probe.")
        self.heatmap = BleedingHeatmap()
        self.right_tabs.addTab(self.anatomy, "Anatomy")
        self.right_tabs.addTab(self.heatmap, "Heatmap")
        upper.addWidget(self.right_tabs)
        upper.setSizes([640, 400])
        self.linear_names: list[str] = []  # the loaded model's, for the anatomy view
        splitter.addWidget(upper)
        lower = QTabWidget()
        self.cumulative = CurvePlot("modified layers (cumulative)", empty_text=(
            "No cumulative probes: tick 'cumulative (1..k)' on the Plan page to fill this tab."))
        self.sweep = CurvePlot("strength (bits or sparsity)", empty_text=(
            "No strength sweep: tick 'strength sweep' on the Plan page to fill this tab."))
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        lower.addTab(self.log, "Log")
        lower.addTab(self.cumulative, "Cumulative")
        lower.addTab(self.sweep, "Strength sweep")
        self.lower_tabs = lower
        splitter.addWidget(lower)
        splitter.setSizes([480, 220])
        layout.addWidget(splitter, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.pause.toggled.connect(self._pause_toggled)
        self.cancel.clicked.connect(self.cancelRequested)
        self.resume.clicked.connect(self.resumeRequested)
        self.modification.currentTextChanged.connect(self._select)
        self.bars.barClicked.connect(self._bar_clicked)
        self.anatomy.cellClicked.connect(self._cell_clicked)
        self.glossary.clicked.connect(self.show_glossary)
        for plot in (self.cumulative, self.sweep):
            plot.update_curves({}, [])

    def show_glossary(self) -> None:
        from modeldoctor.gui.glossary import GlossaryDialog

        GlossaryDialog(self).show()

    # ---- run lifecycle -------------------------------------------------------------------
    def begin(self, threshold: float) -> None:
        self.model.reset(threshold)
        for plot in (self.bars, self.heatmap, self.cumulative, self.sweep):
            plot.set_threshold(threshold)
        self.cumulative.clear_curves()
        self.sweep.clear_curves()
        self.modification.clear()
        self.log.clear()
        self.progress.setRange(0, 0)
        self.eta.setText("Preparing …")
        self.pause.setChecked(False)
        self.pause.setEnabled(True)
        self.cancel.setEnabled(True)
        self.resume.hide()
        self.problem.hide()
        self._began = time.monotonic()
        self.timer.start()

    def set_total(self, total: int) -> None:
        self.total_probes = total
        self.progress.setRange(0, total)
        self.progress.setValue(0)

    def progress_update(self, done: int, total: int, eta_s: float | None,
                        eta_range: tuple[float, float] | None = None, stage: str = "probes") -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        if stage == "knowledge":
            self.progress.setFormat(f"knowledge probes on the worst: {done} / {total}")
        elif stage == "context":
            self.progress.setFormat(f"long-context probes: {done} / {total}")
        elif total > self.total_probes > 0:  # settling measures estimated probes again: one step each
            self.progress.setFormat(f"step {done} / {total}: {self.total_probes} probes, "
                                    f"{total - self.total_probes} re-checked estimates")
        else:
            self.progress.setFormat(f"probe {done} / {total}")
        if done >= total:
            text = "finishing …"
        elif eta_range is not None:
            text = f"{format_range(*eta_range)} left"
        else:
            text = f"ETA {format_duration(eta_s)}"
        self._eta_text = text
        self.eta.setText("paused" if self.pause.isChecked() else text)

    def end(self, reason: str, records=None) -> None:
        self.timer.stop()
        if records is not None:
            self.model.replace_all(records)
        self.redraw()
        if self.progress.maximum() == 0:  # still the "preparing" busy bar: the run never got to its probes
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat(reason)
        self.pause.setEnabled(False)
        self.cancel.setEnabled(False)
        self.pause.blockSignals(True)  # a run that ended is not "resumed"
        self.pause.setChecked(False)
        self.pause.setText("Pause")
        self.pause.blockSignals(False)
        elapsed = time.monotonic() - self._began
        self.eta.setText(f"{reason} in {format_duration(elapsed)}")
        kept = [r for r in (records or []) if not r.estimated]
        self.resume.setVisible(reason == "cancelled" and bool(records))
        if reason == "cancelled" and records:
            self.eta.setText(f"cancelled after {format_duration(elapsed)}: {len(kept)} measured probes kept "
                             "(partial)")

    def fail(self, message: str, model_restored: bool = True) -> None:
        """Every widget says the run stopped, why, and what to do; nothing looks busy."""
        self.end("failed")
        self.progress.setRange(0, max(self.total_probes, 1))
        self.progress.setFormat("failed")
        self.eta.setText("Failed")
        self.resume.hide()
        if model_restored:
            self.problem.setText(f"The checkup failed: {message} Nothing about the model was changed. Fix the "
                                 "cause (Evaluation data or Plan step) and press Start checkup again.")
        else:  # the message says what to do: load the model again (its files were never written)
            self.problem.setText(f"The checkup failed: {message} Your model's files were not touched.")
        self.problem.show()
        self.append_log(f"failed: {message}")

    def show_report(self, report, resumable: bool = False) -> None:
        """Redraw everything from a finished (or reopened) report without running anything; Resume is
        offered for a cancelled one of the model that is loaded."""
        threshold = report.plan.get("threshold", 0.01)
        self.model.reset(threshold)
        for plot in (self.bars, self.heatmap, self.cumulative, self.sweep):
            plot.set_threshold(threshold)
        self.model.replace_all(report.probes)
        self.total_probes = len(self.model.bars().values)
        self.progress.setRange(0, max(len(report.probes), 1))
        self.progress.setValue(len(report.probes))
        self.progress.setFormat(f"{len(report.probes)} probes")
        self.eta.setText(f"{report.status}, {format_duration(report.elapsed_s)}")
        self.problem.hide()
        self.resume.setVisible(resumable)
        self.redraw()

    def add_record(self, record) -> None:
        self.model.add(record)

    def append_log(self, text: str) -> None:
        self.log.appendPlainText(text)

    # ---- drawing ---------------------------------------------------------------------------
    def redraw(self) -> None:
        if self.model.version == self._drawn_version:
            return
        self._drawn_version = self.model.version
        self.redraws += 1
        names = self.model.modifications()
        if [self.modification.itemText(i) for i in range(self.modification.count())] != names:
            self.modification.blockSignals(True)
            self.modification.clear()
            self.modification.addItems(names)
            if self.model.selected in names:
                self.modification.setCurrentText(self.model.selected)
            self.modification.blockSignals(False)
        bars = self.model.bars()
        guessed, shown = self.model.estimated_count()
        self.basis_note.setVisible(guessed > 0)
        self.basis_note.setText(
            f"{guessed} of {shown} bars are estimates (pale, dashed outline: a second-order estimate from one "
            f"backward pass); solid bars are measured exactly. The highest estimates and a random few are "
            f"measured next and replace their estimates, then any estimate that could still reach the top or the "
            f"threshold, given how far the measured ones ran above theirs.")
        expected = sum(1 for _ in bars.values)
        self.bars.setTitle(f"{self.model.selected}: mean KL per layer" if self.model.selected else "")
        self.bars.update_bars(bars, total=max(expected, self._expected_bars()))
        self.heatmap.update_matrix(self.model.heatmap(), f"blocks × linears under {self.model.selected}"
                                   if self.model.linear_scope() else "blocks × modifications")
        self._draw_anatomy()
        cumulative = self.model.cumulative()
        self.cumulative.update_curves({k: (x, y) for k, (x, y, _) in cumulative.items()},
                                      [(c, y[list(x).index(c)]) for _, (x, y, c) in cumulative.items() if c])
        sweeps = self.model.sweeps()
        self.sweep.update_curves(sweeps, [])

    def _draw_anatomy(self) -> None:
        from modeldoctor.gui.viewmodel import AnatomyLayout, checkup_cells

        names = self.linear_names or [t for r in self.model.records for t in r.spec.targets]
        layout = AnatomyLayout.from_names(names)
        if not layout.columns:  # a reopened block-scope session without its model: one cell per block
            layout = AnatomyLayout.from_names([f"{t}.block" for r in self.model.records for t in r.spec.targets
                                               if t.isdigit()])
        self.anatomy.set_layout(layout)
        threshold = self.model.threshold
        self.anatomy.set_cells(
            checkup_cells(layout, self.model.records, self.model.selected),
            legend=(f"green: healthy (≤ {threshold:g} nats) · yellow, orange, red: bleeding (> {threshold:g}, "
                    f"> {5 * threshold:g}, > {50 * threshold:g}) · pale: estimated · hatched: not measured yet"),
            title=f"{self.model.selected or ''}")

    def _cell_clicked(self, name: str) -> None:
        cell = self.anatomy.cells.get(name)
        if cell is not None and cell.record is not None:
            self.probeClicked.emit(cell.record)

    def _expected_bars(self) -> int:
        """Bars the selected modification will have when done (keeps the x axis still)."""
        return self.expected_per_modification.get(self.model.selected, 0)

    def _select(self, name: str) -> None:
        if name:
            self.model.select(name)
            self.redraw()

    def _pause_toggled(self, paused: bool) -> None:
        self.pause.setText("Resume" if paused else "Pause")
        if self.pause.isEnabled():  # a run is under way (end() unchecks the button too)
            self.eta.setText("paused" if paused else self._eta_text)
        self.pauseToggled.emit(paused)

    def _bar_clicked(self, index: int) -> None:
        self.probeClicked.emit(self.bars.current.records[index])
