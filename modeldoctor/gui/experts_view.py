"""The mixture of experts' part of the diagnosis: per MoE block the modifications x experts
heatmap, and for a chosen probe where the tokens went (the load per expert, original against
modified) and how many changed experts in each block (the routing flip rate)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QComboBox, QGridLayout, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from modeldoctor.checkup.experts import expert_blocks, expert_usage, routing_probes, unused_experts
from modeldoctor.gui.plots import BleedingHeatmap, LabelAxis
from modeldoctor.gui.viewmodel import expert_cells

ORIGINAL, MODIFIED = (120, 144, 156), (224, 123, 57)


def _bar_chart(left: str, bottom: str) -> tuple[pg.PlotWidget, LabelAxis]:
    axis = LabelAxis(orientation="bottom")
    chart = pg.PlotWidget(axisItems={"bottom": axis})
    chart.setLabel("left", left)
    chart.setLabel("bottom", bottom)
    chart.getAxis("left").enableAutoSIPrefix(False)  # shares read as percentages, never "(x0.001)"
    chart.setMouseEnabled(x=False, y=False)
    chart.setMenuEnabled(False)
    chart.hideButtons()
    chart.setMinimumWidth(200)
    return chart, axis


class ExpertsPanel(QWidget):
    """Filled from a finished report with `show_report`; empty (with a reason) for a dense model."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.report = None
        layout = QVBoxLayout(self)
        self.note = QLabel()
        self.note.setWordWrap(True)
        layout.addWidget(self.note)
        choosers = QHBoxLayout()
        choosers.addWidget(QLabel("MoE block"))
        self.block = QComboBox()
        choosers.addWidget(self.block)
        choosers.addWidget(QLabel("   routing of"))
        self.probe = QComboBox()
        self.probe.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.probe.setMinimumContentsLength(24)  # long probe names must not widen the page
        choosers.addWidget(self.probe, 1)
        layout.addLayout(choosers)
        grid = QGridLayout()
        layout.addLayout(grid, 1)
        self.heatmap = BleedingHeatmap()
        grid.addWidget(self.heatmap, 0, 0, 2, 1)
        self.load, self.load_axis = _bar_chart("% of tokens", "expert")
        self.load.addLegend(offset=(-10, 2), colCount=2)  # one row above the bars
        self.load_original = pg.BarGraphItem(x=[], height=[], width=0.38, brush=pg.mkBrush(*ORIGINAL), name="original")
        self.load_modified = pg.BarGraphItem(x=[], height=[], width=0.38, brush=pg.mkBrush(*MODIFIED), name="modified")
        for item in (self.load_original, self.load_modified):
            self.load.addItem(item)
        grid.addWidget(self.load, 0, 1)
        self.flips, self.flips_axis = _bar_chart("% of tokens re-routed", "block")
        self.flip_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=pg.mkBrush(*MODIFIED))
        self.flips.addItem(self.flip_bars)
        grid.addWidget(self.flips, 1, 1)
        grid.setColumnStretch(0, 3)
        grid.setColumnStretch(1, 2)
        self.block.currentIndexChanged.connect(self._draw)
        self.probe.currentIndexChanged.connect(self._draw)

    def set_threshold(self, threshold: float) -> None:
        from modeldoctor.gui.plots import severity_legend

        self.heatmap.set_threshold(threshold)
        # A finished report: an empty cell is a pair not probed (drop-expert on a router), not one to come.
        self.heatmap.legend.setText(f"<span style='font-size:8pt'>{severity_legend(threshold)}<br>pale: estimated · "
                                    "hatched: not probed (does not apply)</span>")

    def images(self, widget_png) -> dict[str, bytes]:
        """For the HTML report, as `widget_png(widget)` renders them: each MoE block's heatmap and
        load chart under the probe chosen now, and the flip rates; nothing for a dense model. The
        block on screen is put back."""
        if self.report is None or not self._blocks:
            return {}
        shown, images = self.block.currentIndex(), {}
        for index, block in enumerate(self._blocks):
            self.block.setCurrentIndex(index)
            self._draw()
            if self.heatmap.cells is not None and self.heatmap.cells.rows:
                images[f"Block {block}: modifications × experts"] = widget_png(self.heatmap)
            images[f"Block {block}: load per expert ({self.probe.currentText()})"] = widget_png(self.load)
        images[f"Routing flip rate per block ({self.probe.currentText()})"] = widget_png(self.flips)
        self.block.setCurrentIndex(shown)
        self._draw()
        return images

    def show_report(self, report) -> bool:
        """Draw `report`; False when it holds no mixture of experts (nothing to show)."""
        self.report = report
        usage = expert_usage(report)
        self._routed = routing_probes(report)
        blocks = sorted(set(expert_blocks(report)) | set(usage))
        for combo, items in ((self.block, [f"block {b}" for b in blocks]),
                             (self.probe, [f"{r.spec.label}: {r.metrics['routing_flip_rate']:.0%} of tokens re-routed"
                                           for r in self._routed])):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            combo.blockSignals(False)
        self._blocks = blocks
        unused = unused_experts(report)
        if not usage:
            self.note.setText("This model has no mixture-of-experts blocks.")
        else:
            self.note.setText(
                "Left: each expert probed alone under each modification (experts scope), coloured by verdict. "
                "Right: where the tokens go under the chosen probe, against the original model, and the share of "
                "tokens sent to other experts in each block. "
                + (f"<b>{len(unused)} expert(s) never used</b> on the evaluation text." if unused else
                   "Every expert is used on the evaluation text."))
        self._draw()
        return bool(usage)

    def _draw(self) -> None:
        if self.report is None or not self._blocks:
            return
        block = self._blocks[max(self.block.currentIndex(), 0)]
        cells = expert_cells(self.report, block)
        self.heatmap.update_matrix(cells, f"block {block}: modifications × experts" if cells.rows else
                                   f"block {block}: no expert probed alone (choose the experts scope)")
        record = self._routed[self.probe.currentIndex()] if self._routed and self.probe.currentIndex() >= 0 else None
        usage = expert_usage(self.report).get(block)
        routing = record.routing if record is not None else {}
        if routing and block in routing["blocks"]:
            at = routing["blocks"].index(block)
            original, modified = np.asarray(routing["load_original"][at]), np.asarray(routing["load_modified"][at])
        else:
            original, modified = (usage if usage is not None else np.zeros(0)), None
        x = np.arange(len(original), dtype=float)
        self.load_original.setOpts(x=x - 0.2, height=100 * original)
        self.load_modified.setOpts(x=x + 0.2, height=100 * (modified if modified is not None else np.zeros_like(original)))
        self.load_axis.set_labels([f"e{i}" for i in range(len(original))])
        self.load.setTitle(f"block {block}: load per expert" + (", original and modified" if modified is not None else ""))
        self.load.setXRange(-0.6, max(len(original), 1) - 0.4, padding=0)
        tallest = max(float(np.max(self.load_original.opts["height"], initial=0)),
                      float(np.max(self.load_modified.opts["height"], initial=0)), 1.0)
        self.load.setYRange(0, tallest * 1.4, padding=0)  # room above the bars for the legend
        if routing:
            rates = np.asarray(routing["flip_rate"], dtype=float)
            self.flip_bars.setOpts(x=np.arange(len(rates), dtype=float), height=100 * rates)
            self.flips_axis.set_labels([str(b) for b in routing["blocks"]])
            self.flips.setXRange(-0.6, len(rates) - 0.4, padding=0)
            self.flips.setYRange(0, 100 * max(float(rates.max(initial=0)), 0.05) * 1.1, padding=0)
            self.flips.setTitle("routing flip rate per block")
        else:
            self.flip_bars.setOpts(x=[], height=[])
            self.flips.setTitle("no routing figures in this checkup")
