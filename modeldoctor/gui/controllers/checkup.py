"""Steps 3 and 4: what happens when a checkup starts, pauses, is cancelled, resumed, fails or ends."""

from __future__ import annotations

from dataclasses import replace

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.errors import ModelDoctorError
from modeldoctor.events import Failed, Finished, LogMessage, PlanReady, Progress, ProbeResult, Stage
from modeldoctor.gui.controllers.base import Controller
from modeldoctor.report.results import CheckupReport


class CheckupController(Controller):
    kinds = ("checkup",)

    @property
    def page(self):
        return self.window.run_page

    # ---- the plan's summary and time estimate ------------------------------------------------
    def data_changed(self) -> None:
        window = self.window
        self.state.data_spec = window.data_page.spec()
        window.data_page.show_estimate(self.state.reference_seconds())
        self.plan_changed()

    def plan_changed(self) -> None:
        plan_page = self.window.plan_page
        if self.state.session is None:
            plan_page.show_summary(None, None, "Load a model first.")
            return
        plan = plan_page.plan()
        try:
            probes, skipped = build_probes(plan, self.state.session.anatomy)
        except ModelDoctorError as exc:
            plan_page.show_summary(None, None, str(exc))
            return
        from modeldoctor.checkup.run import fewest_exact_probes

        measured = fewest_exact_probes(plan, probes)
        plan_page.show_summary(len(probes), self.state.planned_duration(plan, probes, measured), measured=measured,
                               notes=skipped)
        self.window.update_steps()

    # ---- running -----------------------------------------------------------------------------
    def start_checkup(self, plan: CheckupPlan | None = None, resume: CheckupReport | None = None,
                      spec=None) -> None:
        from modeldoctor.gui.dialogs import show_error

        window = self.window
        if self.state.session is None or self.busy_refuse():
            return
        plan = plan if isinstance(plan, CheckupPlan) else window.plan_page.plan()  # a QAction passes a bool
        spec = spec or window.data_page.spec()
        try:
            plan.validate()
            probes, _ = build_probes(plan, self.state.session.anatomy)
        except ModelDoctorError as exc:
            show_error(window, str(exc))
            return
        self.state.plan, self.state.data_spec = plan, spec
        self.state.report = None
        self.state.running = True
        # The pages that read the previous checkup stop showing it: a failed re-run leaves none.
        window.export_page.set_context(self.state.session, None)
        window.treatment_page.show_recommendations([])
        self.page.begin(plan.threshold)
        counts: dict[str, int] = {}
        for probe in probes:
            if probe.mode == "isolated":
                counts[probe.modification] = counts.get(probe.modification, 0) + 1
        self.page.expected_per_modification = counts
        session = self.state.session

        def work(control):
            from modeldoctor.checkup.run import run_checkup

            yield Stage("data", spec.describe())
            data = session.data(spec)
            yield from run_checkup(session, plan, data, control, resume=resume)
        self.start("checkup", work)
        window.go(3)
        self.status("Checkup running …")

    def resume_checkup(self) -> None:
        """Continue the cancelled checkup on screen (run here or reopened) with its own plan and text."""
        from modeldoctor.data import DataSpec

        report = self.state.report
        if report is None or report.status != "cancelled" or not self.window.report_is_of_loaded_model(report):
            return
        spec = report.data.get("spec")
        self.start_checkup(CheckupPlan.from_dict(report.plan), resume=report,
                           spec=DataSpec(**spec) if spec else self.state.data_spec)

    def start_checkup_of(self, modifications: str) -> None:
        """A checkup of exactly these modifications (comma-separated), per linear, with the Plan
        page's other settings (the Export page asks for the formats its export writes)."""
        # Exhaustive: the export's predicted KL adds every linear's figure, so each must be measured.
        self.start_checkup(replace(self.window.plan_page.plan(), modifications=modifications.split(","),
                                   scope="linears",
                                   modes=("isolated",), targets=None, exhaustive=True))

    def pause(self, paused: bool) -> None:
        if paused:
            self.runner.control.pause()
            self.status("Paused. Resume to continue.")
        else:
            self.runner.control.resume()
            self.status("Checkup running …")

    # ---- its events --------------------------------------------------------------------------
    def on_event(self, event) -> None:
        page = self.page
        if isinstance(event, Stage):
            page.append_log(f"{event.name}: {event.detail}")
        elif isinstance(event, LogMessage):
            page.append_log(("warning: " if event.level == "warning" else "") + event.message)
        elif isinstance(event, PlanReady):
            page.set_total(len(event.probes))
            page.model.expect(event.probes)
            page.append_log(f"plan: {len(event.probes)} probes")
        elif isinstance(event, ProbeResult):
            record = event.record
            page.add_record(record)
            page.append_log(f"{record.spec.label}: {record.reason} ({record.seconds:.1f} s)")
        elif isinstance(event, Progress):
            page.progress_update(event.done, event.total, event.eta_s, event.eta_range, event.stage)
        elif isinstance(event, Finished):
            self._finished(event)

    def _finished(self, event: Finished) -> None:
        self.state.running = False
        report = event.report
        if event.reason == "failed":
            return  # on_failed has put the page into its failed state
        self.page.end(event.reason, report.probes if report else None)
        if event.reason == "completed":
            self.window.set_report(report)
            self.status(f"Checkup complete: {event.message}.")
            return
        kept = sum(not p.estimated for p in report.probes) if report else 0
        if report is not None and report.probes:  # partial, but real: shown, savable, resumable
            self.window.set_report(report)
        self.status(f"Checkup cancelled; the model was restored. {kept} measured probes are kept as a partial "
                    "checkup: Resume continues it, File ▸ Save keeps it.")
        self.page.append_log(f"cancelled: the model was restored exactly; {kept} measured probes kept")

    def on_failed(self, event: Failed) -> bool:
        self.state.running = False
        if event.details == "cancelled":  # cancelled before the first probe (e.g. while reading the text)
            self.page.end("cancelled")
        else:
            self.page.fail(event.message, event.model_restored)
            self.status(f"Checkup failed: {event.message}")
            self.window.update_steps()
        return False
