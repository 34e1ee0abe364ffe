"""The Export page offers the checkup that predicts its format when the current one does not."""

import pytest

from modeldoctor.gui.pages.export import FORMAT_ROLE
from tests.gui.conftest import load, run_checkup


def test_export_page_runs_the_missing_format_checkup(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(1)
    window.plan_page.int8_dynamic.setChecked(False)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.remove.setChecked(False)
    assert window.plan_page.modifications() == ["int4"]  # per channel: not what the int4 export writes
    run_checkup(qtbot, window)
    page = window.export_page
    window.go(6)
    page.precisions["int4"].setChecked(True)
    assert page.run_checkup.isVisible() and "int4-b32" in page.run_checkup.text()
    assert "int4-b32" in page.keep_note.text() and not page.kept()
    assert "head" in page.linears  # the LM head can be kept in fp32 like any linear
    page.precisions["int8"].setChecked(True)
    assert "int8-b32" in page.run_checkup.text()
    page.precisions["int4"].setChecked(True)

    previous = window.state.report
    page.run_checkup.click()
    qtbot.waitUntil(lambda: window.state.report is not None and window.state.report is not previous
                    and not window.runner.busy, timeout=120000)
    plan = window.state.report.plan
    assert plan["modifications"] == ["int4-b32"] and plan["scope"] == "linears"
    window.go(6)
    assert not page.run_checkup.isVisible()
    assert "head" in page.predicted and len(page.predicted) == len(window.state.session.anatomy.linear_targets())

    # The size-vs-KL tab: the greedy mix at every size, from all int4 to all fp32, KL falling as
    # the file grows; the chosen formats sit on it or below, and the size budget moves along it.
    import numpy as np

    from modeldoctor.export.pipeline import predicted_size

    assert not page.table.isVisibleTo(page) and page.chart_tabs.isVisibleTo(page)  # no result yet: the charts have the room
    sizes, kls = (np.asarray(a, dtype=float) for a in page.curve.getData())
    assert len(sizes) > 10 and np.all(np.diff(sizes) > 0) and np.all(np.diff(kls) <= 1e-9)
    session = window.state.session
    page.size_fit.setChecked(True)
    fp32_mib = session.summary.parameters * 4 / 2**20
    low, high = int(np.ceil(100 * sizes[0] / fp32_mib)) + 1, int(100 * sizes[-1] / fp32_mib) - 1
    assert low < high
    for percent in (low, (low + high) // 2):
        page.size_slider.setValue(percent)
        written = predicted_size(session, page.formats()).bytes
        assert written <= session.summary.parameters * 4 * percent / 100
        (x,), (y,) = page.chosen_point.getData()
        assert x == pytest.approx(written / 2**20) and page.size_line.value() == pytest.approx(
            session.summary.parameters * 4 * percent / 100 / 2**20, rel=1e-4)
        # The budget's mix is the curve's last point within it, or better (a move too large for
        # what is left gives way to a smaller one of the same linear that fits).
        within = np.flatnonzero(sizes <= x + 1e-12)[-1]
        assert y <= kls[within] + 1e-9 and x >= sizes[within] - 1e-12


def test_export_page_says_what_it_will_write_and_shows_progress(qtbot, window, llama_dir, tmp_path, screenshots):
    """Issue 12 bug 7: a block-scope checkup raises whole blocks (no longer silently), the size and
    KL are predicted before writing, the export shows its progress, the result table explains itself."""
    from modeldoctor.events import Progress

    window.resize(1280, 720)  # the page scrolls at this size: its progress bar starts below the fold
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    window.plan_page.bits[4].setChecked(False)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.remove.setChecked(False)
    window.plan_page.threshold.setValue(0.0001)  # every block bleeds: every linear kept whole
    run_checkup(qtbot, window)
    page = window.export_page
    window.go(6)
    page.precisions["int8-dynamic"].setChecked(True)
    assert "probed whole blocks" in page.keep_note.text()
    assert page.run_checkup.isVisible() and "linear-scope checkup of int8-dynamic" in page.run_checkup.text()
    before = page.prediction.text()
    assert "Before exporting" in before and "% of fp32" in before and "predicted mean KL" in before
    item = page.keep.item(0)
    was = item.data(FORMAT_ROLE)
    page.keep.itemActivated.emit(item)  # Enter or a double-click moves it one format up
    assert item.data(FORMAT_ROLE) != was and f": {item.data(FORMAT_ROLE)}" in item.text()
    assert page.prediction.text() != before, "the prediction follows the formats"
    progress = []
    window.runner.event.connect(lambda e: progress.append(e) if isinstance(e, Progress) else None)
    page.folder.setText(str(tmp_path / "onnx"))
    page.budget.setValue(5.0)
    page.start.click()
    assert not page.progress.visibleRegion().isEmpty(), "the running export's progress is scrolled into view"
    assert not page.keep.isEnabled() and not page.budget.isEnabled() and page.cancel.isEnabled()
    assert "Exporting int8" in window.statusBar().currentMessage()
    qtbot.waitUntil(lambda: not window.runner.busy and page.table.rowCount() > 0, timeout=180000)
    assert page.table.isVisibleTo(page)
    assert [e.stage for e in progress] == ["export", "simulate", "quantize", "validate"]
    assert progress[-1].eta_s is not None
    rows = {page.table.item(r, 0).text(): page.table.item(r, 1).text() for r in range(page.table.rowCount())}
    assert "predicted" in rows["size on disk"]
    assert float(rows["simulated mean KL"].split()[0]) == pytest.approx(page.last_result.validation["kl_mean"], rel=0.05)
    assert page.table_note.isVisible() and "identical" in page.table_note.text()
    assert page.progress.text() == "passed" or page.progress.format() == "passed"
    assert page.chart.getPlotItem().getAxis("bottom").labelText.startswith("block, as the checkup probed them")
    assert len(page.bars.opts["x"]) == window.state.session.anatomy.num_blocks
    assert len(page.chart.getPlotItem().legend.items) == 5
    page.grab().save(str(screenshots / "tiny-export-done.png"))


def test_export_page_mixes_the_block_sizes_a_checkup_measured(qtbot, window, llama_dir, screenshots):
    """Blocks of 64 and 128 join the formats once a checkup measured them: the page offers that
    checkup, then its ladder, list, anatomy and legend carry them."""
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec

    load(qtbot, window, llama_dir)
    session, page = window.state.session, window.export_page
    window.go(6)
    page.resize(1100, 700)
    page.precisions["int4"].setChecked(True)
    data = session.data(DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False))

    def linear_checkup(modifications):
        return checkup(session, CheckupPlan(modifications=modifications, scope="linears", knowledge=False,
                                            exhaustive=True, threshold=1e-3), data)

    page.set_context(session, linear_checkup(["int4-b32", "int8-b32"]))
    assert page.ladder() == ["int4", "int8", "fp32"]
    assert page.block_checkup.isVisible()
    every_block = page.block_checkup.property("modification").split(",")
    assert sorted(every_block) == ["int4-b128", "int4-b32", "int8-b128", "int8-b32", "int8-b64"]
    page.set_context(session, linear_checkup(every_block))
    assert not page.block_checkup.isVisible()
    assert page.ladder() == ["int4-b128", "int4", "int8-b128", "int8-b64", "int8", "fp32"]
    formats = page.formats()
    # The 64-wide down projections fill blocks of 64 (int8-b64 is their smallest 8-bit format); the
    # 32-wide linears are smallest in blocks of 32 (a block of 128 would pad them to 4×).
    name = "0.mlp.down_proj"
    down, up = page.linear_ladder(name), page.linear_ladder("0.mlp.up_proj")
    assert down[0] == up[0] == "int4" and down[-1] == up[-1] == "fp32"
    assert down.index("int8-b64") < down.index("int8") and up.index("int8") < up.index("int8-b64")
    assert all(f == "fp32" or page.linear_ladder(n).index(f) >= 0 for n, f in formats.items())
    seen = []
    for _ in page.linear_ladder(name):  # a click moves a linear one format up; fp32 wraps round
        page.toggle_keep(name)
        seen.append(page.formats()[name])
    ladder = page.linear_ladder(name)
    assert seen == ladder[ladder.index(formats[name]) + 1:] + ladder[:ladder.index(formats[name]) + 1]
    assert "purple: int4" in page.anatomy.legend
    qtbot.wait(50)  # the wrapped labels settle their heights
    page.grab().save(str(screenshots / "tiny-export-block-sizes.png"))
