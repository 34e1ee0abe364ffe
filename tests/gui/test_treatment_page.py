"""The Treatment page: recommendations, a run with before/after bars, cancel, save, reset, export hand-over."""

import numpy as np
from PySide6.QtCore import Qt

from tests.gui.conftest import load, run_checkup


def _small_data(window):
    window.data_page.slider.setValue(2)  # 256 tokens


def test_recommendation_then_treat_draws_before_and_after(qtbot, window, llama_dir, screenshots):
    load(qtbot, window, llama_dir)
    _small_data(window)
    assert window.steps.item(5).flags() & Qt.ItemFlag.ItemIsEnabled  # treat without a checkup too
    window.plan_page.bits[4].setChecked(True)
    window.plan_page.prune_on.setChecked(False)
    window.plan_page.remove.setChecked(False)
    window.plan_page.threshold.setValue(0.0005)
    run_checkup(qtbot, window)
    page = window.treatment_page
    assert page.recommendations, "the diagnosis recommends treatments"
    assert "→" in page.advice.text()
    first = page.recommendations[0]
    assert page.plan().target == first.target and set(page.plan().treatments) <= set(first.treatments)
    # Keep the run short: mixed precision only, on the recommended deployment.
    for name, box in page.checks.items():
        box.setChecked(name == "mixed-precision")
    page.budget.setValue(30)
    window.go(5)
    page.start.click()
    qtbot.waitUntil(lambda: not window.runner.busy and bool(page.outcomes), timeout=120000)
    outcome = page.outcomes[0]
    blocks = window.state.session.anatomy.num_blocks
    before_x, after_x = (np.asarray(bars.opts["x"], dtype=float) for bars in (page.before_bars, page.after_bars))
    assert len(before_x) == len(after_x) == blocks
    # Each layer's pair stands side by side (before left, after right) without overlapping, inside
    # its own slot on the layer axis.
    width, slots = page.before_bars.opts["width"], np.arange(blocks)
    assert np.all(after_x - before_x >= width - 1e-9)
    assert np.all(before_x - width / 2 >= slots - 0.5 - 1e-9) and np.all(after_x + width / 2 <= slots + 0.5 + 1e-9)
    # Heights read back through the chart's own KL axis are the outcome's per-layer figures.
    axis = page.chart.getAxis("left")
    at0, at1 = (float(axis.tickStrings([v], 1.0, 1.0)[0]) for v in (0.0, 1.0))
    for bars, values in ((page.before_bars, outcome.layers["before"]), (page.after_bars, outcome.layers["after"])):
        heights = np.asarray(bars.opts["height"], dtype=float)
        np.testing.assert_allclose(at0 * (at1 / at0) ** heights, np.maximum(values, at0), rtol=1e-6)
    assert page.figures.rowCount() >= 3 and page.figures.item(0, 0).text() == "mean KL"
    assert page.verdict.text()
    assert page.eta.text() == "completed"
    # The anatomy view: every linear of a block in its block's colour after; kept linears outlined.
    cells = page.anatomy.cells
    assert all(cells[f"{b}.{c}"].color is not None for b in range(blocks) for c in page.anatomy.layout_.columns)
    kept = set(window.state.session.treatment.keep)
    assert {n for n, c in cells.items() if c.outlined} == {n for n in kept if n in cells}
    if outcome.applied:
        assert "kept in fp32" in page.state.text() and kept
        window.go(6)
        assert sorted(window.export_page.kept()) == sorted(window.state.session.treatment.keep)
    page.grab().save(str(screenshots / "tiny-treatment.png"))


def test_cancel_treatment_restores_the_model(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    _small_data(window)
    before = window.state.session.weights_digest()
    page = window.treatment_page
    page.set_target("none")
    for name, box in page.checks.items():
        box.setChecked(name == "prune-grad")
    page.start.click()
    qtbot.waitUntil(lambda: page.progress.value() >= 2, timeout=60000)
    page.cancel.click()
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    assert page.eta.text() == "cancelled"
    assert window.state.session.weights_digest() == before
    assert not window.state.session.treatment.treated


def test_disabled_treatments_say_why(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    page = window.treatment_page
    page.set_target("int8-dynamic")
    assert page.checks["smoothquant"].isEnabled() and not page.checks["awq"].isEnabled()
    assert "SmoothQuant" in page.checks["awq"].toolTip()
    page.set_target("none")
    assert not page.checks["mixed-precision"].isEnabled()
    assert page.checks["prune-grad"].isEnabled()


def test_treat_save_and_reset(qtbot, window, llama_dir, tmp_path):
    load(qtbot, window, llama_dir)
    _small_data(window)
    session = window.state.session
    before = session.weights_digest()
    page = window.treatment_page
    page.set_target("none")
    for name, box in page.checks.items():
        box.setChecked(name == "prune-grad")
    page.start.click()
    qtbot.waitUntil(lambda: not window.runner.busy and bool(page.outcomes), timeout=120000)
    assert page.extra.rowCount() == 3  # magnitude, Wanda, gradient-aware
    assert session.weights_digest() != before and page.save_model.isEnabled()
    window.write_treated_model(tmp_path / "treated", overwrite=False)
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    assert (tmp_path / "treated" / "model.safetensors").is_file()
    assert "Saved" in page.status.text()
    page.reset.click()
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    assert session.weights_digest() == before
    assert page.state.text().startswith("untreated") and not page.outcomes


def test_choices_lock_and_the_stage_shows_while_treating(qtbot, window, llama_dir):
    window.resize(1280, 600)  # the page scrolls at this size: its progress bar starts below the fold
    load(qtbot, window, llama_dir)
    _small_data(window)
    page = window.treatment_page
    page.set_target("int8-dynamic")
    for name, box in page.checks.items():
        box.setChecked(name == "smoothquant")
    stages = []
    window.runner.event.connect(lambda e: stages.append(page.status.text()) if hasattr(e, "stage") else None)
    page.start.click()
    assert window.runner.busy
    assert not page.progress.visibleRegion().isEmpty(), "the running job's progress is scrolled into view"
    # Nothing of the plan being run can be changed mid-run.
    assert not page.choices.isEnabled() and not page.checks["smoothquant"].isEnabled()
    assert not page.target.isEnabled() and not page.budget.isEnabled() and not page.use_advice.isEnabled()
    assert not page.start.isEnabled() and page.cancel.isEnabled()
    qtbot.waitUntil(lambda: not window.runner.busy and bool(page.outcomes), timeout=120000)
    assert any("searching scales" in s and "layer groups" in s for s in stages), stages
    assert page.choices.isEnabled() and page.checks["smoothquant"].isEnabled() and page.start.isEnabled()
    assert not page.clock.isActive()
