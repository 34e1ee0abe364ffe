"""pyqtgraph plots of the checkup. Items are created once and updated in place."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFontMetrics

from modeldoctor.gui.viewmodel import KL_FLOOR, SEVERITY_COLORS, Bars, log_kl



def backing():
    """A translucent brush of the plot background, behind text drawn over bars."""
    color = pg.mkColor(pg.getConfigOption("background"))
    color.setAlpha(210)
    return pg.mkBrush(color)


class LogAxis(pg.AxisItem):
    """Ticks of a log10 axis labelled in plain numbers (1e-3, 0.01, 1)."""

    def __init__(self, offset: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.offset = offset
        self.enableAutoSIPrefix(False)  # the ticks are exponents, never "(x0.001)"

    def tickStrings(self, values, scale, spacing):
        return [f"{10 ** (v + self.offset):.0e}" if abs(v - round(v)) < 1e-6 else "" for v in values]

    def tickValues(self, minVal, maxVal, size):
        start, stop = math.floor(minVal), math.ceil(maxVal)
        return [(1.0, [float(v) for v in range(start, stop + 1)])]


class LabelAxis(pg.AxisItem):
    """Category labels at integer positions."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels: list[str] = []
        self.enableAutoSIPrefix(False)  # positions are indices: no "layer (x0.001)" on an empty chart

    def set_labels(self, labels: list[str]) -> None:
        self.labels = list(labels)
        self._relabel()

    def resizeEvent(self, event=None) -> None:
        super().resizeEvent(event)
        if hasattr(self, "labels"):  # the base class resizes it once before __init__ has set them
            self._relabel()

    def linkedViewChanged(self, view, newRange=None) -> None:
        super().linkedViewChanged(view, newRange)
        if hasattr(self, "labels"):
            self._relabel()

    def _relabel(self) -> None:
        """Every step-th label, the smallest step at which no two shown labels overlap at the axis's
        current size and range (measured with its font)."""
        metrics = QFontMetrics(self.style.get("tickFont") or self.font())
        across = self.orientation in ("bottom", "top")
        sizes = [metrics.horizontalAdvance(label) if across else metrics.height() for label in self.labels]
        view = self.linkedView()
        low, high = (view.viewRange()[0 if across else 1] if view is not None else (-0.5, len(self.labels) - 0.5))
        pixels = max(self.width() if across else self.height(), 50.0) / max(high - low, 1e-9)  # per position
        step = 1
        while step < len(sizes) and any((sizes[i] + sizes[i + step]) / 2 + 6 > step * pixels
                                        for i in range(0, len(sizes) - step, step)):
            step += 1
        self.setTicks([[(i, label) for i, label in enumerate(self.labels) if i % step == 0]])


def spaced_labels(plot: pg.PlotWidget, ranked: list[int], labels: list[str], values: list[float], slots: int,
                  count: int) -> list[int]:
    """Of the bars in `ranked` order (worst first), up to `count` whose two-line labels (name, KL)
    do not overlap at the plot's current width."""
    bar_px = max(plot.plotItem.vb.width(), 200.0) / max(slots, 1)
    longest = max((max(len(label), len(f"{value:.3g}")) for label, value in zip(labels, values)), default=2)
    gap = max(1, math.ceil((7.0 * longest + 12) / bar_px))
    chosen: list[int] = []
    for i in ranked:
        if all(abs(i - j) >= gap for j in chosen):
            chosen.append(i)
        if len(chosen) == count:
            break
    return chosen


