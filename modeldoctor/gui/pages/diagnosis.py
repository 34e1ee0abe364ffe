"""Step 5: the diagnosis in plain language, with save and export actions."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from modeldoctor.checkup.diagnosis import diagnose, estimate_summary
from modeldoctor.report.html import SEVERITY_COLORS


class DiagnosisPage(QWidget):
    saveRequested = Signal()
    htmlRequested = Signal()
    csvRequested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Diagnosis</h2>"))
        self.text = QTextBrowser()
        layout.addWidget(self.text, 1)
        row = QHBoxLayout()
        self.save = QPushButton("Save session…")
        self.html = QPushButton("Export HTML report…")
        self.csv = QPushButton("Export CSV…")
        for button in (self.save, self.html, self.csv):
            row.addWidget(button)
        row.addStretch()
        layout.addLayout(row)
        self.save.clicked.connect(self.saveRequested)
        self.html.clicked.connect(self.htmlRequested)
        self.csv.clicked.connect(self.csvRequested)

    def show_report(self, report) -> None:
        ref = report.reference
        knowledge = report.reference_knowledge()
        parts = [f"<p>{html.escape(str(report.model.get('name')))}: reference perplexity "
                 f"<b>{ref.get('ppl', float('nan')):.3f}</b> on {int(ref.get('tokens', 0))} tokens"
                 + (f", knowledge probes <b>{knowledge:.1%}</b>" if knowledge is not None else "")
                 + f". {len(report.probes)} probes, {report.status}. Figures on "
                 f"{html.escape(report.measured_on())}.</p>"]
        for line in estimate_summary(report):
            parts.append(f"<p><i>{html.escape(line)}</i></p>")
        for finding in diagnose(report):
            color = SEVERITY_COLORS[finding.severity]
            parts.append(f"<h3 style='color:{color}'>{html.escape(finding.title)}</h3>"
                         f"<p>{html.escape(finding.text)}</p>")
            if finding.recommendation:
                parts.append(f"<p><i>Recommended treatment:</i> {html.escape(finding.recommendation)}</p>")
        self.text.setHtml("".join(parts))
