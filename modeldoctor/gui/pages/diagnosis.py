"""Step 5: the diagnosis in plain language and in pictures (the worst layers of each modification,
the robustness curves with their knees), with save and export actions and the next step."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox, QHBoxLayout, QLabel, QPushButton, QTabWidget, QTextBrowser, QVBoxLayout, QWidget,
)

from modeldoctor.checkup.diagnosis import context_curves, diagnose, estimate_summary, kl_plain_reading
from modeldoctor.gui.experts_view import ExpertsPanel
from modeldoctor.metrics.divergence import POSITION_EDGES
from modeldoctor.gui.plots import BleedingBarChart, CurvePlot
from modeldoctor.gui.viewmodel import Bars
from modeldoctor.report.html import SEVERITY_COLORS

WORST_SHOWN = 10


def _bucket_middle(start: int) -> float:
    """Where a position bucket sits on a log axis: halfway (geometrically) through it."""
    index = POSITION_EDGES.index(start)
    end = POSITION_EDGES[index + 1] if index + 1 < len(POSITION_EDGES) else start * 4
    return (max(start, 1) * end) ** 0.5


class DiagnosisPage(QWidget):
    saveRequested = Signal()
    htmlRequested = Signal()
    csvRequested = Signal()
    treatRequested = Signal()  # the next step: the Treatment page with the recommendation ticked
    probeClicked = Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.report = None
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Diagnosis</h2>What the checkup found, worst first, and the treatment each finding "
                       "calls for. <b>Next:</b> treat the bleeding layers, or save the session and the report.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        self.tabs = QTabWidget()
        self.text = QTextBrowser()
        self.tabs.addTab(self.text, "Findings")
        worst = QWidget()
        worst_layout = QVBoxLayout(worst)
        chooser = QHBoxLayout()
        chooser.addWidget(QLabel(f"The {WORST_SHOWN} worst layers under"))
        self.modification = QComboBox()
        chooser.addWidget(self.modification, 1)
        worst_layout.addLayout(chooser)
        self.worst = BleedingBarChart()
        worst_layout.addWidget(self.worst)
        self.tabs.addTab(worst, "Worst layers")
        self.curves = CurvePlot("strength (bits, sparsity or % of the rank)", empty_text=(
            "No robustness curves: run a checkup with 'strength sweep' ticked on the Plan page."))
        self.tabs.addTab(self.curves, "Robustness curves")
        context = QWidget()
        context_layout = QVBoxLayout(context)
        self.by_position = CurvePlot("tokens of context before the scored token (log scale)",
                                     empty_text="No figures by position: measure some layer probes.")
        self.by_length = CurvePlot("sequence length in tokens (log scale)", empty_text=(
            "No long-context probe: tick it on the Plan page (and choose more evaluation tokens on the Data "
            "page to reach longer sequences)."))
        self.length_note = QLabel()
        self.length_note.setWordWrap(True)
        context_layout.addWidget(self.by_position)
        context_layout.addWidget(self.by_length)
        context_layout.addWidget(self.length_note)
        self.tabs.addTab(context, "Context length")
        self.experts = ExpertsPanel()  # shown for a mixture of experts only
        self.tabs.addTab(self.experts, "Experts")
        layout.addWidget(self.tabs, 1)
        row = QHBoxLayout()
        self.save = QPushButton("Save session…")
        self.html = QPushButton("Export HTML report…")
        self.csv = QPushButton("Export CSV…")
        self.glossary = QPushButton("What does this mean?")
        for button in (self.save, self.html, self.csv, self.glossary):
            row.addWidget(button)
        row.addStretch()
        self.treat = QPushButton("Treat these layers →")
        self.treat.setToolTip("Open the Treatment step with the diagnosis's recommendation ticked.")
        self.treat.setMinimumHeight(32)
        row.addWidget(self.treat)
        layout.addLayout(row)
        self.save.clicked.connect(self.saveRequested)
        self.html.clicked.connect(self.htmlRequested)
        self.csv.clicked.connect(self.csvRequested)
        self.treat.clicked.connect(self.treatRequested)
        self.glossary.clicked.connect(self._glossary)
        self.modification.currentTextChanged.connect(self._draw_worst)
        self.worst.barClicked.connect(lambda i: self.probeClicked.emit(self.worst.current.records[i]))

    def _glossary(self) -> None:
        from modeldoctor.gui.glossary import GlossaryDialog

        GlossaryDialog(self).show()

    def show_report(self, report) -> None:
        self.report = report
        ref = report.reference
        knowledge = report.reference_knowledge()
        threshold = report.findings.get("threshold", report.plan.get("threshold", 0.01))
        parts = [f"<p>{html.escape(str(report.model.get('name')))}: reference perplexity "
                 f"<b>{ref.get('ppl', float('nan')):.3f}</b> on {int(ref.get('tokens', 0))} tokens"
                 + (f", knowledge probes <b>{knowledge:.1%}</b>" if knowledge is not None else "")
                 + f". {len(report.probes)} probes, {report.status}. Figures on "
                 f"{html.escape(report.measured_on())}.</p>"]
        reading = kl_plain_reading(report, threshold)
        if reading:
            parts.append(f"<p>What the threshold means here: {html.escape(reading)}.</p>")
        for line in estimate_summary(report):
            parts.append(f"<p><i>{html.escape(line)}</i></p>")
        for finding in diagnose(report):
            color = SEVERITY_COLORS[finding.severity]
            parts.append(f"<h3 style='color:{color}'>{html.escape(finding.title)}</h3>"
                         f"<p>{html.escape(finding.text)}</p>")
            if finding.recommendation:
                parts.append(f"<p><i>Recommended treatment:</i> {html.escape(finding.recommendation)}</p>")
        self.text.setHtml("".join(parts))
        names = [n for n in report.modifications()
                 if any(p.spec.mode == "isolated" and p.spec.family != "decoding" and p.spec.modification == n
                        for p in report.probes)]
        self.modification.blockSignals(True)
        self.modification.clear()
        self.modification.addItems(names)
        self.modification.blockSignals(False)
        self.worst.set_threshold(threshold)
        self.curves.set_threshold(threshold)
        self._draw_worst(self.modification.currentText())
        self._draw_curves(report)
        self._draw_context(report, threshold)
        self.experts.set_threshold(threshold)
        self.tabs.setTabVisible(self.tabs.indexOf(self.experts), self.experts.show_report(report))

    def _draw_worst(self, name: str) -> None:
        bars = Bars()
        if self.report is not None and name:
            isolated = [p for p in self.report.probes if p.spec.modification == name and p.spec.mode == "isolated"]
            for record in sorted(isolated, key=lambda p: p.score, reverse=True)[:WORST_SHOWN]:
                bars.labels.append(record.spec.target)
                bars.values.append(record.score)
                bars.severities.append(record.severity if record.bleeding else "healthy")
                bars.records.append(record)
                bars.estimated.append(record.estimated)
        self.worst.setTitle(f"{name}: the worst layers, worst first" if name else
                            "No layer probes in this checkup.")
        self.worst.update_bars(bars, total=len(bars.values))

    def _draw_context(self, report, threshold: float) -> None:
        """KL by how much context each scored token had (the mean of each modification's layer
        probes), and the long-context probe's KL by sequence length."""
        import numpy as np

        # x on a log2 scale, each point's tick labelled in tokens.
        curves, ticks = {}, {}
        for name, curve in context_curves(report).items():
            x = np.log2([_bucket_middle(start) for start in curve["starts"]])
            ticks.update(zip(x, curve["labels"]))
            curves[f"{name} (mean of {curve['probes']} probes)"] = (x, np.asarray(curve["kl"], float))
        self.by_position.set_threshold(threshold)
        self.by_position.update_curves(curves, [])
        self.by_position.getAxis("bottom").setTicks([sorted(ticks.items())])
        if curves:
            self.by_position.setTitle("Layer probes: mean KL by position")
        context = report.context or {}
        lengths = context.get("lengths", [])
        x = np.log2(np.asarray(lengths, float)) if lengths else np.zeros(0)
        by_length = {name: (x, np.asarray(curve["kl"], float))
                     for name, curve in context.get("curves", {}).items() if lengths and len(curve["kl"]) == len(x)}
        self.by_length.set_threshold(threshold)
        self.by_length.update_curves(by_length, [])
        self.by_length.getAxis("bottom").setTicks([[(v, str(n)) for v, n in zip(x, lengths)]])
        for plot in (self.by_position, self.by_length):
            plot.enableAutoRange()
        note = f"Layer probes on {report.measured_on()}."
        if by_length:
            self.by_length.setTitle("Whole model: mean KL by sequence length")
            speed = ", ".join(f"{rate:.0f} at {n}" for n, rate in zip(lengths, context["tokens_per_s"]))
            note += (f" Long-context probe on {context['text']}; the original runs {speed} tokens/s"
                     + (f"; its length limit is {context['limit']} tokens." if context.get("limit") else "."))
        self.length_note.setText(note)

    def _draw_curves(self, report) -> None:
        sweeps = report.findings.get("sweeps", {})
        curves, marks = {}, []
        for group, curve in sweeps.items():
            curves[group] = (curve["strengths"], curve["scores"])
            if curve.get("knee") is not None:
                marks.append((curve["knee"], curve["scores"][curve["strengths"].index(curve["knee"])]))
        import numpy as np

        self.curves.update_curves({k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in curves.items()},
                                  marks)
