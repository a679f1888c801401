"""BrainID: Brain-ID (ECCV 2024) in 3D Slicer. The module shell (metadata, widget wiring, self-test); the
work is in BrainIDModuleLib and BrainIDLib. Console: `BrainID.BrainIDLogic().process(getNode("MRHead"))`.
"""

import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from BrainIDModuleLib.correspondence_logic import CorrespondenceLogic
from BrainIDModuleLib.fewshot_logic import FewShotLogic
from BrainIDModuleLib.jobs import JobLauncher
from BrainIDModuleLib.panel import Panel
from BrainIDModuleLib.parameters import BrainIDParameterNode
from BrainIDModuleLib.predict_logic import PredictLogic
from BrainIDModuleLib.sections import CorrespondenceSection, FewShotSection

CITATION = ("Liu P, Puonti O, Hu X, Alexander DC, Iglesias JE. Brain-ID: Learning Contrast-agnostic Anatomical "
            "Representations for Brain Imaging. ECCV 2024.")


class BrainID(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainID"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["BrainID contributors"]
        self.parent.helpText = (
            "Brain-ID features for scans of any contrast and resolution: segmentation with volumes and QC, T1 "
            "synthesis, super-resolution, bias-field correction, feature PCA, anatomical correspondence and few-shot "
            "segmentation. See <a href='https://github.com/peirong26/Brain-ID'>Brain-ID</a>.")
        self.parent.acknowledgementText = (
            "BrainID implements the method of: " + CITATION + " Sample data: MNI ICBM152 2009a template "
            "(copyright McConnell Brain Imaging Centre; see Resources/SampleData/LICENSE-MNI152.txt).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped sample in the Sample Data module as BrainID > MNI152Brain (file:// URI, SHA-256 checked)."""
    import SampleData

    from BrainIDLib.resources import resource_path
    from BrainIDLib.samples import sample_manifest

    sample = sample_manifest()[0]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="BrainID", sampleName=sample["name"], nodeNames=sample["name"], fileNames=sample["filename"],
        uris=resource_path("SampleData", sample["filename"]).as_uri(), checksums=f"SHA256:{sample['sha256']}",
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "BrainID.png"))


class BrainIDLogic(ScriptedLoadableModuleLogic):
    """The parameter node and the three logics, sharing one job launcher (and one feature cache)."""

    def __init__(self, predict=None, correspondence=None, fewShot=None, log=print):
        ScriptedLoadableModuleLogic.__init__(self)
        launcher = JobLauncher()
        self.predict = predict or PredictLogic(launcher, log=log)
        self.correspondence = correspondence or CorrespondenceLogic(launcher, log=log)
        self.fewShot = fewShot or FewShotLogic(launcher, log=log, featureCache=lambda: self.correspondence.featureCache)

    def getParameterNode(self):
        return BrainIDParameterNode(super().getParameterNode())

    def process(self, inputVolumeNode, **kwargs) -> dict:
        """Blocking run in this process (see PredictLogic.process); defaults: segmentation, default model."""
        return self.predict.process(inputVolumeNode, **kwargs)


class BrainIDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None, predictLogic=None, correspondenceLogic=None, fewShotLogic=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._logics = (predictLogic, correspondenceLogic, fewShotLogic)
        self._parameterNode = self._guiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainID.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainIDLogic(*self._logics, log=lambda text: self.panel.appendLog(text))
        self.panel = Panel(self.ui, self.logic.predict, qt.QTimer())
        self.panel.setup(CorrespondenceSection(self.panel, self.logic.correspondence),
                         FewShotSection(self.panel, self.logic.fewShot))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, lambda *a: self.setParameterNode(None))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self.parent.isEntered and self.enter())
        self.enter()

    def enter(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputVolume is None:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def cleanup(self):
        self.panel.cleanup()
        self.setParameterNode(None)
        self.removeObservers()

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.panel.onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._guiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.panel.onParameterNodeModified)
        self.panel.setParameterNode(parameterNode)


class BrainIDTest(ScriptedLoadableModuleTest):
    """The sample through both paths (this process, and the child process of Apply) with a tiny random
    model: the machinery (outputs, geometry, one engine), not segmentation quality."""

    def runTest(self):
        import tempfile

        import numpy as np
        import SampleData
        import torch

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.model import Architecture, BrainIDModel
        from BrainIDLib.samples import sample_manifest
        from BrainIDLib.weights import save_model

        slicer.mrmlScene.Clear()
        registerSampleData()
        volume = SampleData.downloadSample(sample_manifest()[0]["name"])
        torch.manual_seed(0)
        model = BrainIDModel(Architecture(f_maps=8, levels=3), heads={"segmentation": 33, "anatomy": 1})
        path = str(save_model(model, os.path.join(tempfile.mkdtemp(), "tiny.safetensors"), {"name": "tiny-random"}))
        options = {"tasks": ["segmentation", "anatomy", "features_pca"], "model": path, "device": "cpu"}
        job = BrainIDLogic().predict.start(volume, **options)
        self.assertEqual(job.runner.wait(timeout=600), "succeeded", "\n".join(job.runner.log[-20:]))
        both = (BrainIDLogic().process(volume, **options), job.finish())
        for results in both:
            self.assertEqual(set(results), {"segmentation", "volumes", "uncertainty", "anatomy", "features_pca"})
            np.testing.assert_array_equal(sa.ijk_to_ras(results["features_pca"]), sa.ijk_to_ras(volume))
        same = np.mean(sa.segmentation_to_labels(both[0]["segmentation"], volume)
                       == sa.segmentation_to_labels(both[1]["segmentation"], volume))
        self.assertGreater(same, 0.99)  # one engine in both paths
