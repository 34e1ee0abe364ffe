"""The Export page offers the checkup that predicts its format when the current one does not."""

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
    assert page.run_checkup.isVisible() and "int4-g32-asym" in page.run_checkup.text()
    assert "int4-g32-asym" in page.keep_note.text() and not page.kept()
    assert "head" in page.linears  # the LM head can be kept in fp32 like any linear
    page.precisions["int8"].setChecked(True)
    assert "int8-dynamic" in page.run_checkup.text()
    page.precisions["int4"].setChecked(True)

    previous = window.state.report
    page.run_checkup.click()
    qtbot.waitUntil(lambda: window.state.report is not None and window.state.report is not previous
                    and not window.runner.busy, timeout=120000)
    plan = window.state.report.plan
    assert plan["modifications"] == ["int4-g32-asym"] and plan["scope"] == "linears"
    window.go(6)
    assert not page.run_checkup.isVisible()
    assert "head" in page.predicted and len(page.predicted) == len(window.state.session.anatomy.linear_targets())