class BleedingBarChart(pg.PlotWidget):
    """Mean KL per layer on a log scale, coloured by verdict, threshold line, worst labelled."""

    barClicked = Signal(int)

    def __init__(self, parent=None) -> None:
        self.bottom = LabelAxis(orientation="bottom")
        offset = math.log10(KL_FLOOR)
        super().__init__(parent, axisItems={"bottom": self.bottom, "left": LogAxis(offset, orientation="left")})
        self.offset = offset
        self.setLabel("left", "mean KL (nats)")
        self.setLabel("bottom", "layer")
        self.setMenuEnabled(False)
        self.setMouseEnabled(x=False, y=False)
        self.hideButtons()  # no stray "A" (auto-range) button, on screen or in the report's images
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brushes=[])
        self.addItem(self.bars)
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False,
                                              pen=pg.mkPen((200, 55, 59), width=2, style=Qt.PenStyle.DashLine))
        self.addItem(self.threshold_line)
        # Above the bars, on its own backing, so a tall bar never hides it.
        self.threshold_label = pg.TextItem("bleeding threshold", anchor=(0, 1), color=(200, 55, 59),
                                           fill=backing())
        self.threshold_label.setZValue(20)
        self.addItem(self.threshold_label)
        self.labels = [pg.TextItem(anchor=(0.5, 1.0), color=pg.getConfigOption("foreground")) for _ in range(3)]
        for label in self.labels:
            label.setZValue(10)
            self.addItem(label)
        self.current = Bars()
        self.slots = 0
        self.scene().sigMouseClicked.connect(self._clicked)
        # Which labels fit depends on the width: lay them out again whenever it changes.
        self.plotItem.vb.sigResized.connect(self._place_labels)

    def set_threshold(self, threshold: float) -> None:
        self.threshold_line.setPos(log_kl(threshold) - self.offset)
        self.threshold_label.setText(f"bleeding threshold {threshold:g}")
        self.threshold_label.setPos(-0.55, log_kl(threshold) - self.offset)

    def labelled_bars(self, bars: Bars, total: int) -> list[int]:
        """The worst bars that get a label, none so close to another that the texts would overlap."""
        return spaced_labels(self, bars.worst(len(bars.values)), bars.labels, bars.values, total, len(self.labels))

    def update_bars(self, bars: Bars, total: int | None = None) -> None:
        self.current = bars
        x = np.arange(len(bars.values), dtype=float)
        # An estimate is drawn pale with an outline in its colour; a measurement solid.
        brushes = [pg.mkBrush(*c, 70 if guess else 255) for c, guess in zip(bars.colors(), bars.estimated)]
        pens = [pg.mkPen(c, width=1.5, style=Qt.PenStyle.DashLine) if guess else pg.mkPen(None)
                for c, guess in zip(bars.colors(), bars.estimated)]
        self.bars.setOpts(x=x, height=bars.heights(), width=0.8, brushes=brushes, pen=pg.mkPen(None),
                          pens=pens or None)  # pyqtgraph fails on an empty list of pens
        self.bottom.set_labels(bars.labels)
        self.slots = max(total or 0, len(x))
        self._place_labels()
        top = max([h for h in bars.heights()] + [self.threshold_line.value() + 1, 1.0])
        self.setYRange(0, top + 1.2, padding=0)  # room above the tallest bar for its two-line label
        self.setXRange(-0.6, self.slots - 0.4, padding=0)

    def _place_labels(self) -> None:
        bars, slots = self.current, self.slots
        worst = self.labelled_bars(bars, slots)
        for slot, label in enumerate(self.labels):
            if slot < len(worst):
                i = worst[slot]
                label.setText(f"{bars.labels[i]}\n{bars.values[i]:.3g}")
                # At either end of the axis the label leans inwards from its own bar's outer edge
                # (left-aligned on the bar's left edge at the left end), so it is never cut off.
                edge = 0.0 if i < 2 else 1.0 if i > slots - 3 else 0.5
                label.setAnchor((edge, 1.0))
                label.setPos(float(i) + 0.8 * (edge - 0.5), float(bars.heights()[i]))
                label.setVisible(True)
            else:
                label.setVisible(False)

    def _clicked(self, event) -> None:
        if not self.current.values:
            return
        point = self.plotItem.vb.mapSceneToView(event.scenePos())
        index = int(round(point.x()))
        if 0 <= index < len(self.current.values) and abs(point.x() - index) <= 0.45:
            self.barClicked.emit(index)


def kl_chart(left: str = "mean KL (nats)", bottom: str = "", title: str = "",
             bottom_axis: pg.AxisItem | None = None) -> pg.PlotWidget:
    """A still chart with a log-scale KL axis on the left: no mouse zoom, menu or auto-range button."""
    axes = {"left": LogAxis(math.log10(KL_FLOOR), orientation="left")}
    if bottom_axis is not None:
        axes["bottom"] = bottom_axis
    chart = pg.PlotWidget(axisItems=axes)
    chart.setLabel("left", left)
    if bottom:
        chart.setLabel("bottom", bottom)
    if title:
        chart.setTitle(title)
    chart.setMouseEnabled(x=False, y=False)
    chart.setMenuEnabled(False)
    chart.hideButtons()
    return chart


def severity_legend(threshold: float) -> str:
    """One line of HTML naming the verdict colours and their KL ranges (shared by bars and heatmap)."""
    from modeldoctor.checkup.verdict import SEVERITY_STEPS

    def swatch(name: str) -> str:
        r, g, b = SEVERITY_COLORS[name]
        return f"<span style='color:rgb({r},{g},{b})'>&#9632;</span>"

    limits = {name: factor * threshold for factor, name in SEVERITY_STEPS}
    return (f"{swatch('healthy')} ≤ {threshold:g} &nbsp; {swatch('mild')} > {limits['mild']:g} &nbsp; "
            f"{swatch('moderate')} > {limits['moderate']:g} &nbsp; {swatch('severe')} > {limits['severe']:g} nats")


