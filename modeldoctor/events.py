"""Typed events the engine emits while it works.

Events carry Python numbers, strings and plain dataclasses of them (never torch tensors or
Qt objects), so the CLI can print them, the app can draw them and tests can assert on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modeldoctor.report.results import CheckupReport, ProbeRecord, ProbeSpec

FinishReason = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True)
class Stage:
    """A preparatory stage began (reference pass, calibration statistics, ...)."""

    name: str
    detail: str = ""


@dataclass(frozen=True)
class PlanReady:
    probes: tuple[ProbeSpec, ...]
    skipped: tuple[str, ...] = ()  # why some (modification, target) pairs were left out


@dataclass(frozen=True)
class ProbeStarted:
    probe: ProbeSpec


@dataclass(frozen=True)
class ProbeResult:
    record: ProbeRecord


@dataclass(frozen=True)
class TreatmentResult:
    """One treatment finished: its before/after figures (a treatment.base.Outcome)."""

    outcome: object


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    stage: str = "probes"
    eta_range: tuple[float, float] | None = None  # (soonest, latest) seconds left, where known

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class LogMessage:
    message: str
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True)
class Failed:
    message: str
    details: str = ""
    model_restored: bool = True  # False: the model in memory could not be put back and must be loaded again


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    message: str = ""
    report: object = None  # CheckupReport, TreatmentReport or ExportResult, by job


def run_to_end(events) -> object:
    """Consume a job's events; return the Finished report, or raise on failure or cancel."""
    from modeldoctor.errors import CancelledError, ModelDoctorError

    for event in events:
        if isinstance(event, Failed):
            raise ModelDoctorError(event.message)
        if isinstance(event, Finished):
            if event.reason == "cancelled":
                raise CancelledError()
            return event.report
    raise RuntimeError("the job ended without a Finished event")


Event = Stage | PlanReady | ProbeStarted | ProbeResult | TreatmentResult | Progress | LogMessage | Failed | Finished
