"""The run page during a two-stage checkup, and a cancelled checkup kept and resumed."""

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.report.results import ProbeRecord, ProbeSpec
from tests.gui.conftest import load


def _record(index, target, kl, basis):
    spec = ProbeSpec(index, "int3-g32", "quantize", "isolated", (target,), 0)
    return ProbeRecord(spec, {"kl_mean": kl}, False, "healthy", "", basis=basis)


def test_estimated_bars_are_pale_until_their_measurement_replaces_them(qtbot, window, screenshots):
    page = window.run_page
    page.begin(0.01)
    page.add_record(_record(0, "0.mlp.up_proj", 0.004, "estimated"))
    page.add_record(_record(1, "0.mlp.down_proj", 0.002, "estimated"))
    page.redraw()
    alphas = [b.color().alpha() for b in page.bars.bars.opts["brushes"]]
    assert alphas[0] < 255 and alphas[1] < 255
    assert not page.basis_note.isHidden() and "2 of 2 bars are estimates" in page.basis_note.text()
    page.add_record(_record(0, "0.mlp.up_proj", 0.006, "measured"))
    page.redraw()
    assert page.bars.current.values == [0.006, 0.002]  # replaced in place, not added
    alphas = [b.color().alpha() for b in page.bars.bars.opts["brushes"]]
    assert alphas[0] == 255 and alphas[1] < 255
    assert "1 of 2 bars are estimates" in page.basis_note.text()
    page.grab().save(str(screenshots / "tiny-run-estimated.png"))
    page.end("completed")


def test_progress_says_when_settling_adds_steps_beyond_the_probes(qtbot, window):
    page = window.run_page
    page.begin(0.01)
    page.set_total(44)
    page.progress_update(30, 44, 12.0)
    assert page.progress.format() == "probe 30 / 44"
    page.progress_update(44, 49, 5.0)  # settling: 5 estimated probes are measured as well
    assert page.progress.format() == "step 44 / 49: 44 probes, 5 re-checked estimates"
    assert page.progress.maximum() == 49 and page.progress.value() == 44
    page.progress_update(1, 3, 4.0, stage="knowledge")
    assert page.progress.format() == "knowledge probes on the worst: 1 / 3"
    page.progress_update(2, 6, 4.0, stage="context")
    assert page.progress.format() == "long-context probes: 2 / 6"
    page.end("completed")


def test_a_failure_that_left_the_model_changed_does_not_say_it_is_unchanged(qtbot, window):
    page = window.run_page
    page.begin(0.01)
    page.fail("The original weights could not be read back; load it again.", model_restored=False)
    assert "load it again" in page.problem.text() and "files were not touched" in page.problem.text()
    assert "Nothing about the model was changed" not in page.problem.text()
    page.begin(0.01)
    page.fail("The text is empty.")
    assert "Nothing about the model was changed" in page.problem.text()


def test_cancelled_checkup_is_kept_and_resumed(qtbot, window, llama_dir, monkeypatch):
    from modeldoctor.checkup import run as checkup_run

    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(2)
    original = checkup_run.measure
    measured = []

    def slow_measure(*args, **kwargs):
        measured.append(args[4].label)
        record = original(*args, **kwargs)
        if len(measured) == 2 and not getattr(slow_measure, "cancelled", False):
            slow_measure.cancelled = True
            window.runner.control.cancel()  # what the Cancel button does, between two probes
        return record

    monkeypatch.setattr(checkup_run, "measure", slow_measure)
    plan = CheckupPlan(modifications=["int4", "remove"], knowledge=False, exhaustive=True)
    window.start_checkup(plan)
    qtbot.waitUntil(lambda: window.state.report is not None and not window.runner.busy, timeout=60000)
    report = window.state.report
    assert report.status == "cancelled" and len(report.probes) == 2
    assert not window.run_page.resume.isHidden() and "2 measured probes kept" in window.run_page.eta.text()
    assert window.steps.item(4).flags()  # the diagnosis of the partial checkup can be opened
    assert "kept as a partial checkup" in window.statusBar().currentMessage()
    measured.clear()
    window.run_page.resume.click()
    qtbot.waitUntil(lambda: window.state.report is not None and window.state.report.status == "completed"
                    and not window.runner.busy, timeout=60000)
    assert len(window.state.report.probes) == 6 and len(measured) == 4
    assert window.run_page.resume.isHidden()


def test_a_reopened_cancelled_session_resumes_with_its_own_plan_and_another_models_is_shown_safely(
        qtbot, window, llama_dir, model_dirs, tmp_path):
    from tests.gui.conftest import load

    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(1)
    window.plan_page.exhaustive.setChecked(True)
    window.start_checkup()
    qtbot.waitUntil(lambda: len(window.run_page.model.records) >= 2, timeout=60000)
    window.run_page.cancel.click()
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    path = tmp_path / "partial.json"
    window.write_session(path)
    plan = window.state.report.plan
    window.plan_page.remove.setChecked(False)  # the Plan page changes; the resumed run must not follow it
    window.open_session(str(path))
    assert window.run_page.resume.isVisibleTo(window.run_page)
    window.run_page.resume.click()
    qtbot.waitUntil(lambda: window.state.report is not None and not window.runner.busy, timeout=120000)
    assert window.state.report.status == "completed" and window.state.report.plan["modifications"] == \
        plan["modifications"]
    # A session of a different model (more blocks than the one loaded): shown, never used to predict.
    from modeldoctor.report.results import CheckupReport

    other = CheckupReport.load(path)
    other.model["path"] = "/elsewhere/bigger-model"
    spec = other.probes[0].spec
    other.probes.append(type(other.probes[0])(**{**other.probes[0].__dict__, "spec": type(spec)(
        **{**spec.__dict__, "index": 999, "targets": ("31",), "block": 31})}))
    other_path = tmp_path / "other.json"
    other.save_file(other_path)
    window.open_session(str(other_path))
    assert not window.run_page.resume.isVisibleTo(window.run_page)
    window.go(6)
    assert window.export_page.report is None
