"""How long does the app's event loop stall while a checkup of the sample model runs?

Runs the app offscreen, loads SmolLM2-135M, starts a block-level checkup and measures the
largest gap between ticks of a 10 ms QTimer (the stall a user would feel), plus the plot
redraw rate. Usage: QT_QPA_PLATFORM=offscreen python benchmarks/gui_responsiveness.py [--tokens 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TICK_MS = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from PySide6.QtCore import QTimer

    from modeldoctor.gui.automation import load_sample, make_window

    app, window = make_window(tempfile.NamedTemporaryFile(suffix=".ini", delete=False).name)
    load_sample(window)
    window.data_page.slider.setValue(max(1, args.tokens // 128))
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    began = time.perf_counter()
    window.start_checkup()
    last[0] = time.perf_counter()
    timer.start()
    done = QTimer()
    done.setInterval(100)
    done.timeout.connect(lambda: app.quit() if window.state.report is not None and not window.runner.busy else None)
    done.start()
    app.exec()  # the real event loop, as a user has it
    timer.stop()
    done.stop()
    elapsed = time.perf_counter() - began
    stalls = sorted((g * 1000 - TICK_MS for g in gaps), reverse=True)
    report = window.state.report
    print(f"Checkup of SmolLM2-135M in the app (offscreen): {len(report.probes)} probes, {args.tokens} tokens, "
          f"{elapsed:.0f} s")
    print(f"event-loop ticks: {len(gaps)}; longest stall {stalls[0]:.1f} ms; 99th percentile "
          f"{stalls[len(stalls) // 100]:.1f} ms (target < 100 ms)")
    print(f"plot redraws: {window.run_page.redraws} ({window.run_page.redraws / elapsed:.2f} per second, "
          f"cap {1000 / 33:.0f})")
    window.close()
    sys.exit(0 if stalls[0] < 100 else 1)


if __name__ == "__main__":
    main()
