"""Step 7: what happens when you press Export: the folder is checked, the export runs on the worker
(fp32 export, quantization with the keep list, validation against the original), and its
progress, result or failure are drawn on the Export page."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from modeldoctor.events import Failed, Finished, LogMessage, Progress, Stage
from modeldoctor.gui.controllers.base import Controller


class ExportController(Controller):
    kinds = ("export",)

    @property
    def page(self):
        return self.window.export_page

    def start_export(self) -> None:
        from modeldoctor.gui.dialogs import show_error

        if self.state.session is None or self.busy_refuse():
            return
        page = self.page
        folder = page.folder.text().strip()
        if not folder:
            show_error(self.window, "Choose a folder to export to.")
            return
        target = Path(folder).expanduser()
        overwrite = False
        if target.exists():
            answer = QMessageBox.question(self.window, "Replace folder?", f"{target} already exists. Replace it "
                                          "with the new export (only once the new one has passed validation)?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        session, spec = self.state.session, self.state.data_spec
        precision, budget, report = page.precision(), page.budget.value(), self.state.report
        # Formats set by hand are written as they are; the suggested ones are chosen again by the
        # engine (the same choice), which may then raise more linears if the first export misses.
        formats, size_budget = (page.formats() if page.edited else None), page.size_budget_bytes()
        page.set_running(True)
        page.status.setText("Exporting …")
        self.status(f"Exporting {precision} to {target} …")

        def work(control):
            from dataclasses import replace

            from modeldoctor.export.pipeline import export_model

            data = session.data(replace(spec, knowledge=False))
            yield from export_model(session, data, target, precision, report, None, budget, overwrite,
                                    control=control, formats=formats, size_budget=size_budget)
        self.start("export", work)
        self.reveal(page.progress)

    def on_event(self, event) -> None:
        page = self.page
        if isinstance(event, Progress):
            page.progress_update(event.done, event.total, event.eta_s, event.stage)
        elif isinstance(event, Stage):
            page.status.setText(f"{event.name}: {event.detail} …")
            self.status(f"Exporting: {event.name} ({event.detail}) …")
        elif isinstance(event, LogMessage):
            page.status.setText(event.message)
        elif isinstance(event, Finished):
            page.set_running(False)
            if event.report is not None:
                page.show_result(event.report)
            else:
                page.progress.setFormat(event.reason)
                if event.reason == "cancelled":
                    page.status.setText("Export cancelled; nothing was written.")
            self.status(f"Export {event.reason}: {event.message}")

    def on_failed(self, event: Failed) -> bool:
        self.page.status.setText(event.message)
        if "over budget" in event.message:
            return True  # the page shows the figures and offers the next step
        self.page.set_running(False)
        return False
