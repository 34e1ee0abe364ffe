"""The app on a tiny mixture of experts: the Plan page offers the experts scope and the routing
probes; the Diagnosis page draws the modifications x experts heatmap, the load per expert and
the flip rate per block from the report. Screenshots under build/screens/."""

import numpy as np

from modeldoctor.gui.viewmodel import SEVERITY_COLORS
from tests.gui.conftest import load, run_checkup


def test_experts_scope_heatmap_and_routing_plots(qtbot, window, moe_dirs, llama_dir, screenshots):
    plan_page = window.plan_page
    load(qtbot, window, llama_dir)  # a dense model: nothing of the kind offered
    assert plan_page.moe.isHidden() and plan_page.scope_experts.isHidden()
    assert not any(n.startswith(("router", "topk", "drop")) for n in plan_page.modifications())
    load(qtbot, window, moe_dirs["qwen2_moe"])
    assert not plan_page.moe.isHidden() and not plan_page.scope_experts.isHidden()
    window.data_page.slider.setValue(1)
    plan_page.int8_dynamic.setChecked(False)
    plan_page.prune_on.setChecked(False)
    plan_page.remove.setChecked(False)
    plan_page.bits[2].setChecked(True)
    plan_page.drop_each.setChecked(True)
    plan_page.router_bits.setChecked(True)
    plan_page.exhaustive.setChecked(True)
    plan_page.scope_experts.setChecked(True)
    assert plan_page.modifications() == ["int4", "int2", "router-int8", "router-int4", "router-noise-0.5",
                                         "drop-least-used", "drop-expert"]
    assert plan_page.plan().scope == "experts"
    window.go(2)
    window.resize(1280, 720)
    qtbot.waitUntil(lambda: window.size().width() == 1280, timeout=5000)
    scroll = window.pages.currentWidget()  # the form fits a 1280x720 screen with its MoE row, never sideways
    assert plan_page.minimumSizeHint().width() <= scroll.viewport().width()
    qtbot.wait(100)  # the vertical scroll bar's relayout
    assert plan_page.start.geometry().right() <= plan_page.width()
    plan_page.grab().save(str(screenshots / "moe-plan.png"))
    run_checkup(qtbot, window)
    report = window.state.report
    assert report.status == "completed"
    run_page = window.run_page  # the live heatmap: blocks x experts of the modification shown
    run_page.modification.setCurrentText("int2")
    run_page.redraw()
    assert run_page.heatmap.cells.rows == ["0", "1", "2"]
    assert run_page.heatmap.cells.cols == ["mlp.gate", "mlp.experts.0", "mlp.experts.1", "mlp.experts.2",
                                           "mlp.experts.3", "mlp.shared_expert"]
    run_page.right_tabs.setCurrentWidget(run_page.heatmap)
    run_page.grab().save(str(screenshots / "moe-run.png"))
    run_page.right_tabs.setCurrentIndex(0)
    run_page.redraw()
    from modeldoctor.gui.viewmodel import AnatomyLayout, checkup_cells

    anatomy = window.state.session.anatomy
    cells = checkup_cells(AnatomyLayout.from_names(anatomy.linear_names()), run_page.model.records, "int2")
    expert = next(r for r in report.probes if r.spec.modification == "int2" and r.spec.targets == ("1.mlp.experts.2",))
    for linear in anatomy.expert_linears("1.mlp.experts.2"):  # each linear of an expert drawn in its expert's verdict
        assert cells[linear].record is expert and "the probe of 1.mlp.experts.2" in cells[linear].text
    run_page.grab().save(str(screenshots / "moe-run-anatomy.png"))
    window.go(4)
    page = window.diagnosis_page
    assert page.tabs.isTabVisible(page.tabs.indexOf(page.experts))
    page.tabs.setCurrentWidget(page.experts)
    panel = page.experts
    text = page.text.toPlainText()
    assert "Routing changes" in text
    # The heatmap of block 1: one row per expert-scope modification, one column per router/expert/shared.
    panel.block.setCurrentIndex(1)
    cells = panel.heatmap.cells
    assert cells.rows == ["int4", "int2", "drop-expert"]
    assert cells.cols == ["router", "e0", "e1", "e2", "e3", "shared"]
    for (row, col), record in cells.records.items():
        assert record.spec.targets[0].startswith("1.") and record.spec.modification == cells.rows[row]
        assert tuple(cells.colors[row, col][:3]) == SEVERITY_COLORS[record.severity if record.bleeding else "healthy"]
    assert (0, 0) in cells.records and (2, 0) not in cells.records  # the router is quantized, never dropped
    # The load chart of the chosen probe: the report's loads, original and modified, bar for bar.
    chosen = next(i for i in range(panel.probe.count()) if panel.probe.itemText(i).startswith("drop-expert @ 1."))
    panel.probe.setCurrentIndex(chosen)
    record = panel._routed[chosen]
    at = record.routing["blocks"].index(1)
    np.testing.assert_allclose(panel.load_original.opts["height"], 100 * np.asarray(record.routing["load_original"][at]))
    np.testing.assert_allclose(panel.load_modified.opts["height"], 100 * np.asarray(record.routing["load_modified"][at]))
    dropped = int(record.spec.targets[0].rsplit(".", 1)[1])
    assert panel.load_modified.opts["height"][dropped] == 0 < panel.load_original.opts["height"][dropped]
    np.testing.assert_allclose(panel.flip_bars.opts["height"], 100 * np.asarray(record.routing["flip_rate"]))
    assert panel.flip_bars.opts["height"][0] == 0 < panel.flip_bars.opts["height"][1]
    window.resize(1280, 720)
    qtbot.wait(50)
    assert panel.flips.geometry().right() <= panel.width()  # nothing cut off at the right
    page.grab().save(str(screenshots / "moe-diagnosis-experts.png"))
    page.tabs.setCurrentIndex(0)
    page.grab().save(str(screenshots / "moe-diagnosis-findings.png"))
    # The HTML report carries the experts' usage, the re-routing probes and the plots.
    from modeldoctor.report.html import render_html

    images = window.report_images()
    assert any(name.startswith("Block 1: modifications × experts") for name in images)
    assert any(name.startswith("Routing flip rate per block") for name in images)
    page_html = render_html(report, images)
    assert "<h2>Experts</h2>" in page_html and "flip rate" in page_html
