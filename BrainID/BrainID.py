"""BrainID: Brain-ID (ECCV 2024) contrast-agnostic brain MRI analysis in 3D Slicer.

GUI wiring only; the work is in BrainIDModuleLib (logic, dependencies) and BrainIDLib (engine,
CLI, runner, MRML adapter). Console use:

    import BrainID
    logic = BrainID.BrainIDLogic()
    results = logic.process(getNode("T1"), tasks=["segmentation", "anatomy"], model="NAME_OR_FILE")
    match, heatmaps = logic.findCorrespondence(getNode("T1"), getNode("F"), [getNode("FLAIR")])
    head = logic.trainFewShotHead(getNode("Segmentation")); logic.applyFewShotHead(getNode("FLAIR"), head)
(see BrainIDModuleLib/correspondence_logic.py and fewshot_logic.py).
"""

import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from BrainIDModuleLib import dependencies
from BrainIDModuleLib import logic as moduleLogic
from BrainIDModuleLib import sections as moduleSections

TASK_CHECKBOXES = {"segmentation": "segmentationCheckBox", "anatomy": "anatomyCheckBox",
                   "super_resolution": "superResolutionCheckBox", "bias_field": "biasFieldCheckBox",
                   "features_pca": "featuresPcaCheckBox"}
DEVICES = {"auto": "auto", "GPU": "cuda", "CPU": "cpu"}
CITATION = ("Liu P, Puonti O, Hu X, Alexander DC, Iglesias JE. Brain-ID: Learning Contrast-agnostic Anatomical "
            "Representations for Brain Imaging. ECCV 2024.")


class BrainID(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainID"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainID contributors"]
        self.parent.helpText = (
            "Contrast-agnostic brain analysis with Brain-ID features: FreeSurfer-style segmentation with structure "
            "volumes, T1 synthesis, super-resolution, bias-field correction and a feature PCA view, for MRI of any "
            "contrast and resolution. Pick a volume, tasks and a model, then Apply. Inference runs in a separate "
            "process, so Slicer stays responsive and Cancel stops it at once. "
            "Also: anatomical correspondence (a point on one scan, its match and a similarity heatmap on any other) "
            "and few-shot segmentation (paint a few structures, train a small head, segment other scans). "
            "See <a href='https://github.com/peirong26/Brain-ID'>Brain-ID</a>.")
        self.parent.acknowledgementText = (
            "BrainID implements the method of: " + CITATION + " Sample data: MNI ICBM152 2009a template "
            "(copyright McConnell Brain Imaging Centre; see Resources/SampleData/LICENSE-MNI152.txt).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped sample volume(s) in the Sample Data module, SHA-256 checked (file:// URIs)."""
    import SampleData

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "BrainID.png")
    for sample in moduleLogic.sample_entries():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="BrainID", sampleName="BrainID" + sample["name"], uris=sample["uri"],
            fileNames=sample["filename"], nodeNames="BrainID" + sample["name"], thumbnailFileName=icon,
            checksums=sample["checksum"])


class BrainIDLogic(ScriptedLoadableModuleLogic, moduleLogic.BrainIDLogic):
    """`process()` (blocking), `start()`/`finish()` (child process); see BrainIDModuleLib.logic."""

    def __init__(self, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        moduleLogic.BrainIDLogic.__init__(self, **kwargs)

    def setDefaultParameters(self, parameterNode):
        defaults = {"Tasks": "segmentation", "Model": "", "Device": "auto", "HeadName": "few-shot",
                    "ShowHeatmap": "true"}
        for key, value in defaults.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)


class BrainIDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updating = False
        self.job = None  # a BrainIDJob or a download ProcessRunner while running
        self._logShown = 0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainID.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainIDLogic(log=self.appendLog)
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)

        for label in DEVICES:
            self.ui.deviceComboBox.addItem(label)
        self.populateModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        for name in TASK_CHECKBOXES.values():
            getattr(self.ui, name).connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownloadButton)
        self.sections = moduleSections.Sections(self)  # correspondence and few-shot sections
        self.sections.setup()
        self.initializeParameterNode()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------- parameter node <-> GUI
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.SetNodeReferenceID("InputVolume", node.GetID())

    def setParameterNode(self, node):
        if node:
            self.logic.setDefaultParameters(node)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updating:
            return
        self._updating = True
        try:
            p = self._parameterNode
            self.ui.inputSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
            tasks = p.GetParameter("Tasks").split(",")
            for task, name in TASK_CHECKBOXES.items():
                getattr(self.ui, name).checked = task in tasks
            index = self.ui.modelComboBox.findData(p.GetParameter("Model"))
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
            elif p.GetParameter("Model"):
                self.ui.modelComboBox.setEditText(p.GetParameter("Model"))
            device = next((k for k, v in DEVICES.items() if v == p.GetParameter("Device")), "auto")
            self.ui.deviceComboBox.currentText = device
            self.sections.updateGUI(p)
            self.updateButtons()
        finally:
            self._updating = False

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updating:
            return
        wasModifying = self._parameterNode.StartModify()
        self._parameterNode.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
        self._parameterNode.SetParameter("Tasks", ",".join(self.selectedTasks()))
        self._parameterNode.SetParameter("Model", self.selectedModel())
        self._parameterNode.SetParameter("Device", DEVICES.get(self.ui.deviceComboBox.currentText, "auto"))
        self.sections.updateParameterNode(self._parameterNode)
        self._parameterNode.EndModify(wasModifying)
        self.updateModelStatus()

    def selectedTasks(self):
        return [t for t, name in TASK_CHECKBOXES.items() if getattr(self.ui, name).checked]

    def selectedModel(self):
        data = self.ui.modelComboBox.currentData
        return data if data else self.ui.modelComboBox.currentText.strip()

    def updateButtons(self):
        running = self.job is not None
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or bool(self.ui.inputSelector.currentNode() and self.selectedTasks())
        self.ui.downloadButton.enabled = not running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.sections.updateButtons(running)

    # ---------------------------------------------------------------- models
    def populateModels(self):
        self.ui.modelComboBox.clear()
        try:
            self.models = moduleLogic.model_choices()
        except Exception as e:  # noqa: BLE001 - show, do not break the module
            self.models = []
            self.appendLog(f"Could not read the model registry: {e}")
        for m in self.models:
            self.ui.modelComboBox.addItem(m["name"], m["name"])
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, m["description"], qt.Qt.ToolTipRole)
        default = next((i for i, m in enumerate(self.models) if m["default"]), 0)
        if self.models:
            self.ui.modelComboBox.currentIndex = default
        self.updateModelStatus()

    def updateModelStatus(self):
        name = self.selectedModel()
        entry = next((m for m in getattr(self, "models", []) if m["name"] == name), None)
        if entry is None:
            self.ui.modelStatusLabel.text = "Weights file" if os.path.isfile(name) else "Not a registered model or file"
        else:
            self.ui.modelStatusLabel.text = f"{entry['status']} - tasks: {', '.join(entry['tasks']) or 'none'}"

    # ---------------------------------------------------------------- running
    def ensureDependencies(self):
        return dependencies.ensure(confirm=slicer.util.confirmOkCancelDisplay, pip_install=slicer.util.pip_install,
                                   torch_installer=dependencies.slicer_torch_installer(),
                                   explain=slicer.util.errorDisplay)

    def onApplyButton(self):
        if self.job is not None:
            self.job.cancel()
            self.appendLog("Cancelled.")
            return
        if not self.ensureDependencies():
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay("BrainID could not start.", waitCursor=True):
            self.job = self.logic.start(self.ui.inputSelector.currentNode(), tasks=self.selectedTasks(),
                                        model=self.selectedModel() or None,
                                        device=DEVICES.get(self.ui.deviceComboBox.currentText, "auto"))
            self.startPolling()

    def onDownloadButton(self):
        if self.job is not None or not self.ensureDependencies():
            return
        self.job = self.logic.start_download(self.selectedModel())
        self.startPolling()

    def startPolling(self):
        self._logShown = 0
        self.ui.progressBar.value = 0
        self.updateButtons()
        self.timer.start()

    def onTimer(self):
        job = self.job
        state = job.poll()
        runner = getattr(job, "runner", job)
        self.ui.progressBar.value = int(100 * runner.fraction)
        self.ui.statusLabel.text = runner.message
        for line in runner.log[self._logShown:]:
            self.appendLog(line)
        self._logShown = len(runner.log)
        if state == "running":
            return
        self.timer.stop()
        self.job = None
        try:
            if state == "cancelled":
                self.ui.statusLabel.text = "Cancelled"
                if isinstance(job, moduleLogic.BrainIDJob):
                    job.cleanup()
            elif isinstance(job, moduleLogic.BrainIDJob):
                with slicer.util.tryWithErrorDisplay("BrainID failed.", waitCursor=True):
                    results = self.logic.finish(job)
                    self.sections.finished(results)
                    notes = "; ".join(runner.notices)
                    self.ui.statusLabel.text = f"Done: {', '.join(results)}" + (f" ({notes})" if notes else "")
            elif state == "succeeded":
                self.ui.statusLabel.text = "Download complete"
                self.populateModels()
            elif state == "failed":
                slicer.util.errorDisplay(f"Download failed: {runner.error}")
        finally:
            self.updateButtons()

    def appendLog(self, text):
        if hasattr(self, "ui"):
            self.ui.logTextEdit.appendPlainText(str(text))
        logging.info(str(text))


