"""Step 3: what to probe. Defaults work untouched: int8 dynamic, int4, Wanda 50 %, block removal."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
    QPushButton, QRadioButton, QSpinBox, QVBoxLayout, QWidget,
)

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.gui.pages.data import format_range

BITS = (8, 6, 4, 3, 2)
PRUNE_KINDS = {"Wanda (|W|·‖x‖)": "wanda", "Magnitude": "mag", "2:4 semi-structured": "2of4",
               "Attention heads": "heads", "MLP channels": "channels"}


class PlanPage(QWidget):
    changed = Signal()
    startRequested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        intro = QLabel("<h2>Plan the checkup</h2>Choose the deployment modifications to try. Each is applied to "
                       "one layer at a time, measured against the original, and undone exactly. The defaults work "
                       "untouched; hover over any option for what it means. <b>Next:</b> Start checkup.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        grid = QGridLayout()
        layout.addLayout(grid)

        quant = QGroupBox("Quantization")
        q = QVBoxLayout(quant)
        self.int8_dynamic = QCheckBox("int8 dynamic (what onnxruntime's quantize_dynamic does)")
        self.int8_dynamic.setChecked(True)
        q.addWidget(self.int8_dynamic)
        self.export_formats = QCheckBox("int8 and int4 as the export writes them (int8-b32, int4-b32)")
        q.addWidget(self.export_formats)
        self.larger_blocks = QCheckBox("… and in larger blocks (int8-b64, int8-b128, int4-b128): smaller files")
        self.larger_blocks.setEnabled(False)
        self.export_formats.toggled.connect(self.larger_blocks.setEnabled)
        q.addWidget(self.larger_blocks)
        bits_row = QHBoxLayout()
        bits_row.addWidget(QLabel("Weight-only bits:"))
        self.bits = {b: QCheckBox(f"{b}") for b in BITS}
        for b, box in self.bits.items():
            box.setChecked(b == 4)
            bits_row.addWidget(box)
        q.addLayout(bits_row)
        group_row = QHBoxLayout()
        group_row.addWidget(QLabel("Grouping:"))
        self.group = QComboBox()
        self.group.addItems(["per channel", "groups of 32", "groups of 64", "groups of 128"])
        self.asym = QCheckBox("asymmetric")
        group_row.addWidget(self.group)
        group_row.addWidget(self.asym)
        group_row.addStretch()
        q.addLayout(group_row)
        grid.addWidget(quant, 0, 0)

        prune = QGroupBox("Pruning")
        p = QFormLayout(prune)
        self.prune_on = QCheckBox("prune")
        self.prune_on.setChecked(True)
        self.prune_kind = QComboBox()
        self.prune_kind.addItems(list(PRUNE_KINDS))
        self.sparsity = QSpinBox()
        self.sparsity.setRange(5, 95)
        self.sparsity.setSingleStep(5)
        self.sparsity.setValue(50)
        self.sparsity.setSuffix(" %")
        p.addRow(self.prune_on)
        p.addRow("Kind:", self.prune_kind)
        p.addRow("Sparsity:", self.sparsity)
        grid.addWidget(prune, 0, 1)

        structure = QGroupBox("Structure")
        s = QVBoxLayout(structure)
        self.remove = QCheckBox("remove a block (skip it)")
        self.remove.setChecked(True)
        self.duplicate = QCheckBox("duplicate a block (layer expansion)")
        s.addWidget(self.remove)
        s.addWidget(self.duplicate)
        grid.addWidget(structure, 1, 0)

        decoding = QGroupBox("Decoding (compared with greedy)")
        d = QFormLayout(decoding)
        self.temperature_on, self.temperature = QCheckBox("temperature"), QDoubleSpinBox()
        self.temperature.setRange(0.1, 3.0)
        self.temperature.setValue(0.7)
        self.top_k_on, self.top_k = QCheckBox("top-k"), QSpinBox()
        self.top_k.setRange(1, 1000)
        self.top_k.setValue(40)
        self.top_p_on, self.top_p = QCheckBox("top-p"), QDoubleSpinBox()
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(0.9)
        self.repetition_on, self.repetition = QCheckBox("repetition penalty"), QDoubleSpinBox()
        self.repetition.setRange(1.0, 3.0)
        self.repetition.setSingleStep(0.1)
        self.repetition.setValue(1.3)
        self.beam_on, self.beam = QCheckBox("beam search"), QSpinBox()
        self.beam.setRange(2, 8)
        self.beam.setValue(4)
        for box, spin in ((self.temperature_on, self.temperature), (self.top_k_on, self.top_k),
                          (self.top_p_on, self.top_p), (self.repetition_on, self.repetition),
                          (self.beam_on, self.beam)):
            d.addRow(box, spin)
        grid.addWidget(decoding, 1, 1)

        scan = QGroupBox("Scan")
        f = QFormLayout(scan)
        scope_row = QHBoxLayout()
        self.scope_blocks = QRadioButton("whole blocks")
        self.scope_linears = QRadioButton("individual linear layers")
        self.scope_blocks.setChecked(True)
        scope_row.addWidget(self.scope_blocks)
        scope_row.addWidget(self.scope_linears)
        f.addRow("Scope:", scope_row)
        modes_row = QHBoxLayout()
        self.isolated = QCheckBox("isolated (one at a time)")
        self.isolated.setChecked(True)
        self.cumulative = QCheckBox("cumulative (1..k)")
        self.sweep = QCheckBox("strength sweep (bits 8→2, sparsity 10→90 %)")
        for box in (self.isolated, self.cumulative, self.sweep):
            modes_row.addWidget(box)
        f.addRow("Modes:", modes_row)
        self.threshold = QDoubleSpinBox()
        self.threshold.setDecimals(4)
        self.threshold.setRange(0.0001, 10.0)
        self.threshold.setSingleStep(0.005)
        self.threshold.setValue(0.01)
        self.threshold.setSuffix(" nats")
        f.addRow("Bleeding above mean KL:", self.threshold)
        self.exhaustive = QCheckBox("measure every probe exactly (slower)")
        self.exhaustive.setToolTip(
            "Off: quantization probes are first estimated all at once from one backward pass, then the highest "
            "estimates of each modification and a few at random are measured exactly. On: every probe is "
            "measured exactly.")
        f.addRow("Exactness:", self.exhaustive)
        grid.addWidget(scan, 2, 0, 1, 2)

        from modeldoctor.gui.glossary import tip

        for widget, term in ((self.int8_dynamic, "int8 dynamic"), (self.export_formats, "int8 b32"),
                             (self.larger_blocks, "larger blocks"),
                             (self.asym, "int4 g32 asym"),
                             (self.group, "int4 g32 asym"), (self.prune_kind, "Wanda"),
                             (self.isolated, "isolated"), (self.cumulative, "cumulative"), (self.sweep, "strength sweep"),
                             (self.threshold, "threshold")):
            widget.setToolTip(tip(term))
        for box in self.bits.values():
            box.setToolTip("Weight-only quantization to this many bits (round to nearest); the grouping and "
                           "asymmetry below apply.")
        self.exhaustive.setToolTip(tip("estimated / measured"))
        self.scope_blocks.setToolTip("Each probe modifies one whole block (attention and MLP): fast, finds the "
                                     "fragile depths.")
        self.scope_linears.setToolTip("Each probe modifies one linear layer: ranks single layers, which is what an "
                                      "export keeps in fp32.")
        # What the chosen modifications leave out on this model, and why (head pruning on a
        # state-space block, a linear-scope plan probing structure per block), before the run.
        self.notes = QLabel()
        self.notes.setWordWrap(True)
        self.notes.hide()
        layout.addWidget(self.notes)
        bottom = QHBoxLayout()
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.start = QPushButton("Start checkup")
        self.start.setDefault(True)
        self.start.setMinimumHeight(36)
        bottom.addWidget(self.summary, 1)
        bottom.addWidget(self.start)
        layout.addLayout(bottom)
        layout.addStretch()
        self.start.clicked.connect(self.startRequested)
        for kind in (QCheckBox, QRadioButton):
            for widget in self.findChildren(kind):
                widget.toggled.connect(self.changed)
        for kind in (QSpinBox, QDoubleSpinBox):
            for widget in self.findChildren(kind):
                widget.valueChanged.connect(self.changed)
        for widget in self.findChildren(QComboBox):
            widget.currentIndexChanged.connect(self.changed)

    def modifications(self) -> list[str]:
        names = []
        if self.int8_dynamic.isChecked():
            names.append("int8-dynamic")
        if self.export_formats.isChecked():
            names += ["int8-b32", "int4-b32"] + (["int8-b64", "int8-b128", "int4-b128"]
                                                 if self.larger_blocks.isChecked() else [])
        group = ["", "-g32", "-g64", "-g128"][self.group.currentIndex()]
        asym = "-asym" if self.asym.isChecked() else ""
        sweep = self.sweep.isChecked()
        for bits, box in self.bits.items():
            if box.isChecked() or (sweep and any(b.isChecked() for b in self.bits.values())):
                names.append(f"int{bits}{group}{asym}")
        if self.prune_on.isChecked():
            kind = PRUNE_KINDS[self.prune_kind.currentText()]
            if kind == "2of4":
                names.append("prune-2of4")
            elif sweep and kind in ("mag", "wanda"):
                names += [f"prune-{kind}-{p}" for p in (10, 30, 50, 70, 90)]
            else:
                names.append(f"prune-{kind}-{self.sparsity.value()}")
        if self.remove.isChecked():
            names.append("remove")
        if self.duplicate.isChecked():
            names.append("duplicate")
        if self.temperature_on.isChecked():
            names.append(f"decode-temp-{self.temperature.value():g}")
        if self.top_k_on.isChecked():
            names.append(f"decode-topk-{self.top_k.value()}")
        if self.top_p_on.isChecked():
            names.append(f"decode-topp-{self.top_p.value():g}")
        if self.repetition_on.isChecked():
            names.append(f"decode-rep-{self.repetition.value():g}")
        if self.beam_on.isChecked():
            names.append(f"decode-beam-{self.beam.value()}")
        return list(dict.fromkeys(names))

    def plan(self) -> CheckupPlan:
        modes = tuple(m for m, box in (("isolated", self.isolated), ("cumulative", self.cumulative),
                                       ("sweep", self.sweep)) if box.isChecked())
        return CheckupPlan(modifications=self.modifications(),
                           scope="linears" if self.scope_linears.isChecked() else "blocks",
                           modes=modes, threshold=self.threshold.value(), exhaustive=self.exhaustive.isChecked())

    def show_summary(self, probes: int | None, duration=None, problem: str = "",
                     measured: int | None = None, notes: list[str] = ()) -> None:
        self.notes.setText("<b>Notes on this plan for this model:</b><br>" + "<br>".join(html.escape(n) for n in notes))
        self.notes.setVisible(bool(notes) and not problem)
        if problem:
            self.summary.setText(f"<span style='color:#c8373b'>{problem}</span>")
            self.start.setEnabled(False)
            return
        self.start.setEnabled(True)
        text = f"{probes} probes"
        if measured is not None and measured < probes:
            text += (f", {probes - measured} of them estimated first and at least {measured} measured exactly "
                     "(more if many estimates come near the threshold)")
        if duration is not None:
            text += f", {format_range(duration.low, duration.high)} on this computer (estimated from a timed pass)"
        self.summary.setText(text + ".")
