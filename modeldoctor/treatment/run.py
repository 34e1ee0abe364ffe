"""Run treatments in order: a generator of events that the CLI prints and the app draws.

Treatments compose: each works on the model as the ones before it left it. A cancelled or
failed run puts the model and the treatment choices back as they were before it began.
"""

from __future__ import annotations

import time
import traceback
from typing import Iterator

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.errors import CancelledError, ModelDoctorError
from modeldoctor.events import Event, Failed, Finished, LogMessage, Stage, TreatmentResult, run_to_end
from modeldoctor.session import Session
from modeldoctor.treatment.base import Job, TreatmentPlan, TreatmentReport, get, rollback_point


def run_treatments(session: Session, plan: TreatmentPlan, data: EvalData,
                   control: RunControl | None = None) -> Iterator[Event]:
    """Yield events; the last is always Finished with the TreatmentReport."""
    control = control or RunControl()
    began = time.monotonic()
    report = TreatmentReport(model=session.summary.as_dict(), plan=plan.as_dict(), data=data.describe(),
                             reference={})
    rollback = None
    try:
        plan.validate()
        data.require_calibration("Treatments fit on calibration text")
        data.require_selection("Treatments choose on selection text")
        chosen = [get(name) for name in plan.treatments]
        job = Job(session, data, plan, control, 1 + sum(t.units(session, plan) for t in chosen))
        rollback = rollback_point(session)
        yield Stage("reference", f"untreated model on {data.eval_tokens} evaluation, {data.selection_tokens} "
                                 f"selection and {data.calibration_tokens} calibration tokens")
        report.reference = dict(session.reference(data, control).figures)
        session.reference(job.selection, control)
        session.reference(job.calibration, control)
        yield job.tick()
        for treatment in chosen:
            control.checkpoint()
            yield Stage(treatment.name, treatment.title)
            started = time.monotonic()
            outcome = yield from treatment.run(job)
            outcome.seconds = time.monotonic() - started
            if outcome.applied:
                session.treatment.applied.append({"name": outcome.name, "summary": outcome.summary,
                                                  "target": plan.target, "verdict": outcome.verdict})
            report.outcomes.append(outcome)
            yield LogMessage(f"{outcome.title}: {outcome.verdict}")
            yield TreatmentResult(outcome)
        report.state = session.treatment.as_dict()
        report.status, report.elapsed_s = "completed", time.monotonic() - began
        applied = sum(o.applied for o in report.outcomes)
        rollback = None  # done: closing the generator from here on must not undo anything
        yield Finished("completed", f"{applied} of {len(report.outcomes)} treatments applied", report)
    except GeneratorExit:  # the consumer stopped listening (Ctrl+C in the CLI): undo, then end
        if rollback:
            rollback()
        raise
    except CancelledError as exc:
        rollback = _undo(rollback, report, "cancelled", began)
        yield Finished("cancelled", str(exc), report)
    except ModelDoctorError as exc:
        rollback = _undo(rollback, report, "failed", began)
        yield Failed(str(exc))
        yield Finished("failed", str(exc), report)
    except Exception as exc:  # an engine bug must reach the user as a message, not kill the app
        rollback = _undo(rollback, report, "failed", began)
        yield Failed(f"Unexpected error during treatment: {exc}", traceback.format_exc())
        yield Finished("failed", str(exc), report)


def _undo(rollback, report: TreatmentReport, status: str, began: float) -> None:
    """Put the model back; returns None so the caller's rollback is spent."""
    if rollback:
        rollback()
    report.status, report.elapsed_s = status, time.monotonic() - began
    return None


def treat(session: Session, plan: TreatmentPlan, data: EvalData, control: RunControl | None = None) -> TreatmentReport:
    """Run to the end and return the report; raises on failure or cancel."""
    return run_to_end(run_treatments(session, plan, data, control))