class BleedingHeatmap(pg.PlotWidget):
    """Rows x columns coloured by each probe's verdict, the same colours as the bars; cells not
    measured yet are left empty over a hatched background, estimates drawn pale."""

    def __init__(self, parent=None) -> None:
        self.bottom = LabelAxis(orientation="bottom")
        self.left = LabelAxis(orientation="left")
        super().__init__(parent, axisItems={"bottom": self.bottom, "left": self.left})
        self.setMenuEnabled(False)
        self.setMouseEnabled(x=False, y=False)
        self.hideButtons()
        self.image = pg.ImageItem(axisOrder="row-major")
        self.addItem(self.image)
        view = self.getViewBox()
        view.invertY(True)
        view.setBackgroundColor((128, 128, 128))
        view.background.setBrush(QBrush(QColor(150, 150, 150, 120), Qt.BrushStyle.BDiagPattern))
        self.setTitle("layers × modifications")
        self.legend = pg.LabelItem(justify="left")  # under the bottom axis: the colours' meaning
        self.plotItem.layout.addItem(self.legend, 4, 0, 1, 3)
        self.threshold = 0.01
        self.cells = None
        self.set_threshold(self.threshold)
        self.scene().sigMouseMoved.connect(self._hover)

    def set_threshold(self, threshold: float) -> None:
        self.threshold = threshold
        self.legend.setText(f"<span style='font-size:8pt'>{severity_legend(threshold)}<br>pale: estimated · "
                            "hatched: not measured yet</span>")

    def update_matrix(self, cells, title: str = "layers × modifications") -> None:
        self.cells = cells
        self.setTitle(title)
        colors = cells.colors if cells.colors.size else np.zeros((1, 1, 4), np.uint8)
        self.image.setImage(colors, autoLevels=False, levels=(0, 255))
        rows, cols = max(len(cells.rows), 1), max(len(cells.cols), 1)
        self.image.setRect(-0.5, -0.5, cols, rows)
        self.bottom.set_labels(cells.cols)
        self.left.set_labels(cells.rows)
        self.setXRange(-0.5, cols - 0.5, padding=0)
        self.setYRange(-0.5, rows - 0.5, padding=0)

    def cell_text(self, row: int, col: int) -> str:
        """What hovering over a cell says."""
        cells = self.cells
        record = cells.records.get((row, col)) if cells is not None else None
        if record is None:
            return "not measured yet" if cells is not None and row < len(cells.rows) and col < len(cells.cols) else ""
        how = "estimated" if record.estimated else "measured"
        return f"{record.spec.label}: mean KL {record.score:.4g} nats ({how}), {record.severity}"

    def _hover(self, position) -> None:
        if self.cells is None:
            return
        point = self.getViewBox().mapSceneToView(position)
        row, col = int(round(point.y())), int(round(point.x()))
        self.setToolTip(self.cell_text(row, col) if row >= 0 and col >= 0 else "")


class CurvePlot(pg.PlotWidget):
    """Named curves of mean KL (log) against a number, with markers and the threshold."""

    PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]

    def __init__(self, x_label: str, parent=None, empty_text: str = "") -> None:
        super().__init__(parent, axisItems={"left": LogAxis(0.0, orientation="left")})
        self.empty_text = empty_text  # the title while there is nothing to draw: why, and how to fill it
        self.setLabel("left", "mean KL (nats)")
        self.setLabel("bottom", x_label)
        self.setMenuEnabled(False)
        self.hideButtons()
        self.legend = self.addLegend(offset=(10, 10))
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.marks = pg.ScatterPlotItem(size=14, symbol="x", pen=pg.mkPen((200, 55, 59), width=3))
        self.addItem(self.marks)
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False,
                                              pen=pg.mkPen((200, 55, 59), width=2, style=Qt.PenStyle.DashLine))
        self.addItem(self.threshold_line)

    def set_threshold(self, threshold: float) -> None:
        self.threshold_line.setPos(log_kl(threshold))

    def update_curves(self, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                      marks: list[tuple[float, float]]) -> None:
        for name, (x, y) in curves.items():
            if name not in self.curves:
                color = self.PALETTE[len(self.curves) % len(self.PALETTE)]
                self.curves[name] = self.plot([], [], name=name, pen=pg.mkPen(color, width=2), symbol="o",
                                              symbolSize=6, symbolBrush=color)
            self.curves[name].setData(x, np.log10(np.maximum(y, KL_FLOOR)))
        for name in list(self.curves):
            if name not in curves:
                self.removeItem(self.curves.pop(name))
        self.marks.setData([m[0] for m in marks], [log_kl(m[1]) for m in marks])
        self.setTitle("" if curves else self.empty_text)

    def clear_curves(self) -> None:
        self.update_curves({}, [])
