"""Probe details: the dialog, and generating the original's and the modified model's continuations."""

from __future__ import annotations

from modeldoctor.events import Failed
from modeldoctor.gui.controllers.base import Controller
from modeldoctor.gui.worker import JobResult


class SamplesController(Controller):
    kinds = ("samples",)

    def __init__(self, window) -> None:
        super().__init__(window)
        self.dialog = None

    def show_probe(self, record) -> None:
        from modeldoctor.gui.dialogs import ProbeDetailsDialog

        state = self.state
        can_generate = state.session is not None and not self.runner.busy and (
            state.report is None or state.report.model.get("path") == str(state.session.loaded.path))
        ProbeDetailsDialog(record, self.request_samples if can_generate else None, self.window).show()

    def request_samples(self, record, dialog) -> None:
        if self.runner.busy:
            dialog.samples_failed("Busy: wait for the current job to finish.")
            return
        self.dialog = dialog
        session, spec = self.state.session, self.state.data_spec

        def work(control):
            from modeldoctor.checkup.run import sample_continuations

            return sample_continuations(session, record.spec, session.data(spec))
        self.start_call("samples", work)

    def on_event(self, event) -> None:
        if isinstance(event, JobResult) and self.dialog is not None:
            self.dialog.show_samples(event.value)

    def on_failed(self, event: Failed) -> bool:
        if self.dialog is not None:
            self.dialog.samples_failed(event.message)
            return True
        return False
