"""Dialogs: errors with a details expander, and one probe's full story."""

from __future__ import annotations

import html
import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import (
    QDialog, QDialogButtonBox, QLabel, QMessageBox, QPushButton, QTableWidget,
    QTableWidgetItem, QTabWidget, QTextBrowser, QVBoxLayout, QWidget,
)

from modeldoctor.gui.plots import LabelAxis
from modeldoctor.metrics.divergence import position_bucket_key, position_curve
from modeldoctor.report.results import ProbeRecord

METRIC_LABELS = {
    "kl_mean": "KL mean (nats)", "kl_stderr": "KL standard error", "kl_median": "KL median",
    "kl_p90": "KL 90th percentile", "kl_p99": "KL 99th percentile", "kl_max": "KL max",
    "same_top": "top-1 agreement", "delta_p_rms": "RMS Δp of the next token", "ppl": "perplexity",
    "ppl_ref": "reference perplexity", "ppl_ratio": "perplexity ratio", "knowledge_accuracy": "knowledge probes",
    "knowledge_ref": "knowledge probes (reference)", "tokens": "tokens", "token_agreement": "greedy tokens kept",
    "first_divergence": "first divergence (tokens)", "identical": "identical continuations",
    "kl_trajectory": "KL along greedy trajectory",
    "kl_generation": "KL generating through the KV cache", "generation_tokens": "tokens generated through the cache",
}
PERCENT = {"same_top", "knowledge_accuracy", "knowledge_ref", "token_agreement", "identical"}


def show_error(parent, message: str, details: str = "", title: str = "Model Doctor") -> None:
    box = QMessageBox(QMessageBox.Icon.Critical, title, message, QMessageBox.StandardButton.Ok, parent)
    if details:
        box.setDetailedText(details)
    box.exec()


