"""Step 7: export a validated ONNX model, with the bleeding layers kept in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
    QListWidget, QListWidgetItem, QProgressBar, QPushButton, QRadioButton, QSplitter, QTabWidget, QTableWidget,
    QTableWidgetItem, QVBoxLayout, QWidget,
)

from modeldoctor.export.pipeline import (
    DEFAULT_BUDGET_KL, PREDICTORS, missing_checkup, missing_checkup_text, predicted_kl,
)
from modeldoctor.gui.anatomy import AnatomyView
from modeldoctor.gui.clock import JobClock
from modeldoctor.gui.plots import LabelAxis, LogAxis, backing
from modeldoctor.gui.viewmodel import KL_FLOOR, SEVERITY_COLORS, log_kl

KEPT_COLOR = (150, 150, 150)


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.{1 if count < 10 * size else 0}f} {unit}"
    return f"{int(count)} bytes"


class ExportPage(QWidget):
    exportRequested = Signal()
    cancelRequested = Signal()
    checkupRequested = Signal(str)  # a checkup of exactly this modification, the format the export writes

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.report = None
        self._session = None
        self.linears: list[str] = []
        self.predicted: dict[str, float] = {}
        self.last_result = None  # the latest export's ExportResult
        self.figures: dict[str, float] = {}  # what the chart draws: the linears' figures, else the blocks'
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Export</h2>Exports through optimum-onnx, quantizes with onnxruntime, keeps the "
                       "layers you tick in fp32, then validates the result against the original before "
                       "handing it over. An export over the KL budget is not written.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        left = QWidget()
        form_box = QVBoxLayout(left)
        options = QGroupBox("Precision and budget")
        form = QFormLayout(options)
        row = QHBoxLayout()
        self.precision_group = QButtonGroup(self)
        self.precisions = {}
        for name, text in (("fp32", "fp32"), ("int8", "int8 dynamic"), ("int4", "int4 weight-only (block 32)")):
            button = QRadioButton(text)
            self.precisions[name] = button
            self.precision_group.addButton(button)
            row.addWidget(button)
        self.precisions["int8"].setChecked(True)
        from modeldoctor.gui.glossary import tip

        self.precisions["fp32"].setToolTip("Every weight in 32-bit floats: the same function as the model.")
        self.precisions["int8"].setToolTip(tip("int8 dynamic"))
        self.precisions["int4"].setToolTip(tip("int4 g32 asym"))
        form.addRow("Precision:", row)
        self.budget = QDoubleSpinBox()
        self.budget.setDecimals(3)
        self.budget.setRange(0.001, 5.0)
        self.budget.setSingleStep(0.005)
        self.budget.setValue(DEFAULT_BUDGET_KL)
        self.budget.setSuffix(" nats")
        self.budget.setToolTip(tip("KL (nats)") + " An export whose measured mean KL is above this is not written.")
        form.addRow("Largest mean KL:", self.budget)
        folder_row = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder to create")
        choose = QPushButton("Choose…")
        folder_row.addWidget(self.folder, 1)
        folder_row.addWidget(choose)
        form.addRow("Save to:", folder_row)
        form_box.addWidget(options)
        keep_box = QGroupBox("Format of each linear (fp32 ticked from the checkup; click to switch)")
        keep_layout = QVBoxLayout(keep_box)
        self.keep_tabs = QTabWidget()
        self.anatomy = AnatomyView()  # the model's linears in the format the export writes for each
        self.keep = QListWidget()  # the same choice as a list (keyboard, screen readers)
        self.keep_tabs.addTab(self.anatomy, "Anatomy")
        self.keep_tabs.addTab(self.keep, "List")
        keep_layout.addWidget(self.keep_tabs)
        self.keep_note = QLabel()
        self.keep_note.setWordWrap(True)
        keep_layout.addWidget(self.keep_note)
        self.run_checkup = QPushButton()
        self.run_checkup.hide()
        keep_layout.addWidget(self.run_checkup)
        form_box.addWidget(keep_box, 1)
        self.prediction = QLabel()  # size and KL of the export before it is written
        self.prediction.setWordWrap(True)
        form_box.addWidget(self.prediction)
        buttons = QHBoxLayout()
        self.start = QPushButton("Export and validate")
        self.start.setMinimumHeight(32)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.more = QPushButton("Keep 5 more layers in fp32")
        self.more.setEnabled(False)
        for button in (self.start, self.cancel, self.more):
            buttons.addWidget(button)
        form_box.addLayout(buttons)
        progress_row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.eta = QLabel("")
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.eta)
        form_box.addLayout(progress_row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form_box.addWidget(self.status)
        self.clock = JobClock(self.eta, self.status, self, eta_prefix="estimated time left ")
        splitter.addWidget(left)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["validation", "value"])
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setStretchLastSection(True)
        right_layout.addWidget(self.table, 1)
        self.table_note = QLabel("The verdict is the mean KL against the budget. Greedy continuations part ways "
                                 "for good once a single token differs, so 'identical' can be 0% for an export "
                                 "that passes; 'first divergence' says how many tokens they agree first.")
        self.table_note.setWordWrap(True)
        self.table_note.hide()
        right_layout.addWidget(self.table_note)
        self.bottom_axis = LabelAxis(orientation="bottom")
        self.chart = pg.PlotWidget(axisItems={"bottom": self.bottom_axis,
                                              "left": LogAxis(np.log10(KL_FLOOR), orientation="left")})
        self.chart.setTitle("predicted KL per linear, worst 60")
        self.chart.setLabel("left", "mean KL (nats)")
        self.chart.setLabel("bottom", "linear (grey: kept in fp32)")
        self.chart.setMouseEnabled(x=False, y=False)
        self.chart.setMenuEnabled(False)
        self.chart.hideButtons()
        legend = self.chart.addLegend(offset=(-10, 10), brush=backing())
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brushes=[])
        self.chart.addItem(self.bars)
        self.measured = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen((31, 119, 180), width=2))
        self.predicted_line = pg.InfiniteLine(angle=0, movable=False,
                                              pen=pg.mkPen((224, 123, 57), width=2, style=Qt.PenStyle.DashLine))
        self.chart.addItem(self.measured)
        self.chart.addItem(self.predicted_line)
        # Legend entries for the two lines and the two kinds of bar.
        for pen_or_brush, text in ((pg.mkPen((224, 123, 57), width=2, style=Qt.PenStyle.DashLine),
                                    "predicted KL of the export"),
                                   (pg.mkPen((31, 119, 180), width=2), "measured KL of the written file")):
            legend.addItem(pg.PlotDataItem(pen=pen_or_brush), text)
        legend.addItem(pg.BarGraphItem(x=[0], height=[0], width=1, brush=SEVERITY_COLORS["moderate"]), "quantized")
        legend.addItem(pg.BarGraphItem(x=[0], height=[0], width=1, brush=KEPT_COLOR), "kept in fp32")
        self.measured.hide()
        self.predicted_line.hide()
        right_layout.addWidget(self.chart, 1)
        splitter.addWidget(right)
        splitter.setSizes([420, 640])
        layout.addWidget(splitter, 1)

        choose.clicked.connect(self._choose_folder)
        self.start.clicked.connect(self.exportRequested)
        self.cancel.clicked.connect(self.cancelRequested)
        self.more.clicked.connect(lambda: self.keep_more(5))
        self.run_checkup.clicked.connect(lambda: self.checkupRequested.emit(self.run_checkup.property("modification")))
        self.precision_group.buttonToggled.connect(lambda *a: self.refresh_suggestions())
        self.budget.valueChanged.connect(lambda *a: self.refresh_suggestions())
        self.keep.itemChanged.connect(lambda *a: self._draw_prediction())
        self.anatomy.cellClicked.connect(self.toggle_keep)

    def _choose_folder(self) -> None:
        folder = QFileDialog.getSaveFileName(self, "Export to a new folder", self.folder.text() or "model-onnx")[0]
        if folder:
            self.folder.setText(folder)

    def precision(self) -> str:
        return next(name for name, button in self.precisions.items() if button.isChecked())

    def set_context(self, session, report) -> None:
        """A (new) model or checkup: list its linears and tick the suggested ones."""
        self._session = session
        self.report = report
        self.linears = session.anatomy.linear_targets() if session is not None else []  # the head too
        if session is not None and not self.folder.text():
            self.folder.setText(str(Path.home() / f"{session.summary.name}-onnx"))
        self.refresh_suggestions()

    def refresh_suggestions(self) -> None:
        from modeldoctor.export.pipeline import choose_exclusions, free_exclusions

        precision = self.precision()
        self.predicted = {}
        self.figures = {}
        chosen, notes = [], []
        if self._session is not None and precision != "fp32":
            _, kl, _ = predicted_kl(self.report, precision)
            self.predicted = {t: v for t, v in kl.items() if not t.isdigit()}  # linears, the head too
            self.figures = self.predicted or dict(kl)
            chosen, notes = choose_exclusions(self._session, self.report, precision, self.budget.value())
        treated = self._session.treatment if self._session is not None else None
        if treated is not None and precision != "fp32" and treated.keep and treated.keep_for == PREDICTORS[precision]:
            free, free_notes = free_exclusions(self._session, precision)
            chosen = list(dict.fromkeys(list(treated.keep) + free))
            notes = [f"Ticked by the mixed-precision treatment for {treated.keep_for} "
                     f"({len(treated.keep)} linears)."] + free_notes
        self.keep.blockSignals(True)
        self.keep.clear()
        for name in sorted(self.linears, key=lambda n: self.predicted.get(n, 0), reverse=True):
            value = self.predicted.get(name)
            item = QListWidgetItem(f"{name}" + (f"   (predicted KL {value:.4f})" if value is not None else ""))
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if name in chosen else Qt.CheckState.Unchecked)
            self.keep.addItem(item)
        self.keep.blockSignals(False)
        self.keep.setEnabled(precision != "fp32")
        # Only a checkup of exactly what the export writes predicts it; offer to run that one.
        missing = missing_checkup(self.report, precision) if self._session is not None else None
        if self._session is None:
            self.keep_note.setText("Load the model (step 1) to export it; a reopened session alone has no weights.")
        elif precision == "fp32":
            self.keep_note.setText("fp32 keeps every layer in full precision.")
        elif missing:
            self.keep_note.setText(" ".join(notes + [missing_checkup_text(precision)]))
            self.run_checkup.setText(f"Run the {missing} checkup (linear scope)")
            self.run_checkup.setProperty("modification", missing)
        elif not self.predicted:
            # Block-scope figures: a bleeding block can only be kept whole.
            linears = len(self._session.anatomy.blocks[0].linears)
            self.keep_note.setText(" ".join(notes + [
                f"The {PREDICTORS[precision]} checkup probed whole blocks, so each bleeding block keeps all {linears} "
                f"of its linears in fp32 ({len(self.kept())} ticked here), which makes the file large. A checkup "
                "at linear scope keeps only the linears that bleed."]))
            self.run_checkup.setText(f"Run a linear-scope checkup of {PREDICTORS[precision]}")
            self.run_checkup.setProperty("modification", PREDICTORS[precision])
        else:
            self.keep_note.setText(" ".join(notes))
        self.run_checkup.setVisible(bool(missing) or (precision != "fp32" and not self.predicted
                                                      and self._session is not None))
        self._draw_prediction()

    def toggle_keep(self, name: str) -> None:
        """A click on a linear in the anatomy view switches it between fp32 and the export's format."""
        if self.precision() == "fp32" or not self.keep.isEnabled():
            return
        for i in range(self.keep.count()):
            item = self.keep.item(i)
            if item.data(Qt.ItemDataRole.UserRole) == name:
                checked = item.checkState() == Qt.CheckState.Checked
                item.setCheckState(Qt.CheckState.Unchecked if checked else Qt.CheckState.Checked)
                return

    def _draw_anatomy(self) -> None:
        from modeldoctor.gui.viewmodel import AnatomyLayout, export_cells

        if self._session is None:
            self.anatomy.set_layout(AnatomyLayout([], []))
            return
        layout = AnatomyLayout.from_names(self._session.anatomy.linear_names())
        self.anatomy.set_layout(layout)
        precision = self.precision()
        kept = set(self.kept())
        self.anatomy.set_cells(
            export_cells(layout, kept, precision, self.predicted, self._session.anatomy.head_tied),
            legend=(f"grey: fp32 ({len(kept) if precision != 'fp32' else 'all'}) · "
                    + ("blue: int8" if precision == "int8" else "purple: int4" if precision == "int4" else "")
                    + " · click a linear to switch it"),
            title=f"{precision} export")

    def kept(self) -> list[str]:
        return [self.keep.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.keep.count())
                if self.keep.item(i).checkState() == Qt.CheckState.Checked]

    def keep_more(self, count: int) -> None:
        """The next step after an over-budget export: the worst unticked layers go to fp32."""
        added = 0
        for i in range(self.keep.count()):
            item = self.keep.item(i)
            if item.checkState() == Qt.CheckState.Unchecked and added < count:
                item.setCheckState(Qt.CheckState.Checked)
                added += 1
        self.status.setText(f"{added} more layers will stay in fp32. Export again.")

    def _draw_prediction(self) -> None:
        from modeldoctor.export.pipeline import remaining_kl
        from modeldoctor.modifications.base import target_linears

        figures = self.figures
        names = [n for n in sorted(figures, key=figures.get, reverse=True)][:60]
        kept = set(self.kept())
        anatomy = self._session.anatomy if self._session is not None else None
        whole = {n for n in names if anatomy is not None and set(target_linears(anatomy, n)) <= kept}
        heights = [log_kl(figures[n]) - np.log10(KL_FLOOR) for n in names]
        brushes = [pg.mkBrush(*(KEPT_COLOR if n in whole else SEVERITY_COLORS["moderate"])) for n in names]
        self.bars.setOpts(x=np.arange(len(names), dtype=float), height=heights, brushes=brushes,
                          pen=pg.mkPen(None), pens=None)
        self.bottom_axis.set_labels(names)
        self.chart.setLabel("bottom", "linear (grey: kept in fp32)" if self.predicted or not figures
                            else "block, as the checkup probed them (grey: kept whole in fp32)")
        self.chart.setTitle(f"predicted KL per {'linear' if self.predicted or not figures else 'block'}"
                            + (", worst 60" if len(figures) > 60 else ""))
        remaining = remaining_kl(self._session, figures, list(kept)) if figures else 0.0
        if figures:
            self.predicted_line.setPos(log_kl(remaining) - np.log10(KL_FLOOR))
            self.predicted_line.setToolTip(f"predicted KL of the export: {remaining:.4f}")
            self.predicted_line.show()
        else:
            self.predicted_line.hide()
        self.show_prediction()
        self._draw_anatomy()

    def show_prediction(self) -> None:
        """What the export will be, before it is written: size from the keep list, KL from the checkup."""
        from modeldoctor.export.pipeline import predicted_kl, predicted_size, remaining_kl

        if self._session is None:
            self.prediction.setText("")
            return
        precision = self.precision()
        size = predicted_size(self._session, precision, self.kept())
        text = (f"<b>Before exporting:</b> about {format_bytes(size.bytes)}, {size.fraction:.0%} of fp32 "
                f"(estimated from the weights; {size.kept} of {size.linears} linears kept in fp32)")
        name, kl, _ = predicted_kl(self.report, precision)
        if precision == "fp32":
            text += "; the same function as the model, KL 0."
        elif name is None:
            text += "; no predicted KL without a checkup of this format."
        else:
            predicted = remaining_kl(self._session, kl, self.kept())
            verdict = "within" if predicted <= self.budget.value() else "over"
            text += (f"; predicted mean KL {predicted:.4f} ({verdict} the {self.budget.value():g} budget), the sum of "
                     f"the {name} checkup's figures for what is quantized.")
        self.prediction.setText(text)

    def set_running(self, running: bool) -> None:
        self.start.setEnabled(not running)
        self.cancel.setEnabled(running)
        for widget in (self.keep, self.budget, self.folder, self.run_checkup, *self.precisions.values()):
            widget.setEnabled(not running)
        if running:
            self.clock.start()
            self.more.setEnabled(False)
            self.progress.setRange(0, 0)
            self.progress.setFormat("starting …")
            self.eta.setText("")
            self.table_note.hide()
        else:
            self.clock.stop()
            self.keep.setEnabled(self.precision() != "fp32")
            self.progress.setRange(0, 1)

    def progress_update(self, done: int, total: int, eta_s: float | None, stage: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"step {min(done + 1, total)} of {total}: {stage}")
        self.clock.update(done, total, eta_s, stage)

    def show_result(self, result) -> None:
        self.last_result = result
        v, fp32 = result.validation, result.fp32
        rows = [("verdict", "passed — written" if result.passed else "over budget — nothing written"),
                ("mean KL (budget)", f"{v['kl_mean']:.4f} ({result.budget_kl:g})"),
                ("KL median / p99 / max", f"{v['kl_median']:.4f} / {v['kl_p99']:.3f} / {v['kl_max']:.3f}"),
                ("top-1 agreement", f"{v['same_top']:.1%}"),
                ("perplexity (original)", f"{v['ppl']:.3f} ({v['ppl_ref']:.3f})"),
                ("greedy 32 tokens identical", f"{v['greedy_identical']:.0%} of prompts"),
                ("first divergence", f"{v['greedy_first_divergence']:.1f} tokens"),
                ("size on disk", f"{format_bytes(v['size_bytes'])} ({v['size_bytes'] / fp32['size_bytes']:.0%})"
                 + (f", predicted {format_bytes(result.predicted_bytes)}" if result.predicted_bytes else "")),
                ("latency vs fp32 ONNX", f"×{v.get('latency_ratio', 1):.2f}"),
                ("kept in fp32", f"{len(result.excluded_linears)} layers"),
                ("predicted mean KL", f"{result.predicted_kl:.4f} ({result.predicted_by} checkup)"
                 if result.predicted_kl is not None else f"none: no {result.missing_checkup} checkup"
                 if result.missing_checkup else "—")]
        self.table.setRowCount(len(rows))
        for r, (key, value) in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(key))
            self.table.setItem(r, 1, QTableWidgetItem(value))
        self.table.resizeColumnsToContents()
        self.table_note.show()
        self.progress.setValue(self.progress.maximum())
        self.progress.setFormat("passed" if result.passed else "over budget")
        self.eta.setText("")
        self.measured.setToolTip(f"measured KL of the written file: {v['kl_mean']:.4g}")
        self.measured.setPos(log_kl(v["kl_mean"]) - np.log10(KL_FLOOR))
        self.measured.show()
        self.more.setEnabled(not result.passed and result.precision != "fp32")
        self.status.setText(f"Exported to {result.path}." if result.passed else
                            "Over budget: keep more layers in fp32 (button above) or treat them, then export again.")
