"""BrainID.py's Qt-free parts under slicer-core: module metadata, sample registration, and the
console API `BrainID.BrainIDLogic().process(...)`. Qt and Slicer's ScriptedLoadableModule base
classes are replaced by minimal stand-ins (the real ones need the Slicer application)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from slicer_helpers import require_slicer

slicer = require_slicer()

from BrainIDLib import slicer_adapter as sa  # noqa: E402


class _Logic:
    def __init__(self, parent=None):
        self.moduleName = "BrainID"

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode("BrainID", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag("BrainID")
            node.SetModuleName("BrainID")
            node = slicer.mrmlScene.AddNode(node)
        self.setDefaultParameters(node)
        return node


@pytest.fixture()
def brainid_module(monkeypatch):
    sa.init_headless_scene()
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: setattr(self, "parent", parent)})
    slm.ScriptedLoadableModuleLogic = _Logic
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = type("SampleDataLogic", (), {
        "registerCustomSampleDataSource": staticmethod(lambda **kw: registered.append(kw))})
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    connections = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda sig, fn: connections.append((sig, fn))),
                        raising=False)
    sys.modules.pop("BrainID", None)
    module = importlib.import_module("BrainID")
    module._registered, module._connections = registered, connections
    yield module
    sys.modules.pop("BrainID", None)


def test_module_metadata_and_sample_registration(brainid_module):
    parent = types.SimpleNamespace()
    brainid_module.BrainID(parent)
    assert parent.title == "BrainID" and parent.categories
    assert brainid_module.CITATION in parent.acknowledgementText
    (signal, fn), = brainid_module._connections
    assert signal == "startupCompleted()"
    fn()
    (kw,) = brainid_module._registered
    assert kw["uris"].startswith("file://") and kw["checksums"].startswith("SHA256:")
    assert Path(kw["thumbnailFileName"]).is_file()
    import hashlib
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    data = Path(url2pathname(urlparse(kw["uris"]).path)).read_bytes()
    assert kw["checksums"] == "SHA256:" + hashlib.sha256(data).hexdigest()


def test_console_api_process_and_parameter_defaults(brainid_module):
    import nibabel as nib

    node = sa.add_scalar_volume(np.random.default_rng(0).random((10, 11, 12)).astype(np.float32), "scan",
                                affine=np.diag([-1.0, -1.0, 2.0, 1.0]))

    class Prediction:
        def __init__(self, outputs):
            self.outputs = outputs

    def predict(image, tasks, **kw):
        data = np.asanyarray(image.dataobj)
        seg = np.where(data > 0.5, 17, 0).astype(np.int16)
        return Prediction({"segmentation": nib.Nifti1Image(seg, image.affine),
                           "anatomy": nib.Nifti1Image(data * 2, image.affine)})

    logic = brainid_module.BrainIDLogic(predict=predict)
    params = logic.getParameterNode()
    assert params.GetParameter("Tasks") == "segmentation" and params.GetParameter("Device") == "auto"
    results = logic.process(node, tasks=["segmentation", "anatomy"], device="cpu")
    assert results["segmentation"].GetSegmentation().GetNthSegment(0).GetName() == "Left-Hippocampus"
    np.testing.assert_array_equal(sa.ijk_to_ras(results["anatomy"]), sa.ijk_to_ras(node))
    np.testing.assert_allclose(sa.array_from_volume(results["anatomy"])[0], sa.array_from_volume(node)[0] * 2, rtol=1e-6)


def test_parameter_node_survives_saving_the_scene(brainid_module, tmp_path):
    node = sa.add_scalar_volume(np.ones((4, 4, 4), np.float32), "scan")
    params = brainid_module.BrainIDLogic().getParameterNode()
    params.SetNodeReferenceID("InputVolume", node.GetID())
    params.SetParameter("Tasks", "segmentation,anatomy")
    params.SetParameter("Model", "official")
    params.SetParameter("Device", "cpu")
    scene = slicer.mrmlScene
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    restored = sa.init_headless_scene()
    restored.SetURL(str(tmp_path / "scene.mrml"))
    assert restored.Connect()
    again = restored.GetSingletonNode("BrainID", "vtkMRMLScriptedModuleNode")
    assert again is not None
    assert again.GetParameter("Tasks") == "segmentation,anatomy"
    assert again.GetParameter("Model") == "official" and again.GetParameter("Device") == "cpu"
    assert again.GetNodeReference("InputVolume").GetName() == "scan"
