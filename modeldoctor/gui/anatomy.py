"""The anatomy view: the model drawn as its stack of blocks, the embedding above and the head below,
each block's linears as cells grouped by part (attention, MLP). What colours the cells comes from
the view model (checkup verdicts, export formats, treatment figures); clicking a cell reports it."""

from __future__ import annotations

import math

from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

from modeldoctor.gui.viewmodel import EMBEDDING, AnatomyCell, AnatomyLayout

LEFT, TOP, BOTTOM_TEXT, GAP = 34, 50, 34, 6


def short(column: str) -> str:
    """'self_attn.q_proj' -> 'q', 'mlp.down_proj' -> 'down'."""
    return column.rsplit(".", 1)[-1].removesuffix("_proj") or column


class AnatomyView(QWidget):
    cellClicked = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.layout_ = AnatomyLayout([], [])
        self.cells: dict[str, AnatomyCell] = {}
        self.legend = ""
        self.title = ""
        self.setMouseTracking(True)
        self.setMinimumSize(260, 220)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def sizeHint(self) -> QSize:
        return QSize(420, 480)

    def set_layout(self, layout: AnatomyLayout) -> None:
        self.layout_ = layout
        self.update()

    def set_cells(self, cells: dict[str, AnatomyCell], legend: str = "", title: str = "") -> None:
        self.cells, self.legend, self.title = cells, legend, title
        self.update()

    # ---- geometry ---------------------------------------------------------------------------
    def _edge(self) -> int:
        """Height of the embedding and head rows: at least a line of text."""
        return max(int(self._row_height()), self.fontMetrics().height() + 2)

    def _row_height(self) -> float:
        return max((self.height() - TOP - BOTTOM_TEXT) / max(len(self.layout_.blocks) + 2, 1), 3.0)

    def _grid(self) -> tuple[float, float, list[float]]:
        """(cell width, block row height, x of each column)."""
        columns = max(len(self.layout_.columns), 1)
        groups = max(len(self.layout_.groups()), 1)
        width = max((self.width() - LEFT - 8 - GAP * (groups - 1)) / columns, 4.0)
        edge = self._edge()
        height = max((self.height() - TOP - BOTTOM_TEXT - 2 * edge) / max(len(self.layout_.blocks), 1), 2.0)
        xs, x, previous = [], float(LEFT), None
        for column in self.layout_.columns:
            part = column.split(".", 1)[0]
            if previous is not None and part != previous:
                x += GAP
            xs.append(x)
            x += width
            previous = part
        return width, height, xs

    def cell_rect(self, name: str) -> QRect | None:
        width, height, xs = self._grid()
        if not xs:
            return None
        edge = self._edge()
        full = QRect(int(xs[0]), 0, int(xs[-1] + width - xs[0]), edge - 1)
        if name == EMBEDDING:
            return full.translated(0, TOP)
        if name == "head":
            return full.translated(0, int(TOP + edge + len(self.layout_.blocks) * height) + 1)
        block, _, column = name.partition(".")
        if not block.isdigit() or int(block) not in self.layout_.blocks or column not in self.layout_.columns \
                or not self.layout_.has(name):
            return None
        row = self.layout_.blocks.index(int(block))
        return QRect(int(xs[self.layout_.columns.index(column)]), int(TOP + edge + row * height), int(width) - 1,
                     max(int(height) - 1, 1))

    def cell_at(self, point: QPoint) -> str | None:
        for name in [EMBEDDING, "head"] + [f"{b}.{c}" for b in self.layout_.blocks for c in self.layout_.columns]:
            rect = self.cell_rect(name)
            if rect is not None and rect.contains(point):
                return name
        return None

    # ---- drawing ----------------------------------------------------------------------------
    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.WindowText)
        painter.fillRect(self.rect(), palette.color(QPalette.ColorRole.Base))
        if not self.layout_.columns:
            painter.setPen(text)
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                             "The model's picture appears here once a model is loaded or a session opened.")
            return
        width, height, xs = self._grid()
        painter.setPen(text)
        if self.title:
            painter.drawText(QRect(0, 0, self.width(), 16), Qt.AlignmentFlag.AlignCenter, self.title)
        font = painter.font()
        small = font.pointSizeF() * 0.85 if font.pointSizeF() > 0 else 8
        font.setPointSizeF(small)
        painter.setFont(font)
        line = painter.fontMetrics().height()
        x = xs[0]
        for part, count in self.layout_.groups():  # part names over their columns
            painter.drawText(QRect(int(x), 18, int(count * width), line), Qt.AlignmentFlag.AlignCenter, part)
            x += count * width + GAP
        for column, cx in zip(self.layout_.columns, xs):
            painter.drawText(QRect(int(cx), 18 + line, int(width), line), Qt.AlignmentFlag.AlignCenter,
                             short(column))
        hatch = QBrush(QColor(150, 150, 150, 140), Qt.BrushStyle.BDiagPattern)
        # A block number is a line of text tall, centred on its row (rows are often thinner than
        # text), and only every so many rows are numbered, so numbers neither clip nor overlap.
        label_every = max(1, math.ceil(line / max(height, 1.0)))
        painter.setPen(text)
        for number, block in enumerate(self.layout_.blocks):
            if number % label_every == 0:
                middle = int(TOP + self._edge() + (number + 0.5) * height)
                painter.drawText(QRect(0, middle - line // 2, LEFT - 4, line),
                                 Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, str(block))
        names = [EMBEDDING] + [f"{b}.{c}" for b in self.layout_.blocks for c in self.layout_.columns] + ["head"]
        for name in names:
            rect = self.cell_rect(name)
            if rect is None:  # a linear this block does not have (a hybrid's Mamba block: no q_proj)
                continue
            cell = self.cells.get(name)
            if cell is None or cell.color is None:
                painter.fillRect(rect, hatch)
            else:
                painter.fillRect(rect, QColor(*cell.color))
            if cell is not None and cell.outlined:
                painter.setPen(QPen(text, 2))
                painter.drawRect(rect.adjusted(1, 1, -1, -1))
        painter.setPen(text)
        for name, label in ((EMBEDDING, "embedding"), ("head", "head")):
            painter.drawText(self.cell_rect(name), Qt.AlignmentFlag.AlignCenter, label)
        if self.legend:
            painter.drawText(QRect(4, self.height() - BOTTOM_TEXT + 4, self.width() - 8, BOTTOM_TEXT - 4),
                             Qt.AlignmentFlag.AlignLeft | Qt.TextFlag.TextWordWrap, self.legend)

    # ---- interaction ------------------------------------------------------------------------
    def mouseMoveEvent(self, event) -> None:
        name = self.cell_at(event.position().toPoint())
        cell = self.cells.get(name) if name else None
        if cell is not None:
            QToolTip.showText(event.globalPosition().toPoint(), cell.text, self)
        else:
            QToolTip.hideText()

    def mousePressEvent(self, event) -> None:
        name = self.cell_at(event.position().toPoint())
        if name is not None and event.button() == Qt.MouseButton.LeftButton:
            self.cellClicked.emit(name)
