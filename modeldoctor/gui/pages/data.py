"""Step 2: choose the evaluation data and its token budget."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup, QCheckBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QRadioButton, QSlider,
    QVBoxLayout, QWidget,
)

from modeldoctor.data import DataSpec
from modeldoctor.errors import DataError

TOKEN_STEP = 128


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_range(low: float, high: float) -> str:
    """'about 3 min 10 s' when the ends agree to within a fifth, else '2–4 min'."""
    if high <= low * 1.2 or high - low < 5:
        return f"about {format_duration((low + high) / 2)}"
    if high < 60:
        return f"{int(round(low))}–{int(round(high))} s"
    if high < 3600:
        return f"{max(int(low // 60), 0)}–{int(-(-high // 60))} min"
    return f"{low / 3600:.1f}–{high / 3600:.1f} h"


class DataPage(QWidget):
    changed = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.user_file: str | None = None
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Evaluation data</h2>Every modified model is compared with the original on the same "
                       "tokens. Calibration statistics come from a separate part of the same source.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        source_box = QGroupBox("Text")
        source_layout = QVBoxLayout(source_box)
        self.builtin = QRadioButton("Built-in English text")
        self.self_generated = QRadioButton("Text the model writes itself (sampled once with a fixed seed)")
        file_row = QHBoxLayout()
        self.own_file = QRadioButton("My own file (.txt or .jsonl with a \"text\" field):")
        self.choose_file = QPushButton("Choose…")
        self.file_label = QLabel("no file chosen")
        self.file_label.setWordWrap(True)
        file_row.addWidget(self.own_file)
        file_row.addWidget(self.choose_file)
        file_row.addWidget(self.file_label, 1)
        self.group = QButtonGroup(self)
        for button in (self.builtin, self.self_generated, self.own_file):
            self.group.addButton(button)
        self.builtin.setChecked(True)
        source_layout.addWidget(self.builtin)
        source_layout.addLayout(file_row)
        source_layout.addWidget(self.self_generated)
        layout.addWidget(source_box)
        self.knowledge = QCheckBox("Also score the 222 knowledge probes (capitals, elements, authors, dates…) "
                                   "on the worst bleeding probes — compression hurts knowledge before perplexity")
        self.knowledge.setChecked(True)
        layout.addWidget(self.knowledge)
        budget_box = QGroupBox("Token budget")
        budget_layout = QVBoxLayout(budget_box)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(1, 8192 // TOKEN_STEP)
        self.slider.setValue(1024 // TOKEN_STEP)
        self.tokens_label = QLabel()
        self.estimate_label = QLabel()
        self.estimate_label.setWordWrap(True)
        budget_layout.addWidget(self.slider)
        budget_layout.addWidget(self.tokens_label)
        budget_layout.addWidget(self.estimate_label)
        layout.addWidget(budget_box)
        layout.addStretch()
        self.slider.valueChanged.connect(self._emit)
        self.group.buttonToggled.connect(lambda *a: self._emit())
        self.knowledge.toggled.connect(self._emit)
        self.choose_file.clicked.connect(self._choose)
        self.own_file.clicked.connect(self._own_file_clicked)
        self._emit()

    def _choose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Evaluation text", "", "Text (*.txt *.jsonl);;All files (*)")
        if path:
            self.set_user_file(path)

    def _own_file_clicked(self) -> None:
        if not self.user_file:  # the option means nothing without a file: ask for one
            self._choose()
            if not self.user_file:
                self.builtin.setChecked(True)

    def set_user_file(self, path: str) -> bool:
        """Read the file now, so an empty, binary or malformed one is refused when chosen, not at Start."""
        from modeldoctor.data.sources import read_documents

        try:
            documents = read_documents(path)
        except DataError as exc:
            self.user_file = None
            self.file_label.setText(f"<span style='color:#c8373b'>Not used: {exc} Choose another file; the "
                                    "built-in text is used meanwhile.</span>")
            self.file_label.setToolTip(path)
            self.builtin.setChecked(True)
            self._emit()
            return False
        self.user_file = path
        words = sum(len(d.split()) for d in documents)
        self.file_label.setText(f"{Path(path).name} ({len(documents)} passages, about {words:,} words)")
        self.file_label.setToolTip(path)
        self.own_file.setChecked(True)
        self._emit()
        return True

    def _emit(self) -> None:
        self.tokens_label.setText(f"{self.slider.value() * TOKEN_STEP} evaluation tokens, in sequences of 256")
        self.changed.emit()

    def spec(self) -> DataSpec:
        if self.own_file.isChecked() and self.user_file:
            source = self.user_file
        elif self.self_generated.isChecked():
            source = "self"
        else:
            source = "builtin"
        tokens = self.slider.value() * TOKEN_STEP
        return DataSpec(source=source, tokens=tokens, seq_len=min(256, tokens), knowledge=self.knowledge.isChecked())

    def set_spec(self, spec: DataSpec) -> None:
        self.slider.setValue(max(1, spec.tokens // TOKEN_STEP))
        self.knowledge.setChecked(spec.knowledge)
        if spec.source == "self":
            self.self_generated.setChecked(True)
        elif spec.source != "builtin" and Path(spec.source).is_file():
            self.set_user_file(spec.source)
        else:
            self.builtin.setChecked(True)

    def show_estimate(self, reference_s: float | None) -> None:
        if reference_s is None:
            self.estimate_label.setText("Load a model to see how long this takes on this computer.")
        else:
            self.estimate_label.setText(
                f"Estimated from a timed pass on this computer: one pass over this text takes about "
                f"{format_duration(reference_s)}. Each probe re-runs the model from its layer onwards; the "
                "Plan step shows what the whole checkup takes.")
