"""Step 3: what to probe. Defaults work untouched: int8 dynamic, int4, Wanda 50 %, block removal."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
    QPushButton, QRadioButton, QSpinBox, QVBoxLayout, QWidget,
)

from modeldoctor.checkup.context import DEFAULT_LENGTHS
from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.gui.pages.data import format_range
from modeldoctor.modifications.base import PRESETS

BITS = (8, 6, 4, 3, 2)
KV_FORMATS = {"int8 per token": "int8", "int4 per token": "int4", "int2 per token": "int2",
              "int8 per channel": "int8-channel", "int4 per channel": "int4-channel", "fp8 e4m3": "fp8"}
KV_PARTS = {"keys and values": "kv", "keys only": "k", "values only": "v"}
ROPE_METHODS = {"linear interpolation": "linear", "NTK-aware": "ntk", "YaRN": "yarn"}
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

        more = QGroupBox("Low rank, KV cache and context length")
        m = QGridLayout(more)
        self.svd_on = QCheckBox("low rank (SVD): keep")
        self.svd_percent = QSpinBox()
        self.svd_percent.setRange(1, 99)
        self.svd_percent.setValue(50)
        self.svd_percent.setSuffix(" % of the rank")
        self.svd_aware = QCheckBox("activation-aware")
        m.addWidget(self.svd_on, 0, 0)
        m.addWidget(self.svd_percent, 0, 1)
        m.addWidget(self.svd_aware, 0, 2)
        self.kv_on = QCheckBox("KV cache in")
        self.kv_format = QComboBox()
        self.kv_format.addItems(list(KV_FORMATS))
        self.kv_format.setCurrentIndex(1)
        self.kv_which = QComboBox()
        self.kv_which.addItems(list(KV_PARTS))
        m.addWidget(self.kv_on, 1, 0)
        m.addWidget(self.kv_format, 1, 1)
        m.addWidget(self.kv_which, 1, 2)
        self.rope_on = QCheckBox("RoPE scaling")
        self.rope_method = QComboBox()
        self.rope_method.addItems(list(ROPE_METHODS))
        self.rope_factor = QDoubleSpinBox()
        self.rope_factor.setRange(1.0, 64.0)
        self.rope_factor.setValue(2.0)
        self.rope_factor.setPrefix("× ")
        m.addWidget(self.rope_on, 2, 0)
        m.addWidget(self.rope_method, 2, 1)
        m.addWidget(self.rope_factor, 2, 2)
        self.long_context = QCheckBox("long-context probe: every modification on the whole model at 128 → 8192 "
                                      "tokens, as far as the text and the model's limit reach")
        m.addWidget(self.long_context, 3, 0, 1, 3)
        grid.addWidget(more, 2, 0, 1, 2)

        scan = QGroupBox("Scan")
        f = QFormLayout(scan)
        scope_row = QHBoxLayout()
        self.scope_blocks = QRadioButton("whole blocks")
        self.scope_linears = QRadioButton("individual linear layers")
        self.scope_experts = QRadioButton("experts (each router, expert, shared expert)")
        self.scope_experts.setVisible(False)  # for a mixture of experts: set_moe
        self.scope_blocks.setChecked(True)
        scope_row.addWidget(self.scope_blocks)
        scope_row.addWidget(self.scope_linears)
        scope_row.addWidget(self.scope_experts)
        f.addRow("Scope:", scope_row)
        modes_row = QHBoxLayout()
        self.isolated = QCheckBox("isolated (one at a time)")
        self.isolated.setChecked(True)
        self.cumulative = QCheckBox("cumulative (1..k)")
        self.sweep = QCheckBox("strength sweep (bits 8→2, sparsity 10→90 %, rank 90→10 %)")
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
        grid.addWidget(scan, 4, 0, 1, 2)

        self.moe = QGroupBox("Mixture of experts (routing)")
        m = QHBoxLayout(self.moe)
        self.router_noise_on, self.router_noise = QCheckBox("router noise ×"), QDoubleSpinBox()
        self.router_noise_on.setChecked(True)
        self.router_noise.setRange(0.05, 5.0)
        self.router_noise.setSingleStep(0.1)
        self.router_noise.setValue(0.5)
        self.topk_minus = QCheckBox("k−1 experts per token")
        self.topk_plus = QCheckBox("k+1")
        self.drop_least_used = QCheckBox("drop least-used expert")
        self.drop_least_used.setChecked(True)
        self.drop_each = QCheckBox("drop each expert")
        self.router_bits = QCheckBox("routers at int8, int4")
        for widget in (self.router_bits, self.router_noise_on, self.router_noise, self.topk_minus, self.topk_plus,
                       self.drop_least_used, self.drop_each):
            m.addWidget(widget)
        m.addStretch()
        self.moe.setVisible(False)
        grid.addWidget(self.moe, 3, 0, 1, 2)

        from modeldoctor.gui.glossary import tip

        for widget, term in ((self.int8_dynamic, "int8 dynamic"), (self.export_formats, "int8 b32"),
                             (self.larger_blocks, "larger blocks"),
                             (self.asym, "int4 g32 asym"),
                             (self.group, "int4 g32 asym"), (self.prune_kind, "Wanda"),
                             (self.isolated, "isolated"), (self.cumulative, "cumulative"), (self.sweep, "strength sweep"),
                             (self.threshold, "threshold")):
            widget.setToolTip(tip(term))
        for widget, term in ((self.svd_on, "low rank (SVD)"), (self.svd_aware, "low rank (SVD)"),
                             (self.kv_on, "KV cache"), (self.rope_on, "RoPE scaling"),
                             (self.long_context, "long-context probe")):
            widget.setToolTip(tip(term))
        for box in self.bits.values():
            box.setToolTip("Weight-only quantization to this many bits (round to nearest); the grouping and "
                           "asymmetry below apply.")
        self.exhaustive.setToolTip(tip("estimated / measured"))
        self.scope_blocks.setToolTip("Each probe modifies one whole block (attention and MLP): fast, finds the "
                                     "fragile depths.")
        self.scope_linears.setToolTip("Each probe modifies one linear layer: ranks single layers, which is what an "
                                      "export keeps in fp32.")
        self.scope_experts.setToolTip("Each probe modifies one expert (all its linears), one router or one shared "
                                      "expert: the modifications × experts heatmap of each MoE block.")
        self.router_noise_on.setToolTip("Gaussian noise on each router's logits, this many times each token's "
                                        "logit spread: how close the routing decisions are to ties.")
        self.topk_minus.setToolTip("One expert fewer per token in each MoE block in turn (saves compute).")
        self.topk_plus.setToolTip("One expert more per token in each MoE block in turn.")
        self.drop_least_used.setToolTip("Per MoE block, no token is routed to the expert that the calibration "
                                        "text used least.")
        self.drop_each.setToolTip("Each expert in turn gets no token (probed per expert).")
        self.router_bits.setToolTip("Each MoE block's router quantized alone (weight-only, per channel): routers "
                                    "are tiny, but a changed logit sends tokens to other experts.")
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
        if self.svd_on.isChecked():
            prefix = "svd-aw" if self.svd_aware.isChecked() else "svd"
            if sweep:  # the rank-sweep preset, plain or activation-aware
                names += [name.replace("svd-", prefix + "-", 1) for name in PRESETS["rank-sweep"]]
            else:
                names.append(f"{prefix}-r{self.svd_percent.value()}")
        if self.kv_on.isChecked():
            which = KV_PARTS[self.kv_which.currentText()]
            kind = KV_FORMATS[self.kv_format.currentText()]
            if sweep and kind != "fp8":
                names += [f"{which}-int{b}{'-channel' if kind.endswith('-channel') else ''}" for b in BITS]
            else:
                names.append(f"{which}-{kind}")
        if self.rope_on.isChecked():
            names.append(f"rope-{ROPE_METHODS[self.rope_method.currentText()]}-{self.rope_factor.value():g}")
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
        if self.has_moe:
            names += ["router-int8", "router-int4"] if self.router_bits.isChecked() else []
            names += [name for name, box in ((f"router-noise-{self.router_noise.value():g}", self.router_noise_on),
                                             ("topk-minus1", self.topk_minus), ("topk-plus1", self.topk_plus),
                                             ("drop-least-used", self.drop_least_used),
                                             ("drop-expert", self.drop_each)) if box.isChecked()]
        return list(dict.fromkeys(names))

    @property
    def has_moe(self) -> bool:
        return not self.moe.isHidden()

    def set_moe(self, present: bool) -> None:
        """Offer the experts scope and the routing probes for a mixture of experts only."""
        self.moe.setVisible(present)
        self.scope_experts.setVisible(present)
        if not present and self.scope_experts.isChecked():
            self.scope_blocks.setChecked(True)

    def plan(self) -> CheckupPlan:
        modes = tuple(m for m, box in (("isolated", self.isolated), ("cumulative", self.cumulative),
                                       ("sweep", self.sweep)) if box.isChecked())
        return CheckupPlan(modifications=self.modifications(),
                           scope="linears" if self.scope_linears.isChecked() else
                           "experts" if self.scope_experts.isChecked() else "blocks",
                           modes=modes, threshold=self.threshold.value(), exhaustive=self.exhaustive.isChecked(),
                           context_lengths=DEFAULT_LENGTHS if self.long_context.isChecked() else ())

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
