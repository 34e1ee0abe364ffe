"""Step 6: treat the bleeding. Recommendations from the diagnosis, ticks, a run with progress,
per-layer bars before and after on the same axes, whole-model figures, and the treated
model's state (save it, or go back to the original)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QProgressBar,
    QPushButton, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget,
)

from modeldoctor.errors import PlanError
from modeldoctor.gui.anatomy import AnatomyView
from modeldoctor.gui.clock import JobClock
from modeldoctor.gui.plots import LabelAxis, kl_chart, spaced_labels
from modeldoctor.gui.viewmodel import KL_FLOOR, BeforeAfter, log_kl
from modeldoctor.treatment.base import FIGURES, TreatmentPlan, treatments

TARGETS = {"int8-dynamic": "int8 dynamic (the int8-dynamic export, quantize_dynamic)",
           "int8-b32": "int8 blocks of 32 (the int8 export)", "int4-b32": "int4 blocks of 32 (the int4 export)",
           "int4-g32-asym": "int4 weight-only, group 32 (float activations)",
           "int4-g32": "int4 weight-only, group 32, symmetric", "int4": "int4 per channel",
           "int3-g32-asym": "int3 weight-only, group 32", "none": "none: the model as it is (pruning, decoding)"}
DECODINGS = {"decode-sample": "sampling, temperature 1", "decode-temp-0.7": "sampling, temperature 0.7",
             "decode-topp-0.9": "nucleus sampling, top-p 0.9", "decode-topk-40": "top-k 40 sampling",
             "decode-rep-1.3": "greedy with repetition penalty 1.3"}
BEFORE_COLOR = (150, 150, 150)


class TreatmentPage(QWidget):
    treatRequested = Signal()
    cancelRequested = Signal()
    saveModelRequested = Signal()
    resetRequested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.outcomes: list = []
        self.threshold = 0.01
        self.recommendations: list = []
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Treatment</h2>Each treatment is fitted on calibration text, kept or rolled back on "
                       "separate selection text, and measured on held-out evaluation text (which no choice sees) "
                       "against the original model. One that makes things worse is rolled back. "
                       "Treatments apply in order and build on each other; the treated model is what Export "
                       "exports. Your model files are never written.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        left = QWidget()
        column = QVBoxLayout(left)

        advice = QGroupBox("Recommended by the diagnosis")
        advice_layout = QVBoxLayout(advice)
        self.advice = QLabel("Run a checkup (or open a session) to get recommendations; you can also treat "
                             "without one.")
        self.advice.setWordWrap(True)
        self.use_advice = QPushButton("Use the recommendation")
        self.use_advice.setEnabled(False)
        advice_layout.addWidget(self.advice)
        advice_layout.addWidget(self.use_advice)
        column.addWidget(advice)

        choose = QGroupBox("What to treat")
        self.choices = choose  # locked while a treatment runs
        self.advice_box = advice
        form = QFormLayout(choose)
        self.target = QComboBox()
        for name, text in TARGETS.items():
            self.target.addItem(text, name)
        form.addRow("Deployment:", self.target)
        self.checks: dict[str, QCheckBox] = {}
        for treatment in treatments():
            box = QCheckBox(treatment.title)
            box.setToolTip(treatment.summary)
            self.checks[treatment.name] = box
            form.addRow(box)
        self.budget = QSpinBox()
        self.budget.setRange(1, 50)
        self.budget.setValue(10)
        self.budget.setSuffix(" % of weights in fp32")
        form.addRow("Mixed-precision budget:", self.budget)
        self.sparsity = QSpinBox()
        self.sparsity.setRange(10, 90)
        self.sparsity.setSingleStep(10)
        self.sparsity.setValue(50)
        self.sparsity.setSuffix(" % sparsity")
        self.pattern = QComboBox()
        self.pattern.addItem("unstructured", "unstructured")
        self.pattern.addItem("2:4 semi-structured", "2of4")
        prune_row = QHBoxLayout()
        prune_row.addWidget(self.sparsity)
        prune_row.addWidget(self.pattern)
        form.addRow("Pruning:", prune_row)
        self.decoding = QComboBox()
        for name, text in DECODINGS.items():
            self.decoding.addItem(text, name)
        form.addRow("Your decoding:", self.decoding)
        self.threshold_box = QDoubleSpinBox()
        self.threshold_box.setDecimals(3)
        self.threshold_box.setRange(0.001, 1.0)
        self.threshold_box.setValue(0.01)
        self.threshold_box.setSuffix(" nats")
        form.addRow("Bleeding threshold:", self.threshold_box)
        column.addWidget(choose)
        self.plan_note = QLabel("")
        self.plan_note.setWordWrap(True)
        column.addWidget(self.plan_note)

        buttons = QHBoxLayout()
        self.start = QPushButton("Treat")
        self.start.setMinimumHeight(32)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        buttons.addWidget(self.start)
        buttons.addWidget(self.cancel)
        column.addLayout(buttons)
        progress_row = QHBoxLayout()
        self.progress = QProgressBar()
        self.eta = QLabel("")
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.eta)
        column.addLayout(progress_row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        column.addWidget(self.status)

        state_box = QGroupBox("Treated model")
        state_layout = QVBoxLayout(state_box)
        self.state = QLabel("untreated")
        self.state.setWordWrap(True)
        state_layout.addWidget(self.state)
        state_buttons = QHBoxLayout()
        self.save_model = QPushButton("Save treated model…")
        self.reset = QPushButton("Back to the original model")
        state_buttons.addWidget(self.save_model)
        state_buttons.addWidget(self.reset)
        state_layout.addLayout(state_buttons)
        column.addWidget(state_box)
        column.addStretch()
        splitter.addWidget(left)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        chooser = QHBoxLayout()
        chooser.addWidget(QLabel("Show:"))
        self.shown = QComboBox()
        chooser.addWidget(self.shown, 1)
        right_layout.addLayout(chooser)
        self.bottom_axis = LabelAxis(orientation="bottom")
        self.chart = kl_chart(bottom_axis=self.bottom_axis)
        legend = self.chart.addLegend(offset=(10, 10))
        self.before_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brush=pg.mkBrush(*BEFORE_COLOR))
        self.after_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brushes=[],
                                          brush=pg.mkBrush(58, 157, 93))
        self.chart.addItem(self.before_bars)
        self.chart.addItem(self.after_bars)
        legend.addItem(self.before_bars, "before")
        legend.addItem(self.after_bars, "after")
        self.legend = legend
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False,
                                              pen=pg.mkPen((200, 55, 59), width=2, style=Qt.PenStyle.DashLine))
        self.chart.addItem(self.threshold_line)
        self.labels = [pg.TextItem(anchor=(0.5, 1.0), color=pg.getConfigOption("foreground")) for _ in range(3)]
        for label in self.labels:
            self.chart.addItem(label)
        self.chart_tabs = QTabWidget()
        self.chart_tabs.addTab(self.chart, "Per layer")
        self.anatomy = AnatomyView()  # the treated model: each block's figure after, kept linears outlined
        self.chart_tabs.addTab(self.anatomy, "Anatomy")
        self.linear_names: list[str] = []
        self.kept_linears: list[str] = []
        right_layout.addWidget(self.chart_tabs, 2)
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        right_layout.addWidget(self.verdict)
        self.figures = QTableWidget(0, 3)
        self.figures.setHorizontalHeaderLabels(["whole model", "before", "after"])
        self.figures.verticalHeader().hide()
        self.figures.horizontalHeader().setStretchLastSection(True)
        right_layout.addWidget(self.figures, 1)
        self.extra = QTableWidget(0, 0)
        self.extra.verticalHeader().hide()
        self.extra.horizontalHeader().setStretchLastSection(True)
        right_layout.addWidget(self.extra, 1)
        splitter.addWidget(right)
        splitter.setSizes([430, 650])
        layout.addWidget(splitter, 1)

        self.clock = JobClock(self.eta, self.status, self)
        self.start.clicked.connect(self.treatRequested)
        self.cancel.clicked.connect(self.cancelRequested)
        self.save_model.clicked.connect(self.saveModelRequested)
        self.reset.clicked.connect(self.resetRequested)
        self.use_advice.clicked.connect(self.apply_recommendation)
        self.shown.currentIndexChanged.connect(self._draw)
        self.chart.plotItem.vb.sigResized.connect(self._draw)  # which bar labels fit depends on the width
        self.target.currentIndexChanged.connect(self._refresh_checks)
        for box in self.checks.values():
            box.toggled.connect(self._refresh_checks)
        self._refresh_checks()

    # ---- the plan ---------------------------------------------------------------------------
    def plan(self) -> TreatmentPlan:
        # isEnabledTo: a treatment greyed out for this deployment, not one locked with the page during a run
        return TreatmentPlan([n for n, box in self.checks.items() if box.isChecked() and box.isEnabledTo(self.choices)],
                             target=self.target.currentData(), budget=self.budget.value() / 100,
                             sparsity=self.sparsity.value() / 100, pattern=self.pattern.currentData(),
                             decoding=self.decoding.currentData(), threshold=self.threshold_box.value())

    def _refresh_checks(self) -> None:
        """A treatment that cannot treat the chosen deployment is greyed out, with the reason."""
        probe = TreatmentPlan([], target=self.target.currentData())
        for treatment in treatments():
            box = self.checks[treatment.name]
            try:
                treatment.check(probe)
                box.setEnabled(True)
                box.setToolTip(treatment.summary)
            except PlanError as exc:
                box.setEnabled(False)
                box.setToolTip(str(exc))
        chosen = self.plan().treatments
        self.plan_note.setText("Order: " + " → ".join(chosen) if chosen else "Tick at least one treatment.")
        self.start.setEnabled(bool(chosen) and not self.cancel.isEnabled())

    def set_target(self, name: str) -> None:
        index = self.target.findData(name)
        if index < 0:
            self.target.addItem(name, name)
            index = self.target.count() - 1
        self.target.setCurrentIndex(index)

    def show_recommendations(self, recommendations: list) -> None:
        self.recommendations = list(recommendations)
        if recommendations:
            self.advice.setText("<ul>" + "".join(f"<li>{r.reason}</li>" for r in recommendations) + "</ul>")
        else:
            self.advice.setText("The checkup found nothing that a treatment addresses. You can still treat a "
                                "deployment below.")
        self.use_advice.setEnabled(bool(recommendations))

    def apply_recommendation(self) -> None:
        if not self.recommendations:
            return
        first = self.recommendations[0]
        self.set_target(first.target)
        for name, box in self.checks.items():
            box.setChecked(name in first.treatments)
        if first.sparsity:
            self.sparsity.setValue(round(first.sparsity * 100))
        self._refresh_checks()

    # ---- running ----------------------------------------------------------------------------
    def begin(self) -> None:
        self.threshold = self.threshold_box.value()
        self.set_running(True)
        self.progress.setRange(0, 0)
        self.eta.setText("preparing …")
        self.status.setText("")

    def set_running(self, running: bool) -> None:
        self.cancel.setEnabled(running)
        # The plan being run cannot be edited while it runs.
        for widget in (self.save_model, self.reset, self.choices, self.advice_box):
            widget.setEnabled(not running)
        if running:
            self.clock.start()
        else:
            self.clock.stop()
        self._refresh_checks()

    def progress_update(self, done: int, total: int, eta_s: float | None, stage: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{done} / {total} steps")
        self.clock.update(done, total, eta_s, stage)

    def add_outcome(self, outcome) -> None:
        self.outcomes.append(outcome)
        self.shown.addItem(f"{outcome.title} — {'applied' if outcome.applied else 'not applied'}")
        self.shown.setCurrentIndex(self.shown.count() - 1)

    def end(self, reason: str, message: str) -> None:
        self.set_running(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if reason == "completed" else 0)
        self.eta.setText(reason)
        self.status.setText(message)

    def show_state(self, state) -> None:
        self.kept_linears = list(state.keep)
        lines = [f"• {item['summary']}" + (" (saved earlier)" if item.get("inherited") else "")
                 for item in state.applied]
        self.state.setText("<br>".join(lines) if lines else "untreated: the model as loaded")
        self.save_model.setEnabled(state.treated and not self.cancel.isEnabled())
        self.reset.setEnabled(state.treated and not self.cancel.isEnabled())
        index = self.shown.currentIndex()
        self._draw_anatomy(self.outcomes[index] if 0 <= index < len(self.outcomes) else None)

    def clear_outcomes(self) -> None:
        self.outcomes = []
        self.shown.clear()
        self._draw()

    # ---- drawing ----------------------------------------------------------------------------
    def legend_items(self, before: str, after: str) -> None:
        for item, text in ((self.before_bars, before), (self.after_bars, after)):
            label = self.legend.getLabel(item)
            if label is not None:
                label.setText(text)

    def _draw(self) -> None:
        index = self.shown.currentIndex()
        outcome = self.outcomes[index] if 0 <= index < len(self.outcomes) else None
        bars = BeforeAfter.from_outcome(outcome, self.threshold) if outcome else BeforeAfter()
        x = np.arange(len(bars.labels), dtype=float)
        self.before_bars.setOpts(x=x - 0.2, height=bars.heights(bars.before), width=0.4)
        self.after_bars.setOpts(x=x + 0.2, height=bars.heights(bars.after), width=0.4,
                                brushes=[pg.mkBrush(*c) for c in bars.after_colors()], pen=pg.mkPen(None))
        self.bottom_axis.set_labels(bars.labels)
        self.threshold_line.setPos(log_kl(self.threshold) - np.log10(KL_FLOOR))
        worst = spaced_labels(self.chart, bars.worst_after(len(bars.after)), bars.labels, bars.after, len(bars.labels),
                              len(self.labels))
        for slot, label in enumerate(self.labels):
            if slot < len(worst):
                i = worst[slot]
                label.setText(f"{bars.labels[i]}\n{bars.after[i]:.3g}")
                label.setPos(float(i) + 0.2, float(bars.heights(bars.after)[i]))
                label.setVisible(True)
            else:
                label.setVisible(False)
        top = max(list(bars.heights(bars.before)) + list(bars.heights(bars.after)) +
                  [log_kl(self.threshold) - np.log10(KL_FLOOR) + 1, 1.0])
        self.chart.setYRange(0, top + 1.2, padding=0)
        self.chart.setXRange(-0.6, max(len(x), 1) - 0.4, padding=0)
        if outcome is None:
            self.chart.setTitle("per-layer bars appear here after a treatment")
        elif not bars.labels:
            self.chart.setTitle(f"{outcome.title}: model-wide, no per-layer bars")
        else:
            mod = outcome.layers.get("modification", "")
            names = (outcome.layers.get("before_label", "before"), outcome.layers.get("after_label", "after"))
            self.chart.setTitle(f"{mod}, one block at a time: {names[0]} vs {names[1]}")
        if outcome is not None and bars.labels:
            self.legend_items(outcome.layers.get("before_label", "before"), outcome.layers.get("after_label", "after"))
        self.verdict.setText(f"<b>{outcome.verdict}</b>" if outcome else "")
        self._draw_anatomy(outcome)
        self._fill_figures(outcome)
        self._fill_extra(outcome)

    def _draw_anatomy(self, outcome) -> None:
        from modeldoctor.gui.viewmodel import AnatomyLayout, treatment_cells

        layout = AnatomyLayout.from_names(self.linear_names)
        kept = set(self.kept_linears)
        self.anatomy.set_layout(layout)
        self.anatomy.set_cells(
            treatment_cells(layout, outcome, self.threshold, kept),
            legend=("each block coloured by its mean KL after the treatment (green: under the threshold) · "
                    "outlined: kept in fp32 · hatched: no per-block figure"),
            title=outcome.title if outcome is not None else "")

    def _fill_figures(self, outcome) -> None:
        rows = []
        if outcome is not None:
            for key, (label, fmt) in FIGURES.items():
                if key in outcome.before and key in outcome.after:
                    rows.append((label, fmt.format(outcome.before[key]), fmt.format(outcome.after[key])))
        self.figures.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.figures.setItem(r, c, QTableWidgetItem(text))
        self.figures.resizeColumnsToContents()

    def _fill_extra(self, outcome) -> None:
        table = outcome.table if outcome is not None else []
        columns = [c for c in (table[0].keys() if table else []) if c in EXTRA_COLUMNS]
        self.extra.setColumnCount(len(columns))
        self.extra.setHorizontalHeaderLabels([EXTRA_COLUMNS[c][0] for c in columns])
        self.extra.setRowCount(len(table))
        for r, row in enumerate(table):
            for c, key in enumerate(columns):
                value = row[key]
                text = EXTRA_COLUMNS[key][1].format(value) if isinstance(value, (int, float)) else str(value)
                self.extra.setItem(r, c, QTableWidgetItem(text))
        self.extra.resizeColumnsToContents()
        self.extra.setVisible(bool(table))


# Columns of the comparison tables (pruning methods, kept linears, decoding, prompts).
EXTRA_COLUMNS = {
    "method": ("method", "{}"), "linear": ("kept in fp32", "{}"), "prompt": ("recovery prompt", "{}"),
    "decoding": ("decoding", "{}"), "temperature": ("temperature", "{:.3f}"),
    "kl_mean": ("mean KL", "{:.4f}"), "same_top": ("top-1", "{:.1%}"), "ppl": ("perplexity", "{:.3f}"),
    "selection_kl": ("KL on selection text", "{:.4f}"), "weights": ("weights", "{:,}"),
    "token_agreement": ("tokens kept", "{:.0%}"), "first_divergence": ("first divergence", "{:.1f}"),
    "kl_trajectory": ("trajectory KL", "{:.3f}"), "selection_accuracy": ("selection half", "{:.1%}"),
    "held_out_accuracy": ("held-out half", "{:.1%}"), "chosen_per_input": ("chosen per input", "{:.0%}"),
}
