"""Screenshots of every page of the app on the sample model: idle, running, failed and finished,
at 1280x720 and 1920x1080, light and dark.

Usage: QT_QPA_PLATFORM=offscreen .venv/bin/python docs/make_screenshots.py
Writes docs/screenshots/*.png (the README's) and docs/screenshots/<theme>-<size>/*.png. Runs a short
checkup, a SmoothQuant treatment, the Export page's int4-b32 checkup and an int4 export of SmolLM2-135M
once (about fifteen minutes);
the other sizes and the dark theme redraw the same results in new windows, and run a short checkup
of their own for the "running" pictures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(__file__).parent / "screenshots"
SIZES = ((1280, 720), (1920, 1080))


def main() -> None:
    from modeldoctor.gui.automation import load_sample, make_window, wait_until

    OUT.mkdir(exist_ok=True)
    app, window = make_window(_settings("light"))
    window.resize(*SIZES[0])
    load_sample(window)
    results = full_flow(app, window, OUT / "light-1280x720", readme=OUT)
    window.close()
    for theme, size in (("light", SIZES[1]), ("dark", SIZES[0]), ("dark", SIZES[1])):
        app, other = make_window(_settings(theme))
        other.resize(*size)
        wait_until(lambda: True)
        redraw_flow(app, other, window.state.session, results, OUT / f"{theme}-{size[0]}x{size[1]}")
        other.close()


def _settings(theme: str) -> str:
    path = tempfile.NamedTemporaryFile(suffix=".ini", delete=False).name
    Path(path).write_text(f"[view]\ntheme={theme}\n", encoding="utf-8")
    return path


def _shooter(app, window, folder: Path, readme: Path | None = None):
    folder.mkdir(parents=True, exist_ok=True)

    def shot(name: str, widget=None, readme_name: str | None = None) -> None:
        app.processEvents()
        image = (widget or window).grab()
        image.save(str(folder / f"{name}.png"))
        if readme is not None and readme_name:
            image.save(str(readme / f"{readme_name}.png"))
        print(f"wrote {folder / name}.png", file=sys.stderr)
    return shot


def _plan(window) -> None:
    window.data_page.slider.setValue(2)  # 256 tokens keep the script short
    plan = window.plan_page  # the defaults, int3 and a decoding change: about 120 probes, most estimated first
    plan.bits[3].setChecked(True)
    plan.temperature_on.setChecked(True)


def _failed_checkup(window, wait_until) -> None:
    """The run page after a checkup whose text cannot be used."""
    from modeldoctor.errors import DataError
    from modeldoctor.gui import main_window

    session = window.state.session
    shown = []
    original_error, original_data = main_window.show_error, session.data
    main_window.show_error = lambda parent, message, details="": shown.append(message)
    session.data = lambda spec: (_ for _ in ()).throw(DataError(
        "notes.txt has only 41 tokens; a checkup needs at least 128. Choose a longer text."))
    try:
        window.start_checkup()
        wait_until(lambda: bool(shown) and not window.runner.busy)
    finally:
        main_window.show_error, session.data = original_error, original_data


def full_flow(app, window, folder: Path, readme: Path) -> dict:
    from modeldoctor.gui.automation import wait_until
    from modeldoctor.gui.dialogs import ProbeDetailsDialog

    shot = _shooter(app, window, folder, readme)
    window.go(0)
    shot("1-load", readme_name="1-load")
    empty = Path(tempfile.mkdtemp()) / "notes.txt"
    empty.write_text("\n\n", encoding="utf-8")
    window.go(1)
    window.data_page.set_user_file(str(empty))
    shot("2-data-failed")
    _plan(window)
    shot("2-data", readme_name="2-data")
    window.go(2)
    shot("3-plan", readme_name="3-plan")
    _failed_checkup(window, wait_until)
    shot("4-checkup-failed")
    window.start_checkup()
    wait_until(lambda: sum(not r.estimated for r in window.run_page.model.records) >= 8)
    window.run_page.redraw()
    shot("4-checkup-running", readme_name="4-checkup-live")
    wait_until(lambda: window.state.report is not None and not window.runner.busy)
    window.run_page.modification.setCurrentText("int8-dynamic")
    window.run_page.redraw()
    shot("4-checkup-done", readme_name="4-checkup-done")
    messages = {"checkup": window.statusBar().currentMessage()}  # the other windows show the same results
    report = window.state.report
    window.run_page.right_tabs.setCurrentIndex(1)
    window.run_page.lower_tabs.setCurrentIndex(1)
    shot("4-checkup-heatmap-and-an-empty-tab")
    window.run_page.right_tabs.setCurrentIndex(0)
    window.run_page.lower_tabs.setCurrentIndex(0)
    worst = max(window.run_page.model.bars().records, key=lambda r: r.score)
    dialog = ProbeDetailsDialog(worst, None, window)
    dialog.resize(900, 620)
    dialog.show()
    dialog.tabs.setCurrentIndex(1)  # the cascade across depth
    shot("4-probe-details", dialog, readme_name="4-probe-details")
    dialog.close()
    window.go(4)
    shot("5-diagnosis", readme_name="5-diagnosis")
    window.diagnosis_page.tabs.setCurrentIndex(1)
    shot("5-diagnosis-worst-layers")
    window.diagnosis_page.tabs.setCurrentIndex(0)
    window.diagnosis_page.treat.click()  # the recommendation, pre-ticked as a user finds it
    treatment = window.treatment_page
    treatment.set_target("int8-dynamic")
    for name, box in treatment.checks.items():  # the scaling step alone keeps the script short
        box.setChecked(name == "smoothquant")
    window.start_treatment()
    wait_until(lambda: treatment.progress.value() >= 3)
    shot("6-treatment-running")
    wait_until(lambda: treatment.outcomes and not window.runner.busy)
    shot("6-treatment", readme_name="6-treatment")
    messages["treatment"] = window.statusBar().currentMessage()
    treatment.chart_tabs.setCurrentIndex(1)
    shot("6-treatment-anatomy")
    treatment.chart_tabs.setCurrentIndex(0)
    window.go(6)
    page = window.export_page
    page.precisions["int4"].setChecked(True)
    shot("7-export-missing-checkup")  # the block-scope checkup has no int4-b32 figures: the page offers them
    page.run_checkup.click()  # what a user does next: the checkup of exactly what the int4 export writes
    wait_until(lambda: not window.runner.busy and window.state.report is not None
               and any(p.spec.modification == "int4-b32" for p in window.state.report.probes))
    export_report = window.state.report
    window.go(6)
    page.precisions["int4"].setChecked(True)
    page.size_fit.setChecked(True)
    page.size_slider.setValue(27)
    page.chart_tabs.setCurrentIndex(1)
    shot("7-export-size-vs-kl")
    page.chart_tabs.setCurrentIndex(0)
    page.size_fit.setChecked(False)
    page.budget.setValue(0.05)
    shot("7-export", readme_name="7-export")
    page.folder.setText(str(Path(tempfile.mkdtemp()) / "smollm2-int4"))
    window.start_export()
    wait_until(lambda: page.progress.maximum() > 0 and page.progress.value() >= 1)
    shot("7-export-running")
    wait_until(lambda: not window.runner.busy and page.table.rowCount() > 0)
    shot("7-export-done")
    messages["export"] = window.statusBar().currentMessage()
    window.treatment_page.grab()  # keeps the outcome objects alive for the other windows
    return {"report": report, "export_report": export_report, "outcomes": list(treatment.outcomes),
            "export": page.last_result,
            "speed": window.state.speed, "messages": messages}


def redraw_flow(app, window, session, results: dict, folder: Path) -> None:
    """The same results in another window (size or theme), plus a short checkup for 'running'."""
    from dataclasses import replace

    from modeldoctor.gui.automation import wait_until

    shot = _shooter(app, window, folder)
    window.loaded(session, results["speed"])
    window.go(0)
    shot("1-load")
    _plan(window)
    window.go(1)
    shot("2-data")
    window.go(2)
    shot("3-plan")
    _failed_checkup(window, wait_until)
    shot("4-checkup-failed")
    window.start_checkup(replace(window.plan_page.plan(), modifications=["int4", "remove"], modes=("isolated",)))
    wait_until(lambda: sum(not r.estimated for r in window.run_page.model.records) >= 2)
    shot("4-checkup-running")
    wait_until(lambda: not window.runner.busy)
    report = results["report"]
    window.run_page.show_report(report)
    window.set_report(report)
    window.statusBar().showMessage(results["messages"]["checkup"])
    window.run_page.modification.setCurrentText("int8-dynamic")
    window.go(3)
    shot("4-checkup-done")
    window.go(4)
    shot("5-diagnosis")
    treatment = window.treatment_page
    for outcome in results["outcomes"]:
        treatment.add_outcome(outcome)
    treatment.show_state(session.treatment)
    window.statusBar().showMessage(results["messages"]["treatment"])
    window.go(5)
    shot("6-treatment")
    window.go(6)
    window.export_page.set_context(session, results["export_report"])
    window.export_page.precisions["int4"].setChecked(True)
    window.export_page.budget.setValue(0.05)
    shot("7-export")
    if results["export"] is not None:
        result = results["export"]
        window.export_page.folder.setText(str(result.path))
        window.export_page.budget.setValue(result.budget_kl)
        window.export_page.show_result(result)
        window.statusBar().showMessage(results["messages"]["export"])
        shot("7-export-done")


if __name__ == "__main__":
    main()
