"""A state-space or hybrid model in the app: the model card says what its blocks are, the Plan
page says before the run which chosen modifications do not apply and why, the anatomy view
draws a hybrid's Mamba and attention blocks with the linears each has, and the Export page says
up front that it cannot export it."""

import pytest
from PySide6.QtWidgets import QLabel

from tests.gui.conftest import load, run_checkup
from tiny_models import save_model


@pytest.fixture(scope="module")
def ssm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssm_gui_models")
    return {family: save_model(family, root / family) for family in ("mamba", "bamba")}


def _card_text(window) -> str:
    return " ".join(label.text() for label in window.load_page.findChildren(QLabel))


def test_plan_page_says_which_modifications_do_not_apply_and_why(qtbot, window, ssm_dirs, screenshots):
    load(qtbot, window, ssm_dirs["mamba"])
    assert "3 state-space (Mamba) blocks, no attention" in _card_text(window)
    window.load_page.resize(1100, 700)
    window.load_page.grab().save(str(screenshots / "ssm-load-card.png"))
    window.steps.setCurrentRow(2)
    plan = window.plan_page
    plan.prune_kind.setCurrentText("Attention heads")
    assert "prune-heads-50" in plan.modifications()
    notes = plan.notes.text()
    assert plan.notes.isVisible()
    assert ("prune-heads-50 does not apply to the state-space (Mamba) blocks 0, 1, 2 (all of them): they have no "
            "attention heads.") in notes
    assert "Attention disruption is not available" in notes
    assert plan.start.isEnabled()  # the other modifications still run
    plan.resize(1100, 760)
    plan.grab().save(str(screenshots / "ssm-plan-notes.png"))
    plan.prune_kind.setCurrentText("Wanda (|W|·‖x‖)")
    assert "prune-heads" not in plan.notes.text()


def test_hybrid_checkup_anatomy_and_export_refusal(qtbot, window, ssm_dirs, screenshots):
    load(qtbot, window, ssm_dirs["bamba"])
    assert "4, hybrid: 2 attention + 2 state-space (Mamba) blocks" in _card_text(window)
    window.data_page.slider.setValue(2)
    plan = window.plan_page
    plan.prune_kind.setCurrentText("Attention heads")
    assert "the state-space (Mamba) blocks 0, 2: they have no attention heads" in plan.notes.text()
    plan.scope_linears.setChecked(True)
    plan.int8_dynamic.setChecked(False)
    plan.remove.setChecked(False)
    assert plan.modifications() == ["int4", "prune-heads-50"]
    run_checkup(qtbot, window)
    heads = [p for p in window.state.report.probes if p.spec.modification == "prune-heads-50"]
    assert [p.spec.targets for p in heads] == [("1",), ("3",)]
    page = window.run_page
    page.resize(1100, 700)
    page.redraw()
    page.grab().save(str(screenshots / "ssm-hybrid-run.png"))
    window.steps.setCurrentRow(4)
    diagnosis = window.diagnosis_page
    diagnosis.resize(1100, 700)
    findings = diagnosis.text.toPlainText()
    assert "Notes on the plan for this model" in findings
    assert "prune-heads-50 does not apply to the state-space (Mamba) blocks 0, 2" in findings
    diagnosis.grab().save(str(screenshots / "ssm-hybrid-diagnosis.png"))
    page.modification.setCurrentText("int4")
    page.redraw()
    view = page.anatomy
    assert [part for part, _ in view.layout_.groups()] == ["mamba", "self_attn", "feed_forward"]
    # Each block draws only the linears it has: block 0 (Mamba) has no q_proj, block 1 no in_proj.
    assert view.cell_rect("0.mamba.in_proj") is not None and view.cell_rect("0.self_attn.q_proj") is None
    assert view.cell_rect("1.self_attn.q_proj") is not None and view.cell_rect("1.mamba.in_proj") is None
    names = window.state.session.anatomy.linear_names()
    assert all(view.cells[n].color is not None for n in names)
    view.grab().save(str(screenshots / "ssm-hybrid-anatomy.png"))

    window.steps.setCurrentRow(6)
    export = window.export_page
    assert not export.start.isEnabled()
    assert "ONNX export is not available for a hybrid attention + state-space model" in export.prediction.text()
    assert not export.run_checkup.isVisible() and not export.block_checkup.isVisible()
    export.resize(1100, 700)
    export.grab().save(str(screenshots / "ssm-export-refused.png"))


def test_probe_details_show_no_attention_where_a_hybrid_has_none(qtbot, ssm_dirs, screenshots):
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.gui.dialogs import ProbeDetailsDialog
    from modeldoctor.session import Session

    session = Session.open(ssm_dirs["bamba"])
    spec = DataSpec(tokens=128, seq_len=64, calibration_tokens=128, selection_tokens=128, batch_size=2)
    report = checkup(session, CheckupPlan(modifications=["remove"], targets=["0"], knowledge=False),
                     session.data(spec))
    dialog = ProbeDetailsDialog(report.probes[0])
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.tabs.setCurrentIndex([dialog.tabs.tabText(i) for i in range(dialog.tabs.count())].index("Attention"))
    plot = dialog.tabs.currentWidget()
    assert plot.plotItem.titleLabel.text == "no attention map in blocks 0, 2 (removed, or without attention)"
    dialog.grab().save(str(screenshots / "ssm-hybrid-probe-attention.png"))
    ticks = [value for value, _ in plot.getAxis("bottom")._tickLevels[0]]
    assert ticks == [0, 1, 2, 3]  # whole blocks only, not 0.5, 1.5, ...
