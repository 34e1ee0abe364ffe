"""pyqtgraph plots of the checkup. Items are created once and updated in place."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal

from modeldoctor.gui.viewmodel import KL_FLOOR, SEVERITY_COLORS, Bars, log_kl

BLEED_MAP = pg.ColorMap([0.0, 0.5, 0.75, 1.0], [SEVERITY_COLORS["healthy"], SEVERITY_COLORS["mild"],
                                                 SEVERITY_COLORS["moderate"], SEVERITY_COLORS["severe"]])


class LogAxis(pg.AxisItem):
    """Ticks of a log10 axis labelled in plain numbers (1e-3, 0.01, 1)."""

    def __init__(self, offset: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.offset = offset

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

    def set_labels(self, labels: list[str]) -> None:
        self.labels = list(labels)
        step = max(1, len(self.labels) // 30)
        self.setTicks([[(i, label) for i, label in enumerate(self.labels) if i % step == 0]])


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
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brushes=[])
        self.addItem(self.bars)
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False,
                                              pen=pg.mkPen((200, 55, 59), width=2, style=Qt.PenStyle.DashLine))
        self.addItem(self.threshold_line)
        self.threshold_label = pg.TextItem("bleeding threshold", anchor=(0, 1), color=(200, 55, 59))
        self.addItem(self.threshold_label)
        self.labels = [pg.TextItem(anchor=(0.5, 1.0), color=pg.getConfigOption("foreground")) for _ in range(3)]
        for label in self.labels:
            self.addItem(label)
        self.current = Bars()
        self.scene().sigMouseClicked.connect(self._clicked)

    def set_threshold(self, threshold: float) -> None:
        self.threshold_line.setPos(log_kl(threshold) - self.offset)
        self.threshold_label.setPos(-0.55, log_kl(threshold) - self.offset)

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
        worst = bars.worst(len(self.labels))
        for slot, label in enumerate(self.labels):
            if slot < len(worst):
                i = worst[slot]
                label.setText(f"{bars.labels[i]}\n{bars.values[i]:.3g}")
                label.setPos(float(i), float(bars.heights()[i]))
                label.setVisible(True)
            else:
                label.setVisible(False)
        top = max([h for h in bars.heights()] + [self.threshold_line.value() + 1, 1.0])
        self.setYRange(0, top + 0.6, padding=0)
        self.setXRange(-0.6, max(total or 0, len(x)) - 0.4, padding=0)

    def _clicked(self, event) -> None:
        if not self.current.values:
            return
        point = self.plotItem.vb.mapSceneToView(event.scenePos())
        index = int(round(point.x()))
        if 0 <= index < len(self.current.values) and abs(point.x() - index) <= 0.45:
            self.barClicked.emit(index)


class BleedingHeatmap(pg.PlotWidget):
    """Rows x columns of log10 KL on the healthy-to-bleeding colour scale."""

    def __init__(self, parent=None) -> None:
        self.bottom = LabelAxis(orientation="bottom")
        self.left = LabelAxis(orientation="left")
        super().__init__(parent, axisItems={"bottom": self.bottom, "left": self.left})
        self.setTitle("layers × modifications")
        self.setMenuEnabled(False)
        self.setMouseEnabled(x=False, y=False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setLookupTable(BLEED_MAP.getLookupTable(nPts=256))
        self.addItem(self.image)
        self.getViewBox().invertY(True)
        self.colorbar = pg.ColorBarItem(values=(-4, 0), colorMap=BLEED_MAP, interactive=False, width=12,
                                        label="log10 mean KL")
        self.colorbar.setImageItem(self.image, insert_in=self.getPlotItem())
        self.threshold = 0.01

    def set_threshold(self, threshold: float) -> None:
        self.threshold = threshold

    def update_matrix(self, matrix: np.ndarray, rows: list[str], cols: list[str]) -> None:
        # Colour scale centred on the threshold: two decades either side.
        centre = math.log10(self.threshold)
        shown = np.where(np.isnan(matrix), centre - 2, matrix) if matrix.size else np.zeros((1, 1))
        self.image.setImage(shown, autoLevels=False, levels=(centre - 2, centre + 2))
        self.colorbar.setLevels((centre - 2, centre + 2))
        self.image.setRect(-0.5, -0.5, max(len(cols), 1), max(len(rows), 1))
        self.bottom.set_labels(cols)
        self.left.set_labels(rows)
        self.setXRange(-0.5, max(len(cols), 1) - 0.5, padding=0)
        self.setYRange(-0.5, max(len(rows), 1) - 0.5, padding=0)


class CurvePlot(pg.PlotWidget):
    """Named curves of mean KL (log) against a number, with markers and the threshold."""

    PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]

    def __init__(self, x_label: str, parent=None) -> None:
        super().__init__(parent, axisItems={"left": LogAxis(0.0, orientation="left")})
        self.setLabel("left", "mean KL (nats)")
        self.setLabel("bottom", x_label)
        self.setMenuEnabled(False)
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

    def clear_curves(self) -> None:
        self.update_curves({}, [])
