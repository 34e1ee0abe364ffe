"""The anatomy view: the model as its blocks and linears, coloured by the checkup, the export's
formats and the treatment; a click opens a probe or switches a linear's format (issue 12)."""

from PySide6.QtCore import QPoint, Qt

from modeldoctor.gui.dialogs import ProbeDetailsDialog
from modeldoctor.gui.viewmodel import ESTIMATED_ALPHA, FORMAT_COLORS, KEPT_FP32, verdict_color
from tests.gui.conftest import load, run_checkup


def _click(qtbot, view, name):
    rect = view.cell_rect(name)
    assert rect is not None, name
    qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=rect.center())


def test_checkup_colours_every_linear_and_a_click_opens_its_probe(qtbot, window, llama_dir, screenshots):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    plan = window.plan_page
    plan.scope_linears.setChecked(True)
    plan.int8_dynamic.setChecked(False)
    plan.prune_on.setChecked(False)
    plan.remove.setChecked(False)
    assert plan.modifications() == ["int4"]
    run_checkup(qtbot, window)
    page = window.run_page
    page.resize(1100, 700)
    page.redraw()
    view = page.anatomy
    names = window.state.session.anatomy.linear_names()
    assert view.layout_.blocks == [0, 1, 2] and len(view.layout_.columns) == len(names) // 3
    assert [part for part, _ in view.layout_.groups()] == ["self_attn", "mlp"]
    by_target = {p.spec.targets[0]: p for p in window.state.report.probes if p.spec.mode == "isolated"}
    for name in names + ["head"]:
        record = by_target[name]
        alpha = ESTIMATED_ALPHA if record.estimated else 255
        assert view.cells[name].color == (*verdict_color(record), alpha), name
        assert view.cells[name].record is record
    view.grab().save(str(screenshots / "tiny-anatomy-checkup.png"))
    _click(qtbot, view, names[4])
    dialogs = [d for d in window.findChildren(ProbeDetailsDialog) if d.isVisible()]
    assert dialogs and dialogs[-1].record.spec.targets == (names[4],)
    dialogs[-1].close()
    assert view.cell_at(QPoint(2, 2)) is None


def test_block_scope_colours_a_blocks_linears_by_its_probe(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(1)
    window.plan_page.int8_dynamic.setChecked(False)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.remove.setChecked(False)
    run_checkup(qtbot, window)
    window.run_page.redraw()
    cells = window.run_page.anatomy.cells
    block1 = [c for n, c in cells.items() if n.startswith("1.")]
    assert block1 and len({c.color for c in block1}) == 1 and all(c.record.spec.targets == ("1",) for c in block1)
    assert "its block's probe" in block1[0].text
    assert cells["head"].color is None and "does not probe it" in cells["head"].text


def test_export_anatomy_shows_each_linears_format_and_a_click_switches_it(qtbot, window, llama_dir, screenshots):
    load(qtbot, window, llama_dir)
    page = window.export_page
    window.go(6)
    page.resize(1100, 700)
    page.precisions["int8"].setChecked(True)
    view = page.anatomy
    name = window.state.session.anatomy.linear_names()[2]
    assert view.cells[name].color[:3] == FORMAT_COLORS["int8"] and name not in page.kept()
    before = page.prediction.text()
    _click(qtbot, view, name)
    assert name in page.kept() and view.cells[name].color[:3] == KEPT_FP32
    assert page.prediction.text() != before
    view.grab().save(str(screenshots / "tiny-anatomy-export.png"))
    _click(qtbot, view, name)
    assert name not in page.kept()
    page.precisions["int4"].setChecked(True)
    assert view.cells[name].color[:3] == FORMAT_COLORS["int4"]