def format_metric(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if name in PERCENT:
        return f"{value:.1%}"
    if name == "tokens":
        return f"{int(value)}"
    return f"{value:.4g}"


def _position_keys(metrics: dict) -> list[tuple[str, str]]:
    """(label "64–255", metric name) of the position buckets a probe has."""
    return [(label, position_bucket_key(start)) for label, start, _ in position_curve(metrics)]


class ProbeDetailsDialog(QDialog):
    """All metrics with their spread, the cascade across depth, attention disruption, and
    continuations side by side (generated on request)."""

    def __init__(self, record: ProbeRecord, request_samples=None, parent=None) -> None:
        super().__init__(parent)
        self.record = record
        self.setWindowTitle(f"Probe: {record.spec.label}")
        self.resize(760, 560)
        layout = QVBoxLayout(self)
        verdict = "bleeding" if record.bleeding else "healthy"
        header = QLabel(f"<b>{html.escape(record.spec.label)}</b> ({record.spec.mode}) — "
                        f"<b>{verdict}</b>, {record.severity}: {html.escape(record.reason)}")
        header.setWordWrap(True)
        layout.addWidget(header)
        self.tabs = tabs = QTabWidget()
        layout.addWidget(tabs)
        tabs.addTab(self._metrics_table(), "Metrics")
        if record.cascade:
            tabs.addTab(self._cascade_plot(), "Cascade")
        if record.attention:
            tabs.addTab(self._attention_plot(), "Attention")
        if position_curve(record.metrics):
            tabs.addTab(self._position_plot(), "By position")
        self.samples_view = QTextBrowser()
        samples_tab = QWidget()
        box = QVBoxLayout(samples_tab)
        box.addWidget(self.samples_view)
        self.samples_button = QPushButton("Generate continuations")
        box.addWidget(self.samples_button)
        tabs.addTab(samples_tab, "Continuations")
        if record.samples:
            self.show_samples(record.samples)
            self.samples_button.hide()
        elif request_samples is None:
            self.samples_button.setEnabled(False)
            self.samples_button.setToolTip("Load the model and wait for the checkup to finish to generate text.")
            self.samples_view.setPlainText("Continuations need the loaded model while no checkup is running.")
        else:
            self.samples_button.clicked.connect(lambda: (self.samples_button.setEnabled(False),
                                                         self.samples_view.setPlainText("Generating …"),
                                                         request_samples(record, self)))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _metrics_table(self) -> QTableWidget:
        items = [(k, v) for k, v in self.record.metrics.items()]
        table = QTableWidget(len(items), 2)
        table.setHorizontalHeaderLabels(["metric", "value"])
        positions = {key: f"KL at positions {label}" for label, key in _position_keys(self.record.metrics)}
        for row, (name, value) in enumerate(items):
            table.setItem(row, 0, QTableWidgetItem(METRIC_LABELS.get(name, positions.get(name, name))))
            table.setItem(row, 1, QTableWidgetItem(format_metric(name, value)))
        table.resizeColumnsToContents()
        table.verticalHeader().hide()
        return table

    @staticmethod
    def _block_plot(blocks: int) -> pg.PlotWidget:
        """A plot over blocks 0..blocks-1, labelled at whole blocks only."""
        axis = LabelAxis(orientation="bottom")
        plot = pg.PlotWidget(axisItems={"bottom": axis})
        axis.set_labels([str(block) for block in range(blocks)])
        return plot

    def _cascade_plot(self) -> pg.PlotWidget:
        plot = self._block_plot(len(self.record.cascade["rel_error"]))
        plot.addLegend()
        plot.setLabel("bottom", "block output")
        plot.setLabel("left", "drift from the reference")
        x = np.arange(len(self.record.cascade["rel_error"]))
        plot.plot(x, self.record.cascade["rel_error"], pen=pg.mkPen((200, 55, 59), width=2), symbol="o",
                  symbolSize=5, name="relative error")
        plot.plot(x, self.record.cascade["cos_drift"], pen=pg.mkPen((31, 119, 180), width=2), symbol="s",
                  symbolSize=5, name="1 − cosine")
        return plot

    def _position_plot(self) -> pg.PlotWidget:
        """Mean KL of the tokens in each position bucket: does this probe's damage grow with context?"""
        curve = position_curve(self.record.metrics)
        plot = pg.PlotWidget(title="Mean KL by how many tokens precede the scored token")
        plot.setLabel("left", "mean KL (nats)")
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.setLabel("bottom", "tokens of context")
        x = np.arange(len(curve))
        plot.addItem(pg.BarGraphItem(x=x, height=[kl for _, _, kl in curve], width=0.6, brush=(200, 55, 59)))
        plot.getAxis("bottom").setTicks([[(i, label) for i, (label, _, _) in enumerate(curve)]])
        return plot

    def _attention_plot(self) -> pg.PlotWidget:
        plot = self._block_plot(len(self.record.attention["js"]))
        plot.addLegend()
        plot.setLabel("bottom", "block")
        plot.setLabel("left", "attention change")
        js = np.array(self.record.attention["js"], dtype=float)
        entropy = np.array(self.record.attention["entropy_change"], dtype=float)
        x = np.arange(len(js))
        plot.addItem(pg.BarGraphItem(x=x[~np.isnan(js)], height=js[~np.isnan(js)], width=0.6,
                                     brush=(224, 123, 57), name="JS divergence"))
        # Blocks without an attention map (a removed block, a state-space block) are gaps, not zeros.
        plot.plot(x, entropy, pen=pg.mkPen((31, 119, 180), width=2), symbol="o", symbolSize=5,
                  name="Δ entropy (nats)", connect="finite")
        missing = [int(i) for i in x[np.isnan(js)]]
        if missing:
            plot.setTitle(f"no attention map in block{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                          "(removed, or without attention)")
        return plot

    def show_samples(self, samples: list[dict]) -> None:
        rows = "".join(
            f"<tr><td colspan=2><b>{html.escape(s['prompt'])}</b></td></tr>"
            f"<tr><td width='50%' valign='top'>{html.escape(s['reference'])}</td>"
            f"<td width='50%' valign='top'>{html.escape(s['modified'])}</td></tr>" for s in samples)
        self.samples_view.setHtml(
            "<table border=1 cellpadding=4 cellspacing=0 width='100%'>"
            "<tr><th>reference (greedy)</th><th>modified</th></tr>" + rows + "</table>")

    def samples_failed(self, message: str) -> None:
        self.samples_view.setPlainText(message)
        self.samples_button.setEnabled(True)
