"""Step 6: what happens when the model is treated, saved, or put back to the original."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from modeldoctor.errors import ModelDoctorError
from modeldoctor.events import Failed, Finished, Progress, Stage, TreatmentResult
from modeldoctor.gui.controllers.base import Controller
from modeldoctor.gui.worker import JobResult


class TreatmentController(Controller):
    kinds = ("treatment", "treated-model")

    @property
    def page(self):
        return self.window.treatment_page

    def start_treatment(self) -> None:
        from modeldoctor.gui.dialogs import show_error

        if self.state.session is None or self.busy_refuse():
            return
        plan = self.page.plan()
        try:
            plan.validate()
        except ModelDoctorError as exc:
            show_error(self.window, str(exc))
            return
        session, spec = self.state.session, self.state.data_spec
        self.page.begin()
        self.window.go(5)

        def work(control):
            from modeldoctor.treatment.run import run_treatments

            yield Stage("data", spec.describe())
            yield from run_treatments(session, plan, session.data(spec), control)
        self.start("treatment", work)
        self.status("Treating …")
        self.reveal(self.page.progress)

    def save_treated_model(self) -> None:
        session = self.state.session
        if session is None or not session.treatment.treated or self.busy_refuse():
            return
        folder, _ = QFileDialog.getSaveFileName(self.window, "Save the treated model to a new folder",
                                                str(Path.home() / f"{session.summary.name}-treated"))
        if folder:
            self.write_treated_model(Path(folder), overwrite=False)

    def write_treated_model(self, folder: Path, overwrite: bool) -> None:
        """Save on the worker thread (a few hundred MB are written)."""
        session = self.state.session
        self.page.status.setText(f"Saving the treated model to {folder} …")

        def work(control):
            from modeldoctor.treatment.save import save_treated_model

            return f"Saved the treated model to {save_treated_model(session, folder, overwrite)}."
        self.start_call("treated-model", work)

    def reset_treatments(self) -> None:
        session = self.state.session
        if session is None or not session.treatment.treated or self.busy_refuse():
            return

        def work(control):
            session.reset_treatments()
            return "Back to the original model (weights restored bit-exact)."
        self.start_call("treated-model", work)

    def on_event(self, event) -> None:
        page = self.page
        if isinstance(event, JobResult):  # a save or a reset
            self._model_written(event.value)
        elif isinstance(event, Stage):
            page.status.setText(f"{event.name}: {event.detail}")
        elif isinstance(event, Progress):
            page.progress_update(event.done, event.total, event.eta_s, event.stage)
        elif isinstance(event, TreatmentResult):
            page.add_outcome(event.outcome)
            page.show_state(self.state.session.treatment)
        elif isinstance(event, Finished):
            if event.reason == "failed":
                return  # on_failed has shown the message
            text = (f"Done: {event.message}." if event.reason == "completed" else
                    "Cancelled: the model and its treatments were put back as they were before this run.")
            page.end(event.reason, text)
            page.show_state(self.state.session.treatment)
            self.window.export_page.set_context(self.state.session, self.state.report)
            self.status(text)

    def _model_written(self, message: str) -> None:
        page = self.page
        page.status.setText(message)
        if "original" in message:
            page.clear_outcomes()
        page.show_state(self.state.session.treatment)
        self.window.export_page.set_context(self.state.session, self.state.report)
        self.status(message)

    def on_failed(self, event: Failed) -> bool:
        if self.window.job_kind == "treatment":
            self.page.end("failed", event.message)
        return False
