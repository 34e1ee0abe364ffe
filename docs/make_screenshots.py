"""Screenshots of every page of the app on the sample model, for the README.

Usage: QT_QPA_PLATFORM=offscreen .venv/bin/python docs/make_screenshots.py
Writes docs/screenshots/*.png (runs a short checkup and a SmoothQuant treatment of
SmolLM2-135M: several minutes).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(__file__).parent / "screenshots"


def main() -> None:
    from modeldoctor.gui.automation import load_sample, make_window, run_default_checkup, wait_until
    from modeldoctor.gui.dialogs import ProbeDetailsDialog

    OUT.mkdir(exist_ok=True)
    settings = tempfile.NamedTemporaryFile(suffix=".ini", delete=False).name
    app, window = make_window(settings)

    def shot(name: str, widget=None) -> None:
        app.processEvents()
        (widget or window).grab().save(str(OUT / f"{name}.png"))
        print(f"wrote {OUT / name}.png", file=sys.stderr)

    load_sample(window)
    window.go(0)
    shot("1-load")
    window.data_page.slider.setValue(2)  # 256 tokens keep the script short
    window.go(1)
    shot("2-data")
    plan = window.plan_page
    plan.bits[3].setChecked(True)
    plan.duplicate.setChecked(True)
    plan.temperature_on.setChecked(True)
    plan.cumulative.setChecked(True)
    plan.prune_on.setChecked(False)
    window.go(2)
    shot("3-plan")
    window.start_checkup()
    wait_until(lambda: len(window.run_page.model.records) >= 12)
    window.run_page.redraw()
    shot("4-checkup-live")
    wait_until(lambda: window.state.report is not None and not window.runner.busy)
    window.run_page.modification.setCurrentText("int8-dynamic")
    window.run_page.lower_tabs.setCurrentIndex(1)
    shot("4-checkup-done")
    worst = max(window.run_page.model.bars().records, key=lambda r: r.score)
    dialog = ProbeDetailsDialog(worst, None, window)
    dialog.show()
    dialog.tabs.setCurrentIndex(1)  # the cascade across depth
    shot("4-probe-details", dialog)
    dialog.close()
    window.go(4)
    shot("5-diagnosis")
    window.go(5)
    treatment = window.treatment_page
    treatment.apply_recommendation()  # what the diagnosis recommends, pre-ticked as a user finds it
    treatment.set_target("int8-dynamic")
    for name, box in treatment.checks.items():  # the scaling step alone keeps the script short
        box.setChecked(name == "smoothquant")
    window.start_treatment()
    wait_until(lambda: treatment.outcomes and not window.runner.busy)
    shot("6-treatment")
    window.go(6)
    shot("7-export")
    window.close()


if __name__ == "__main__":
    main()
