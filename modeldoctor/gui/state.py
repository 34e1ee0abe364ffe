"""What the app knows right now: passed to every page explicitly (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.timing import Duration, planned_duration
from modeldoctor.data import DataSpec
from modeldoctor.report.results import CheckupReport
from modeldoctor.session import Session


@dataclass(frozen=True)
class Speed:
    """Timed after loading: what the time estimates before a run are built on."""

    seconds_per_token: float  # a plain forward pass over one sequence of the checkup's length
    knowledge_tokens: int  # padded tokens of the knowledge probes


@dataclass
class AppState:
    session: Session | None = None
    data_spec: DataSpec = field(default_factory=DataSpec)
    plan: CheckupPlan = field(default_factory=CheckupPlan)
    report: CheckupReport | None = None
    speed: Speed | None = None
    running: bool = False

    def planned_duration(self, plan: CheckupPlan, probes, exact_at_least: int) -> Duration | None:
        if self.speed is None or self.session is None:
            return None
        from dataclasses import replace

        plan = replace(plan, knowledge=self.data_spec.knowledge)
        return planned_duration(self.session.anatomy, plan, probes, self.speed.seconds_per_token,
                                self.data_spec.tokens, self.speed.knowledge_tokens, exact_at_least)

    def reference_seconds(self) -> float | None:
        """The reference pass over the evaluation text (and the knowledge probes)."""
        if self.speed is None:
            return None
        knowledge = self.speed.knowledge_tokens if self.data_spec.knowledge else 0
        return (self.data_spec.tokens + knowledge) * self.speed.seconds_per_token
