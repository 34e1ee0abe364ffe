"""Step 7: export a validated ONNX model, each linear in the format the checkup says it can take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup, QCheckBox, QDoubleSpinBox, QSlider, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
    QListWidget, QListWidgetItem, QProgressBar, QPushButton, QRadioButton, QSizePolicy, QSplitter, QTabWidget, QTableWidget,
    QTableWidgetItem, QVBoxLayout, QWidget,
)

from modeldoctor.export.pipeline import (
    DEFAULT_BUDGET_KL, PREDICTORS, counts_text, format_counts, format_ladder, missing_checkup, missing_checkup_text,
    predicted_kl,
)
from modeldoctor.export.validate import DECODE_CACHE, LATENCY_TOKENS
from modeldoctor.gui.anatomy import AnatomyView
from modeldoctor.gui.clock import JobClock
from modeldoctor.gui.plots import LabelAxis, backing, kl_chart
from modeldoctor.gui.viewmodel import FORMAT_COLOR_NAMES, FORMAT_COLORS, KL_FLOOR, SEVERITY_COLORS, log_kl

FORMAT_ROLE = Qt.ItemDataRole.UserRole + 1  # a list item's format (its linear's name is UserRole)


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.{1 if count < 10 * size else 0}f} {unit}"
    return f"{int(count)} bytes"


class ExportPage(QWidget):
    exportRequested = Signal()
    cancelRequested = Signal()
    checkupRequested = Signal(str)  # a checkup of exactly these modifications (comma-separated), formats the export writes

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.report = None
        self._session = None
        self.linears: list[str] = []
        self.predicted: dict[str, float] = {}
        self.last_result = None  # the latest export's ExportResult
        self.figures: dict[str, float] = {}  # what the chart draws: the linears' figures, else the blocks'
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Export</h2>Exports through optimum-onnx, writes each linear in its own format "
                       "(fp32, 8 or 4 bits) with onnxruntime's kernels, then validates the result against the "
                       "original before handing it over. An export over the KL budget is not written.")
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
        for name, text in (("fp32", "fp32"), ("int8", "int8"), ("int4", "int4 + int8"),
                           ("int8-dynamic", "int8 dynamic")):
            button = QRadioButton(text)
            self.precisions[name] = button
            self.precision_group.addButton(button)
            row.addWidget(button)
        self.precisions["int8"].setChecked(True)
        from modeldoctor.gui.glossary import tip

        self.precisions["fp32"].setToolTip("Every weight in 32-bit floats: the same function as the model.")
        self.precisions["int8"].setToolTip(tip("int8 b32"))
        self.precisions["int4"].setToolTip(tip("int4 mixed"))
        self.precisions["int8-dynamic"].setToolTip(tip("int8 dynamic") + " Weights and activations in 8 bits "
                                                   "(MatMulInteger), for runtimes that want integer matmuls.")
        form.addRow("Precision:", row)
        size_row = QHBoxLayout()
        self.size_fit = QCheckBox("Fit in")
        self.size_fit.setToolTip("Choose the formats that give the smallest predicted KL within this size, instead "
                                 "of the smallest file under the KL budget.")
        self.size_slider = QSlider(Qt.Orientation.Horizontal)
        self.size_slider.setRange(10, 100)
        self.size_slider.setValue(30)
        self.size_slider.setEnabled(False)
        self.size_label = QLabel()
        self.size_label.setMinimumWidth(150)
        size_row.addWidget(self.size_fit)
        size_row.addWidget(self.size_slider, 1)
        size_row.addWidget(self.size_label)
        form.addRow("Size budget:", size_row)
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
        self.prediction = QLabel()  # size and KL of the export before it is written
        self.prediction.setWordWrap(True)
        # Wrapped text keeps its full height when the page is short; the anatomy below gives way.
        self.prediction.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        form_box.addWidget(self.prediction)
        keep_box = QGroupBox("Format of each linear (chosen from the checkup; click to switch)")
        keep_layout = QVBoxLayout(keep_box)
        # Where the formats come from (or which checkup is missing) above the picture, in view on a
        # small screen.
        self.keep_note = QLabel()
        self.keep_note.setWordWrap(True)
        self.keep_note.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        keep_layout.addWidget(self.keep_note)
        self.run_checkup = QPushButton()
        self.run_checkup.hide()
        keep_layout.addWidget(self.run_checkup)
        # Blocks of 64 and 128 store fewer scales: offered once a checkup measures them.
        self.block_checkup = QPushButton()
        self.block_checkup.setToolTip("Larger blocks (64 or 128 inputs per scale) make smaller files; the checkup "
                                      "measures every linear in each of these formats, so the choice can use them "
                                      "where they are safe. It takes about as long per format as the first one.")
        self.block_checkup.hide()
        keep_layout.addWidget(self.block_checkup)
        self.keep_tabs = QTabWidget()
        self.anatomy = AnatomyView()  # the model's linears in the format the export writes for each
        self.keep = QListWidget()  # the same choice as a list (keyboard, screen readers)
        self.keep_tabs.addTab(self.anatomy, "Anatomy")
        self.keep_tabs.addTab(self.keep, "List")
        self.keep.setToolTip("Enter or a double-click moves a linear one format up (fp32 wraps round to the "
                             "smallest).")
        keep_layout.addWidget(self.keep_tabs, 1)
        form_box.addWidget(keep_box, 1)
        buttons = QHBoxLayout()
        self.start = QPushButton("Export and validate")
        self.start.setMinimumHeight(32)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.more = QPushButton("Raise 5 more layers")
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
        self.refusal: str | None = None  # why this model cannot be exported, if it cannot
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
        self.table.hide()  # until an export is validated: the charts have the column to themselves
        self.table_note = QLabel("The verdict is the mean KL against the budget. Greedy continuations part ways "
                                 "for good once a single token differs, so 'identical' can be 0% for an export "
                                 "that passes; 'first divergence' says how many tokens they agree first.")
        self.table_note.setWordWrap(True)
        self.table_note.hide()
        right_layout.addWidget(self.table_note)
        self.bottom_axis = LabelAxis(orientation="bottom")
        self.chart = kl_chart(bottom="linear (grey: written in fp32)", title="predicted KL per linear, worst 60",
                              bottom_axis=self.bottom_axis)
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
        legend.addItem(pg.BarGraphItem(x=[0], height=[0], width=1, brush=SEVERITY_COLORS["moderate"]),
                       "in the export's format")
        legend.addItem(pg.BarGraphItem(x=[0], height=[0], width=1, brush=FORMAT_COLORS["int8"]),
                       "raised (its format's colour)")
        legend.addItem(pg.BarGraphItem(x=[0], height=[0], width=1, brush=FORMAT_COLORS["fp32"]), "written in fp32")
        self.measured.hide()
        self.predicted_line.hide()
        self.chart_tabs = QTabWidget()
        self.chart_tabs.addTab(self.chart, "Per layer")
        self.tradeoff = kl_chart("predicted mean KL (nats)", "predicted size of the weights (MiB)",
                                 "predicted size and KL of the best mix at each size")
        tradeoff_legend = self.tradeoff.addLegend(offset=(-10, 10), brush=backing())
        self.curve = self.tradeoff.plot([], [], pen=pg.mkPen((31, 119, 180), width=2), name="greedy mix, each size")
        self.chosen_point = pg.ScatterPlotItem(size=12, brush=pg.mkBrush(224, 123, 57), pen=pg.mkPen(None))
        self.tradeoff.addItem(self.chosen_point)
        tradeoff_legend.addItem(self.chosen_point, "the formats shown")
        self.size_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((120, 120, 120), style=Qt.PenStyle.DashLine))
        self.tradeoff.addItem(self.size_line)
        self.size_line.hide()
        self.chart_tabs.addTab(self.tradeoff, "Size vs KL")
        right_layout.addWidget(self.chart_tabs, 1)
        splitter.addWidget(right)
        splitter.setSizes([420, 640])
        layout.addWidget(splitter, 1)

        choose.clicked.connect(self._choose_folder)
        self.start.clicked.connect(self.exportRequested)
        self.cancel.clicked.connect(self.cancelRequested)
        self.more.clicked.connect(lambda: self.keep_more(5))
        self.run_checkup.clicked.connect(lambda: self.checkupRequested.emit(self.run_checkup.property("modification")))
        self.block_checkup.clicked.connect(
            lambda: self.checkupRequested.emit(self.block_checkup.property("modification")))
        self.precision_group.buttonToggled.connect(lambda *a: self.refresh_suggestions())
        self.budget.valueChanged.connect(lambda *a: self.refresh_suggestions())
        self.size_fit.toggled.connect(self._size_budget_toggled)
        self.size_slider.valueChanged.connect(lambda *a: self.refresh_suggestions())
        self.keep.itemChanged.connect(self._format_edited)
        self.keep.itemActivated.connect(lambda item: self.toggle_keep(item.data(Qt.ItemDataRole.UserRole)))
        self.edited = False  # the user changed a format by hand (then the export writes exactly those)
        self._curve_key, self._curve = None, []  # the size-vs-KL curve and what it was computed for
        self.anatomy.cellClicked.connect(self.toggle_keep)

    def _choose_folder(self) -> None:
        folder = QFileDialog.getSaveFileName(self, "Export to a new folder", self.folder.text() or "model-onnx")[0]
        if folder:
            self.folder.setText(folder)

    def precision(self) -> str:
        return next(name for name, button in self.precisions.items() if button.isChecked())

    def size_budget_bytes(self) -> int | None:
        """The size budget in bytes, or None when the KL budget alone chooses."""
        if self._session is None or not self.size_fit.isChecked():
            return None
        return int(self._session.summary.parameters * 4 * self.size_slider.value() / 100)

    def weights_budget_bytes(self) -> int | None:
        """What the size budget leaves the weights: the file also holds its graph, measured by the
        session's last export (before the first one, the weights get the whole budget)."""
        budget = self.size_budget_bytes()
        return budget - (self._session.onnx_graph_bytes or 0) if budget is not None else None

    def _size_budget_toggled(self, on: bool) -> None:
        self.size_slider.setEnabled(on and self.precision() != "fp32")
        self.refresh_suggestions()

    def _format_edited(self, item) -> None:
        self.edited = True
        self._label_item(item)
        self._draw_prediction()

    def _label_item(self, item) -> None:
        name = item.data(Qt.ItemDataRole.UserRole)
        value = self.predicted.get(name)
        self.keep.blockSignals(True)
        item.setText(f"{name}: {self._item_format(item)}"
                     + (f"   (predicted KL {value:.4f} at {self.precision()})" if value is not None else ""))
        self.keep.blockSignals(False)

    def ladder(self) -> list[str]:
        """The formats a linear can take in this export, fewest bytes first, fp32 last."""
        return format_ladder(self.report, self.precision())

    def linear_ladder(self, name: str) -> list[str]:
        """The formats of this export in this linear's own order of bytes as written, fp32 last."""
        from modeldoctor.export.pipeline import linear_ladder

        if self._session is None or self.precision() == "fp32":
            return self.ladder()
        return linear_ladder(self._session, self.ladder(), name)

    @staticmethod
    def _item_format(item) -> str:
        return item.data(FORMAT_ROLE)

    def _set_item_format(self, item, fmt: str) -> None:
        item.setData(FORMAT_ROLE, fmt if fmt in self.ladder() else "fp32")

    def formats(self) -> dict[str, str]:
        """Each linear's format as the list shows it."""
        if self.precision() == "fp32":
            return {name: "fp32" for name in self.linears}
        return {self.keep.item(i).data(Qt.ItemDataRole.UserRole): self._item_format(self.keep.item(i))
                for i in range(self.keep.count())}

    def set_context(self, session, report) -> None:
        """A (new) model or checkup: list its linears and tick the suggested ones."""
        self._session = session
        self.report = report
        # An architecture optimum-onnx cannot export (a state-space model) is said before anything runs.
        from modeldoctor.export.onnx_export import export_refusal

        refusal = export_refusal(session.model, session.anatomy.kind) if session is not None else None
        if refusal or self.refusal:
            self.start.setEnabled(refusal is None)
            self.start.setToolTip(refusal or "")
        self.refusal = refusal
        self.linears = session.anatomy.linear_targets() if session is not None else []  # the head too
        if session is not None and not self.folder.text():
            self.folder.setText(str(Path.home() / f"{session.summary.name}-onnx"))
        treated = session.treatment if session is not None else None
        if treated is not None and treated.keep:
            # A mixed-precision keep list was chosen for one format: export in that one.
            for precision, modification in PREDICTORS.items():
                if modification == treated.keep_for:
                    self.precisions[precision].setChecked(True)
        self.refresh_suggestions()

    def refresh_suggestions(self) -> None:
        from modeldoctor.export.pipeline import choose_formats, formats_with, preset_notes

        precision = self.precision()
        self.predicted = {}
        self.figures = {}
        chosen: dict[str, str] = {}
        notes: list[str] = []
        fp32_bytes = self._session.summary.parameters * 4 if self._session is not None else 0
        self.size_label.setText(f"≤ {format_bytes(fp32_bytes * self.size_slider.value() / 100)} "
                                f"({self.size_slider.value()}% of fp32)" if self._session is not None else "")
        self.size_slider.setEnabled(self.size_fit.isChecked() and precision != "fp32")
        if self._session is not None:
            _, kl, _ = predicted_kl(self.report, precision)
            self.predicted = {t: v for t, v in kl.items() if not t.isdigit()}  # linears, the head too
            self.figures = self.predicted or dict(kl)
            chosen, notes = choose_formats(self._session, self.report, precision, self.budget.value(),
                                           self.weights_budget_bytes())
            notes = preset_notes(self._session, precision) + notes
        treated = self._session.treatment if self._session is not None else None
        if treated is not None and precision != "fp32" and treated.keep and treated.keep_for == PREDICTORS[precision]:
            chosen = formats_with(self._session, precision, list(treated.keep))
            notes = [f"Set to fp32 by the mixed-precision treatment for {treated.keep_for} "
                     f"({len(treated.keep)} linears)."] + preset_notes(self._session, precision)
        self.keep.blockSignals(True)
        self.keep.clear()
        for name in sorted(self.linears, key=lambda n: self.predicted.get(n, 0), reverse=True):
            item = QListWidgetItem()
            item.setData(Qt.ItemDataRole.UserRole, name)
            self._set_item_format(item, chosen.get(name, precision))
            self.keep.addItem(item)
            self._label_item(item)
        self.keep.blockSignals(False)
        self.keep.setEnabled(precision != "fp32")
        self.edited = False
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
            # Block-scope figures: a bleeding block can only be raised whole.
            linears = len(self._session.anatomy.blocks[0].linears)
            self.keep_note.setText(" ".join(notes + [
                f"The {PREDICTORS[precision]} checkup probed whole blocks, so each bleeding block raises all "
                f"{linears} of its linears, which makes the file large. A checkup at linear scope raises only the "
                "linears that bleed."]))
            self.run_checkup.setText(f"Run a linear-scope checkup of {PREDICTORS[precision]}")
            self.run_checkup.setProperty("modification", PREDICTORS[precision])
        else:
            self.keep_note.setText(" ".join(notes))
        from modeldoctor.export import PRECISION_FORMATS

        every_block = [PREDICTORS[f] for f in PRECISION_FORMATS[precision]]
        unmeasured = [f for f in PRECISION_FORMATS[precision] if f not in self.ladder()]
        self.block_checkup.setVisible(self._session is not None and not missing and bool(self.predicted)
                                      and bool(unmeasured))
        self.block_checkup.setText(f"Also try larger blocks: check up {', '.join(every_block)}")
        self.block_checkup.setProperty("modification", ",".join(every_block))
        self.run_checkup.setVisible(not self.refusal and (bool(missing) or (
            precision != "fp32" and not self.predicted and self._session is not None)))
        if self.refusal:  # no checkup of an export format helps a model that cannot be exported
            self.block_checkup.setVisible(False)
            self.keep_note.setText(" ".join(notes))
        self._draw_curve()
        self._draw_prediction()

    def _draw_curve(self) -> None:
        """The size-vs-KL trade-off of the current checkup and precision (none without figures)."""
        from modeldoctor.export.pipeline import size_kl_curve

        key = (id(self._session), id(self.report), self.precision(),
               self._session.weights_version if self._session is not None else None)
        if self._curve_key != key:  # the slider moves along it: computed once per checkup
            self._curve_key = key
            self._curve = (size_kl_curve(self._session, self.report, self.precision())
                           if self._session is not None and self.precision() != "fp32" and self.figures else [])
        curve = self._curve
        sizes = np.array([c[0] for c in curve], dtype=float) / 2**20
        kls = np.array([log_kl(max(c[1], 0.0)) - np.log10(KL_FLOOR) for c in curve], dtype=float)
        self.curve.setData(sizes, kls)
        budget = self.weights_budget_bytes()
        self.size_line.setVisible(budget is not None and bool(curve))
        if budget is not None:
            self.size_line.setPos(budget / 2**20)

    def toggle_keep(self, name: str) -> None:
        """A click on a linear in the anatomy view moves it one format up (the top one wraps round)."""
        if self.precision() == "fp32" or not self.keep.isEnabled():
            return
        steps = self.linear_ladder(name)
        for i in range(self.keep.count()):
            item = self.keep.item(i)
            if item.data(Qt.ItemDataRole.UserRole) == name:
                current = self._item_format(item)
                self._set_item_format(item, steps[(steps.index(current) + 1) % len(steps)] if current in steps
                                      else steps[0])
                return

    def _draw_anatomy(self) -> None:
        from modeldoctor.gui.viewmodel import AnatomyLayout, export_cells

        if self._session is None:
            self.anatomy.set_layout(AnatomyLayout([], []))
            return
        layout = AnatomyLayout.from_names(self._session.anatomy.linear_names())
        self.anatomy.set_layout(layout)
        precision = self.precision()
        formats = self.formats()
        counts = {f: sum(1 for v in formats.values() if v == f) for f in self.ladder()}
        self.anatomy.set_cells(
            export_cells(layout, formats, self.predicted, self._session.anatomy.head_tied),
            legend=" · ".join(f"{FORMAT_COLOR_NAMES[f]}: {f} ({n})" for f, n in counts.items() if n or f == precision)
            + (" · a click moves a linear one format up (fp32 wraps round)" if precision != "fp32" else ""),
            title=f"{precision} export")

    def kept(self) -> list[str]:
        """The linears written in fp32."""
        return [name for name, fmt in self.formats().items() if fmt == "fp32"]

    def keep_more(self, count: int) -> None:
        """The next step after an over-budget export: the worst linears not yet in fp32 (the list
        is sorted worst first) move one format up."""
        added = 0
        for i in range(self.keep.count()):
            item = self.keep.item(i)
            if self._item_format(item) != "fp32" and added < count:
                self.toggle_keep(item.data(Qt.ItemDataRole.UserRole))
                added += 1
        self.status.setText(f"{added} more layers moved one format up. Export again.")

    def _draw_prediction(self) -> None:
        from modeldoctor.export.pipeline import linear_ladder
        from modeldoctor.modifications.base import target_linears

        figures = self.figures
        names = [n for n in sorted(figures, key=figures.get, reverse=True)][:60]
        formats = self.formats()
        precision = self.precision()
        anatomy = self._session.anatomy if self._session is not None else None
        ladder = self.ladder() if anatomy is not None else []  # read from the report once per drawing
        raised = {n for n in names if anatomy is not None and all(
            formats.get(x, "fp32") != linear_ladder(self._session, ladder, x)[0] for x in target_linears(anatomy, n))}
        heights = [log_kl(figures[n]) - np.log10(KL_FLOOR) for n in names]
        brushes = [pg.mkBrush(*(FORMAT_COLORS[formats.get(target_linears(anatomy, n)[0], "fp32")]
                                if n in raised else SEVERITY_COLORS["moderate"])) for n in names]
        self.bars.setOpts(x=np.arange(len(names), dtype=float), height=heights, brushes=brushes,
                          pen=pg.mkPen(None), pens=None)
        self.bottom_axis.set_labels(names)
        self.chart.setLabel("bottom", f"linear at {precision} (coloured by the format it is raised to, grey: fp32)"
                            if self.predicted or not figures
                            else "block, as the checkup probed them (grey: raised whole)")
        self.chart.setTitle(f"predicted KL per {'linear' if self.predicted or not figures else 'block'} at {precision}"
                            + (", worst 60" if len(figures) > 60 else ""))
        remaining = self._predicted_export_kl()
        if remaining is not None:
            self.predicted_line.setPos(log_kl(remaining) - np.log10(KL_FLOOR))
            self.predicted_line.setToolTip(f"predicted KL of the export: {remaining:.4f}")
            self.predicted_line.show()
            from modeldoctor.export.pipeline import predicted_size

            size = predicted_size(self._session, formats).bytes / 2**20
            self.chosen_point.setData([size], [log_kl(max(remaining, 0.0)) - np.log10(KL_FLOOR)])
        else:
            self.predicted_line.hide()
            self.chosen_point.setData([], [])
        self.show_prediction()
        self._draw_anatomy()

    def _predicted_export_kl(self) -> float | None:
        from modeldoctor.export.pipeline import format_figures, remaining_kl

        if self._session is None or self.precision() == "fp32":
            return None
        formats = self.formats()
        used = {*self.ladder(), *formats.values()}
        figures = format_figures(self.report, used)
        if self.precision() not in figures:
            return None
        return remaining_kl(self._session, figures, formats)

    def show_prediction(self) -> None:
        """What the export will be, before it is written: size from the formats, KL from the checkup."""
        from modeldoctor.export.pipeline import predicted_size

        if self._session is None:
            self.prediction.setText("")
            return
        if self.refusal:
            self.prediction.setText(f"<span style='color:#c8373b'><b>Cannot export:</b> {self.refusal}</span>")
            return
        precision = self.precision()
        size = predicted_size(self._session, self.formats())
        counts = counts_text(size.counts)
        graph = self._session.onnx_graph_bytes
        text = (f"<b>Before exporting:</b> about {format_bytes(size.bytes + (graph or 0))}, "
                f"{(size.bytes + (graph or 0)) / size.fp32_bytes:.0%} of fp32 ("
                + ("the weights as written and the graph measured by the last export" if graph else
                   "the weights as written; the file adds its graph, measured when exporting") + f"; {counts})")
        predicted = self._predicted_export_kl()
        if precision == "fp32":
            text += "; the same function as the model, KL 0."
        elif predicted is None:
            text += "; no predicted KL without a checkup of this format."
        else:
            verdict = "within" if predicted <= self.budget.value() else "over"
            text += (f"; predicted mean KL {predicted:.4f} ({verdict} the {self.budget.value():g} budget), the sum of "
                     "the checkup's figures for each linear in its format.")
        self.prediction.setText(text)

    def set_running(self, running: bool) -> None:
        self.start.setEnabled(not running)
        self.cancel.setEnabled(running)
        for widget in (self.keep, self.budget, self.folder, self.run_checkup, self.block_checkup, self.size_fit,
                       self.size_slider,
                       *self.precisions.values()):
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
            self.size_slider.setEnabled(self.size_fit.isChecked() and self.precision() != "fp32")
            self.progress.setRange(0, 1)

    def progress_update(self, done: int, total: int, eta_s: float | None, stage: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"step {min(done + 1, total)} of {total}: {stage}")
        self.clock.update(done, total, eta_s, stage)

    def show_result(self, result) -> None:
        self.last_result = result
        v, fp32 = result.validation, result.fp32
        predicted = (f"{result.predicted_kl:.4f} ({result.predicted_by} checkup)" if result.predicted_kl is not None
                     else f"none: no {result.missing_checkup} checkup" if result.missing_checkup else "—")
        rows = [("verdict", "passed — written" if result.passed else "over budget — nothing written"),
                ("mean KL (budget)", f"{v['kl_mean']:.4f} ({result.budget_kl:g})"),
                ("predicted mean KL", predicted),
                ("simulated mean KL", f"{result.simulated_kl:.4f} (all formats at once, before writing)"
                 if result.simulated_kl is not None else "—"),
                ("KL median / p99 / max", f"{v['kl_median']:.4f} / {v['kl_p99']:.3f} / {v['kl_max']:.3f}"),
                ("top-1 agreement", f"{v['same_top']:.1%}"),
                ("perplexity (original)", f"{v['ppl']:.3f} ({v['ppl_ref']:.3f})"),
                ("greedy 32 tokens identical", f"{v['greedy_identical']:.0%} of prompts"),
                ("first divergence", f"{v['greedy_first_divergence']:.1f} tokens"),
                ("size on disk", f"{format_bytes(v['size_bytes'])} ({v['size_bytes'] / fp32['size_bytes']:.0%})"
                 + (f", predicted {format_bytes(result.predicted_bytes)}" if result.predicted_bytes else "")),
                (f"prefill time ({LATENCY_TOKENS} tokens) vs fp32 ONNX", _time_ratio(v.get("latency_ratio"))),
                (f"decode time (1 token after {DECODE_CACHE}) vs fp32 ONNX", _time_ratio(v.get("decode_ratio"))),
                ("formats", ", ".join(f"{n} {f}" for f, n in format_counts(result.formats).items()))]
        if len(result.rounds) > 1:
            rows += [(f"round {i}", f"predicted {r['predicted_kl']:.4f}, simulated {r['simulated_kl']:.4f}, "
                                    f"measured {r['kl_mean']:.4f}, "
                                    f"{format_bytes(r['size_bytes'])}")
                     for i, r in enumerate(result.rounds, 1) if r["predicted_kl"] is not None]
        self.table.setRowCount(len(rows))
        self.table.show()
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
                            "Over budget: raise more layers (button above) or treat them, then export again.")


def _time_ratio(ratio: float | None) -> str:
    """A time ratio to fp32 read both ways (below 1 is faster)."""
    if ratio is None:
        return "—"
    if ratio < 1:
        return f"×{ratio:.2f} ({1 / ratio:.2f}× faster)"
    return f"×{ratio:.2f} ({'slower' if ratio > 1 else 'the same'})"
