"""Treatment: said plainly while its engine calls are being built."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

TEXTS = {
    "Treatment": (
        "<h2>Treatment</h2><p>Not available in this version.</p>"
        "<p>Coming next: the hemorrhage study's mitigations, each measured before and after on "
        "held-out text — activation-aware scaling (SmoothQuant / AWQ style) for the quantization "
        "bleeders, gradient-aware pruning, decoding calibration, mixed precision under a size "
        "budget, and knowledge-recovery prompting.</p>"
        "<p>Today: the Diagnosis page names each bleeding layer and the treatment it calls for, and "
        "the Export page keeps the bleeding layers in fp32 — the mixed-precision fallback.</p>"),
}


class UpcomingPage(QWidget):
    def __init__(self, step: str, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        label = QLabel(TEXTS[step])
        label.setWordWrap(True)
        layout.addWidget(label)
        layout.addStretch()
