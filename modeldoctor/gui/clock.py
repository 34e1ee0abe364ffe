"""A job's clock on a page: between progress events it keeps moving, so a long step never looks
frozen: the current step's own time and an ETA counted down once a second."""

from __future__ import annotations

import time

from PySide6.QtCore import QObject, QTimer

from modeldoctor.gui.pages.data import format_duration


class JobClock(QObject):
    def __init__(self, eta_label, stage_label, parent=None, eta_prefix: str = "ETA ") -> None:
        super().__init__(parent)
        self.eta_label, self.stage_label, self.eta_prefix = eta_label, stage_label, eta_prefix
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.tick)
        self.stage, self.stage_began, self.eta_at, self.finishing = "", 0.0, None, False

    def start(self) -> None:
        self.stage, self.stage_began, self.eta_at, self.finishing = "", time.monotonic(), None, False
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def isActive(self) -> bool:
        return self.timer.isActive()

    def update(self, done: int, total: int, eta_s: float | None, stage: str) -> None:
        now = time.monotonic()
        self.finishing = done >= total
        self.eta_at = None if eta_s is None or self.finishing else now + eta_s
        if stage and stage.split(": ")[:2] != self.stage.split(": ")[:2]:  # a new step, not its next unit
            self.stage_began = now
        self.stage = stage or self.stage
        self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        if self.eta_at is not None:
            self.eta_label.setText(f"{self.eta_prefix}{format_duration(max(self.eta_at - now, 0.0))}")
        elif self.finishing:
            self.eta_label.setText("finishing …")
        if self.stage:
            self.stage_label.setText(f"{self.stage} ({format_duration(now - self.stage_began)})")