class BrainIDTest(ScriptedLoadableModuleTest):
    """Runs the full process on the registered sample with a tiny random-weight model: it checks the
    machinery (inputs, outputs, geometry, volumes), not segmentation quality."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BrainID_sample_full_process()

    def test_BrainID_sample_full_process(self):
        import tempfile
        import time

        import numpy as np
        import SampleData

        registerSampleData()
        self.delayDisplay("Loading the BrainID sample volume")
        volume = SampleData.downloadSample("BrainID" + moduleLogic.sample_entries()[0]["name"])
        self.assertIsNotNone(volume)
        if dependencies.missing()["torch"]:
            self.delayDisplay("PyTorch is not installed: install the PyTorch extension to run this test")
            return
        moduleLogic.ensure_importable()
        import torch

        from BrainIDLib import slicer_adapter
        from BrainIDLib.model import Architecture, BrainIDModel
        from BrainIDLib.weights import save_model

        torch.manual_seed(0)
        model = BrainIDModel(Architecture(f_maps=8, levels=3),
                             heads={"segmentation": 33, "anatomy": 1, "super_resolution": 1, "bias_field": 1})
        path = os.path.join(tempfile.mkdtemp(), "tiny-random.safetensors")
        save_model(model, path, {"name": "tiny-random", "description": "self-test only"})

        self.delayDisplay("Running all tasks (tiny random model, CPU)")
        results = BrainIDLogic().process(volume, tasks=list(TASK_CHECKBOXES), model=path, device="cpu")
        for key in ("segmentation", "volumes", "anatomy", "super_resolution", "bias_field", "bias_corrected",
                    "features_pca"):
            self.assertIn(key, results)
        ref = slicer_adapter.ijk_to_ras(volume)
        for key in ("anatomy", "super_resolution", "bias_field", "bias_corrected", "features_pca"):
            np.testing.assert_array_equal(slicer_adapter.ijk_to_ras(results[key]), ref)
            self.assertEqual(results[key].GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        labels = slicer_adapter.segmentation_to_labels(results["segmentation"], volume)
        total = sum(row[2] for row in slicer_adapter.table_rows(results["volumes"]))
        self.assertAlmostEqual(total, np.count_nonzero(labels) * abs(np.linalg.det(ref[:3, :3])) / 1000.0, places=3)

        self.delayDisplay("Running segmentation in a PythonSlicer child process (the GUI path)")
        logic = BrainIDLogic()
        job = logic.start(volume, tasks=["segmentation"], model=path, device="cpu")
        deadline = time.monotonic() + 600
        while job.poll() == "running" and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(job.state, "succeeded", "\n".join(job.runner.log[-20:]))
        child = logic.finish(job)
        agreement = np.mean(slicer_adapter.segmentation_to_labels(child["segmentation"], volume) == labels)
        self.assertGreater(agreement, 0.99)  # same model and input in both paths (float ties aside)

        self.delayDisplay("Anatomical correspondence of a point on the sample with itself")
        centre = np.array(volume.GetImageData().GetDimensions()) // 2
        match, heatmaps = logic.findCorrespondence(volume, (ref @ np.r_[centre, 1.0])[:3], model=path, device="cpu")
        self.assertEqual(match.GetNumberOfControlPoints(), 1)
        np.testing.assert_array_equal(slicer_adapter.ijk_to_ras(heatmaps[0]), ref)
        heat = slicer.util.arrayFromVolume(heatmaps[0])  # the point is among the voxels most similar to itself
        self.assertLess(np.mean(heat > heat[tuple(centre[::-1])]), 0.01)  # (random features: not exactly the top)
        self.delayDisplay("BrainID self-test passed")
