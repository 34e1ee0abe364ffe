"""What the app knows right now: passed to every page explicitly (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.data import DataSpec
from modeldoctor.report.results import CheckupReport
from modeldoctor.session import Session


@dataclass
class AppState:
    session: Session | None = None
    data_spec: DataSpec = field(default_factory=DataSpec)
    plan: CheckupPlan = field(default_factory=CheckupPlan)
    report: CheckupReport | None = None
    seconds_per_token: float | None = None  # from a timed micro-run after loading
    running: bool = False

    def estimate_probe_seconds(self) -> float | None:
        """A block probe reruns about half the model on average, plus the knowledge probes."""
        if self.seconds_per_token is None:
            return None
        tokens = self.data_spec.tokens * (3.2 if self.data_spec.knowledge else 1.0)
        return 0.65 * tokens * self.seconds_per_token

    def estimate_reference_seconds(self) -> float | None:
        if self.seconds_per_token is None:
            return None
        return self.data_spec.tokens * (3.2 if self.data_spec.knowledge else 1.0) * self.seconds_per_token * 1.3
