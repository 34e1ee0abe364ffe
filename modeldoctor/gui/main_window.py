"""The main window: a step list on the left, one page per step, engine work on a worker thread."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QSettings, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog, QHBoxLayout, QListWidget, QListWidgetItem, QMainWindow, QMessageBox, QPushButton, QScrollArea,
    QStackedWidget, QWidget,
)

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.errors import ModelDoctorError
from modeldoctor.events import Failed, Progress
from modeldoctor.gui.dialogs import show_error
from modeldoctor.gui.pages.data import DataPage
from modeldoctor.gui.pages.diagnosis import DiagnosisPage
from modeldoctor.gui.pages.export import ExportPage
from modeldoctor.gui.pages.load import LoadPage
from modeldoctor.gui.pages.plan import PlanPage
from modeldoctor.gui.pages.run import RunPage
from modeldoctor.gui.pages.treatment import TreatmentPage
from modeldoctor.gui.state import AppState
from modeldoctor.gui.worker import JobRunner
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
        QApplication.instance().styleHints().colorSchemeChanged.connect(self._system_scheme_changed)
        self.state = AppState()
        self.runner = JobRunner(self)
        self.runner.event.connect(self._on_event)
        self.runner.finished.connect(self._on_job_done)
        self.job_kind: str | None = None
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
            if page in (self.run_page, self.diagnosis_page):  # plots that stretch: they fit any size as they are
                self.pages.addWidget(page)
                continue
            # Forms scroll rather than forcing a large window: every page fits a 1280x720 screen.
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

        from modeldoctor.gui.controllers.checkup import CheckupController
        from modeldoctor.gui.controllers.export import ExportController
        from modeldoctor.gui.controllers.load import LoadController
        from modeldoctor.gui.controllers.samples import SamplesController
        from modeldoctor.gui.controllers.treatment import TreatmentController

        self.load, self.checkup = LoadController(self), CheckupController(self)
        self.treatment, self.export = TreatmentController(self), ExportController(self)
        self.samples = SamplesController(self)
        self.controllers = (self.load, self.checkup, self.treatment, self.export, self.samples)
        self.steps.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.load_page.openRequested.connect(self.open_model)
        self.load_page.sampleRequested.connect(self.open_sample)
        self.data_page.changed.connect(self.checkup.data_changed)
        self.plan_page.changed.connect(self.checkup.plan_changed)
        self.plan_page.startRequested.connect(self.start_checkup)
        self.run_page.pauseToggled.connect(self.checkup.pause)
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

    def _next_button(self, page: QWidget, text: str, slot) -> QPushButton:
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

    def _system_scheme_changed(self, *_) -> None:
        if self.theme == "system":  # follow the desktop when it switches between light and dark
            self.set_theme("system")

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
            3: None if (running or report or not self.run_page.problem.isHidden()) else
            "Start a checkup from the Plan step first.",
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

    # ---- checkup ---------------------------------------------------------------------------
    def cancel_job(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.statusBar().showMessage("Cancelling … the model is being restored.")

    # ---- what each step does lives in its controller; these are its entry points ---------------
    def open_model(self, path: str) -> None:
        self.load.open_model(path)

    def open_sample(self) -> None:
        self.load.open_sample()

    def start_checkup(self, plan: CheckupPlan | None = None, resume: CheckupReport | None = None,
                      spec=None) -> None:
        self.checkup.start_checkup(plan, resume, spec)

    def resume_checkup(self) -> None:
        self.checkup.resume_checkup()

    def start_checkup_of(self, modifications: str) -> None:
        self.checkup.start_checkup_of(modifications)

    def start_treatment(self) -> None:
        self.treatment.start_treatment()

    def save_treated_model(self) -> None:
        self.treatment.save_treated_model()

    def write_treated_model(self, folder: Path, overwrite: bool) -> None:
        self.treatment.write_treated_model(folder, overwrite)

    def reset_treatments(self) -> None:
        self.treatment.reset_treatments()

    def start_export(self) -> None:
        self.export.start_export()

    def show_probe(self, record) -> None:
        self.samples.show_probe(record)

    # ---- events from the worker, to the controller of the job that sent them -------------------
    def _controller(self):
        return next((c for c in self.controllers if self.job_kind in c.kinds), None)

    @Slot(object)
    def _on_event(self, event) -> None:
        if isinstance(event, Progress) and event.total:
            self.taskbar.set(event.done / event.total)
        controller = self._controller()
        if isinstance(event, Failed):
            self._failed(event, controller)
        elif controller is not None:
            controller.on_event(event)

    def _failed(self, event: Failed, controller) -> None:
        if controller is not None and controller.on_failed(event):
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
        controller = self._controller()
        if controller is not None:
            controller.on_done()
        self.job_kind = None
        self.update_steps()

    def loaded(self, session, speed) -> None:
        """A model is open: every page learns of it."""
        self.state.session = session
        self.state.speed = speed
        self.state.report = None
        path = str(session.loaded.path)
        self._remember(path)
        self.load_page.set_busy(False, f"Loaded {session.summary.name}.")
        self.load_page.show_card(session.summary)
        self.run_page.linear_names = session.anatomy.linear_names()
        self.treatment_page.linear_names = session.anatomy.linear_names()
        self.plan_page.set_moe(bool(session.anatomy.moe_blocks()))
        self.setWindowTitle(f"Model Doctor — {session.summary.name}")
        self.statusBar().showMessage(f"Loaded {path}. Next: choose the evaluation data or start with the defaults.")
        self.checkup.data_changed()
        self.export_page.set_context(session, None)
        self.treatment_page.clear_outcomes()
        self.treatment_page.show_recommendations([])
        self.treatment_page.show_state(session.treatment)
        self.update_steps()

    def report_is_of_loaded_model(self, report: CheckupReport) -> bool:
        session = self.state.session
        return session is not None and report.model.get("path") == str(session.loaded.path)

    def set_report(self, report: CheckupReport) -> None:
        """A checkup (finished, partial or reopened) is the one every page now shows."""
        self.state.report = report
        self.diagnosis_page.show_report(report)
        # A session of another model predicts nothing about the one loaded (its targets need not exist here).
        self.export_page.set_context(self.state.session, report if self.report_is_of_loaded_model(report) else None)
        from modeldoctor.treatment.recommend import recommend

        self.treatment_page.show_recommendations(recommend(report))
        if not self.treatment_page.outcomes:
            self.treatment_page.apply_recommendation()
        self.update_steps()

    # ---- treatment ---------------------------------------------------------------------------
    # ---- export ------------------------------------------------------------------------------
    # ---- probe details ---------------------------------------------------------------------
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
        if self.load.busy_refuse():
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
        if not self.report_is_of_loaded_model(report):
            self.run_page.linear_names = []  # the report's own targets draw the anatomy
        self.run_page.show_report(report, resumable=report.status == "cancelled"
                                  and self.report_is_of_loaded_model(report))
        self.set_report(report)
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
        diagnosis = self.diagnosis_page  # it shows the current report (set_report)
        if diagnosis.by_position.curves:
            images["Mean KL by position (layer probes)"] = widget_png(diagnosis.by_position)
        if diagnosis.by_length.curves:
            images["Long-context probe: whole model, mean KL by length"] = widget_png(diagnosis.by_length)
        images.update(self.diagnosis_page.experts.images(widget_png))
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
