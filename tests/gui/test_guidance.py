"""Guidance for someone who does not script (issue 12): each step offers the next, terms explain
themselves, empty views say why they are empty, the diagnosis draws its findings."""

from tests.gui.conftest import load, run_checkup


def test_each_step_offers_the_next_and_the_diagnosis_leads_to_treatment(qtbot, window, llama_dir, screenshots):
    from modeldoctor.gui.glossary import GlossaryDialog, TERMS

    assert not window.next_buttons[0].isEnabled() and "Load a model" in window.next_buttons[0].toolTip()
    load(qtbot, window, llama_dir)
    window.next_buttons[0].click()
    assert window.pages.currentIndex() == 1
    window.data_page.slider.setValue(2)
    window.next_buttons[1].click()
    assert window.pages.currentIndex() == 2
    for widget in (window.plan_page.int8_dynamic, window.plan_page.isolated, window.plan_page.cumulative,
                   window.plan_page.sweep, window.plan_page.threshold, window.plan_page.prune_kind,
                   window.plan_page.exhaustive):
        assert len(widget.toolTip()) > 40, widget
    assert not window.next_buttons[3].isEnabled()
    window.plan_page.bits[2].setChecked(True)
    window.plan_page.threshold.setValue(0.001)
    window.plan_page.sweep.setChecked(False)
    run_checkup(qtbot, window)
    page = window.run_page
    assert page.cumulative.plotItem.titleLabel.text.startswith("No cumulative probes")
    assert page.sweep.plotItem.titleLabel.text.startswith("No strength sweep")
    window.next_buttons[3].click()
    assert window.pages.currentIndex() == 4
    diagnosis = window.diagnosis_page
    assert diagnosis.modification.count() >= 2
    diagnosis.tabs.setCurrentIndex(1)
    worst = diagnosis.worst.current
    assert worst.values == sorted(worst.values, reverse=True) and len(worst.values) <= 10
    assert diagnosis.curves.plotItem.titleLabel.text.startswith("No robustness curves")
    diagnosis.grab().save(str(screenshots / "tiny-diagnosis-worst.png"))
    diagnosis.glossary.click()
    dialogs = [d for d in diagnosis.findChildren(GlossaryDialog) if d.isVisible()]
    assert dialogs and all(term in dialogs[0].text.toPlainText() for term in TERMS)
    dialogs[0].close()
    assert diagnosis.treat.isEnabled()
    diagnosis.treat.click()
    assert window.pages.currentIndex() == 5
    recommended = window.treatment_page.recommendations[0]
    assert window.treatment_page.plan().target == recommended.target
    window.next_buttons[5].click()
    assert window.pages.currentIndex() == 6


def test_diagnosis_draws_robustness_curves_with_their_knee(qtbot, window, llama_dir):
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(1)
    plan = window.plan_page
    plan.int8_dynamic.setChecked(False)
    plan.prune_on.setChecked(False)
    plan.remove.setChecked(False)
    plan.isolated.setChecked(False)
    plan.sweep.setChecked(True)
    run_checkup(qtbot, window, timeout=180000)
    curves = window.diagnosis_page.curves
    assert curves.curves and curves.plotItem.titleLabel.text == ""
    knees = [c["knee"] for c in window.state.report.findings["sweeps"].values() if c["knee"] is not None]
    assert len(curves.marks.data) == len(knees) >= 1


def test_dropping_a_model_folder_opens_it(qtbot, window, llama_dir):
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(llama_dir))])
    enter = QDragEnterEvent(window.rect().center(), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPointF(window.rect().center()), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    window.dropEvent(drop)
    qtbot.waitUntil(lambda: window.state.session is not None and not window.runner.busy, timeout=60000)
    assert str(window.state.session.loaded.path) == str(llama_dir)


def test_taskbar_progress_follows_jobs_and_says_it_is_unsupported_without_a_bus(qtbot, window, llama_dir):
    from modeldoctor.gui.taskbar import DESKTOP_ID

    seen = []
    window.taskbar.set = lambda fraction, original=window.taskbar.set: (seen.append(fraction), original(fraction))
    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(1)
    run_checkup(qtbot, window)
    assert any(f is not None and 0 < f <= 1 for f in seen) and seen[-1] is None
    message = window.taskbar.message(0.25)
    assert message.arguments()[0] == DESKTOP_ID and message.arguments()[1] == {"progress-visible": True,
                                                                               "progress": 0.25}
