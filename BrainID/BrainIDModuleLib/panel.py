"""The module panel's behaviour: Apply / Cancel, the model list and Download, and polling the one
running job (its progress, log and completion) for every section's buttons.

The logics come in from outside (BrainIDWidget's constructor), so tests drive the panel with fakes.
Every job carries its own completion (`job.finish()`); the button that started it passes what to do
with the results (`after`), so polling never asks what kind of job it is.
"""

from __future__ import annotations

import logging
import os

import qt
import slicer

from BrainIDModuleLib import dependencies


def model_choices() -> list[dict]:
    """[{name, description, tasks, status, default}] of the registered models."""
    from BrainIDLib.registry import load_registry, model_status

    registry = load_registry()
    return [{"name": m.name, "description": m.description, "tasks": list(m.tasks), "status": model_status(m),
             "default": m.name == registry.default} for m in registry.models]


class Panel:
    def __init__(self, ui, predictLogic, timer):
        self.ui = ui
        self.predict = predictLogic
        self.timer = timer  # a QTimer whose timeout() calls onTimer
        self.sections = []  # CorrespondenceSection, FewShotSection: setup(), updateButtons(running, button)
        self.params = None  # the BrainIDParameterNode (typed fields)
        self.job = self.after = self.jobButton = None
        self.models = []
        self._logShown = 0

    def setup(self, *sections):
        self.sections = list(sections)
        for section in self.sections:
            section.setup()
        self.timer.setInterval(200)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelComboBox.connect("editTextChanged(QString)", self.onModelChanged)
        self.timer.connect("timeout()", self.onTimer)
        self.populateModels()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        self.timer.stop()

    def setParameterNode(self, params):
        self.params = params
        if params is not None and not params.modelName:
            self.onModelChanged()  # a new parameter node takes the listed default model
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        if self.params is not None and self.params.modelName and self.params.modelName != self.selectedModel():
            index = self.ui.modelComboBox.findData(self.params.modelName)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
            else:
                self.ui.modelComboBox.setEditText(self.params.modelName)
        self.updateButtons()

    # ---------------------------------------------------------------- models
    def selectedModel(self) -> str:
        data = self.ui.modelComboBox.currentData
        return data if data else self.ui.modelComboBox.currentText.strip()

    def populateModels(self):
        self.ui.modelComboBox.clear()
        try:
            self.models = model_choices()
        except Exception as e:  # noqa: BLE001 - no torch yet, damaged registry: say it, keep the panel usable
            self.models = []
            self.appendLog(f"Could not read the model registry: {e}")
        for m in self.models:
            self.ui.modelComboBox.addItem(m["name"], m["name"])
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, m["description"], qt.Qt.ToolTipRole)
        default = next((i for i, m in enumerate(self.models) if m["default"]), 0)
        if self.models:
            self.ui.modelComboBox.currentIndex = default
        self.onModelChanged()

    def onModelChanged(self, *args):
        name = self.selectedModel()
        if self.params is not None and self.params.modelName != name:
            self.params.modelName = name
        entry = next((m for m in self.models if m["name"] == name), None)
        if entry is None:
            self.ui.modelStatusLabel.text = "Weights file" if os.path.isfile(name) else "Not a registered model or file"
        else:
            self.ui.modelStatusLabel.text = f"{entry['status']} - tasks: {', '.join(entry['tasks']) or 'none'}"

    def engineOptions(self) -> dict:
        return {"model": self.selectedModel() or None, "device": self.params.device}

    # ---------------------------------------------------------------- jobs
    def updateButtons(self):
        running, p = self.job is not None, self.params
        ready = p is not None and p.inputVolume is not None and bool(p.tasks())
        self.ui.applyButton.text = "Cancel" if running and self.jobButton is self.ui.applyButton else "Apply"
        self.ui.applyButton.enabled = (running and self.jobButton is self.ui.applyButton) or (not running and ready)
        self.ui.downloadButton.enabled = not running
        self.ui.inputsCollapsibleButton.enabled = not running
        for section in self.sections:
            section.updateButtons(running, self.jobButton)

    def run(self, button, start, after=None):
        """Start a job from `button` (`start()` returns it), or cancel the running job when `button`
        started it. `after(results)` runs once the job's results are in the scene."""
        if self.job is not None:
            if button is self.jobButton:
                self.job.cancel()
                self.appendLog("Cancelled.")
            return
        if not dependencies.ensure(confirm=slicer.util.confirmOkCancelDisplay, pip_install=slicer.util.pip_install,
                                   torch_installer=dependencies.slicer_torch_installer(),
                                   explain=slicer.util.errorDisplay):
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay("BrainID could not start.", waitCursor=True):
            self.job, self.after, self.jobButton = start(), after, button
            self._logShown = 0
            self.ui.progressBar.value = 0
            self.timer.start()
        self.updateButtons()

    def onApply(self):
        p = self.params
        self.run(self.ui.applyButton, lambda: self.predict.start(
            p.inputVolume, tasks=p.tasks(), qc=p.qc, flipAverage=p.flipAverage, **self.engineOptions()))

    def onDownload(self):
        self.run(self.ui.downloadButton, lambda: self.predict.startDownload(self.selectedModel()),
                 lambda results: self.populateModels())

    def onTimer(self):
        job, runner = self.job, self.job.runner
        state = job.poll()
        self.ui.progressBar.value = int(100 * runner.fraction)
        self.ui.statusLabel.text = runner.message
        for line in runner.log[self._logShown:]:
            self.appendLog(line)
        self._logShown = len(runner.log)
        if state == "running":
            return
        self.timer.stop()
        after, self.job, self.jobButton = self.after, None, None
        try:
            if state == "cancelled":
                job.cleanup()
                self.ui.statusLabel.text = "Cancelled"
                return
            with slicer.util.tryWithErrorDisplay("BrainID failed.", waitCursor=True):
                results = job.finish()
                notes = "; ".join(getattr(runner, "notices", ()))
                self.ui.statusLabel.text = f"Done: {', '.join(results) or 'ok'}" + (f" ({notes})" if notes else "")
                if after is not None:
                    after(results)
        finally:
            self.updateButtons()

    def appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(str(text))
        logging.info(str(text))
