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
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {
        "__init__": lambda self, parent=None: setattr(self, "parent", parent)})
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, Checked=2, Unchecked=0)
    qt.QFileDialog = types.SimpleNamespace(answers=[])  # tests queue the paths a file dialog returns
    qt.QFileDialog.getSaveFileName = qt.QFileDialog.getOpenFileName = lambda *a: qt.QFileDialog.answers.pop(0)
    monkeypatch.setitem(sys.modules, "qt", qt)
    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = type("SampleDataLogic", (), {
        "registerCustomSampleDataSource": staticmethod(lambda **kw: registered.append(kw))})
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    connections = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda sig, fn: connections.append((sig, fn))),
                        raising=False)
    sys.modules.pop("BrainID", None)
    sys.modules.pop("BrainIDModuleLib.sections", None)  # binds the stand-in qt at import
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


# ---------------------------------------------------------------- widget state machine (fake Qt widgets)


class FakeWidget:
    """Just the properties/methods BrainIDWidget touches, for every widget in BrainID.ui."""

    def __init__(self, name):
        self.name, self.text, self.enabled, self.checked, self.value = name, "", True, False, 0
        self.items, self.currentIndex, self.lines, self.node = [], -1, [], None

    def connect(self, *args):
        pass

    # qMRMLNodeComboBox
    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node

    @property
    def currentNodeID(self):
        return self.node.GetID() if self.node else None

    # QComboBox
    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self.items, self.currentIndex, self.lines = [], -1, []

    def setItemData(self, *args):
        pass

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setEditText(self, text):
        self.items.append((text, None))
        self.currentIndex = len(self.items) - 1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if self.currentIndex >= 0 else None

    @property
    def currentText(self):
        return self.items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    @currentText.setter
    def currentText(self, text):
        self.currentIndex = next((i for i, (t, _) in enumerate(self.items) if t == text), self.currentIndex)

    # QPlainTextEdit
    def appendPlainText(self, line):
        self.lines.append(line)

    # qMRMLCheckableNodeComboBox (offers every node of its class in the scene)
    node_class = None
    checked_ids = ()

    def _nodes(self):
        scene = slicer.mrmlScene
        return [scene.GetNthNodeByClass(i, self.node_class) for i in range(scene.GetNumberOfNodesByClass(self.node_class))]

    def nodeCount(self):
        return len(self._nodes())

    def nodeFromIndex(self, i):
        return self._nodes()[i]

    def setCheckState(self, node, state):
        ids = set(self.checked_ids) - {node.GetID()}
        self.checked_ids = ids | ({node.GetID()} if state == 2 else set())

    def checkedNodes(self):
        return [n for n in self._nodes() if n.GetID() in set(self.checked_ids)]


@pytest.fixture()
def widget(brainid_module, monkeypatch):
    import contextlib
    import xml.etree.ElementTree as ET

    from slicer_helpers import MODULE_DIR

    errors = []

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded like Slicer's error popup
            errors.append(f"{message} {e}")

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)
    w = brainid_module.BrainIDWidget(None)  # setup() (Qt) is replaced by the lines below
    names = {e.get("name") for e in ET.parse(MODULE_DIR / "Resources" / "UI" / "BrainID.ui").getroot().iter("widget")}
    w.ui = types.SimpleNamespace(**{n: FakeWidget(n) for n in names})
    w.ui.targetVolumesSelector.node_class = "vtkMRMLScalarVolumeNode"
    w.ui.fewShotSegmentationsSelector.node_class = "vtkMRMLSegmentationNode"
    w.logic = brainid_module.BrainIDLogic(log=w.appendLog)
    w.sections = importlib.import_module("BrainIDModuleLib.sections").Sections(w)
    w.timer = types.SimpleNamespace(start=lambda: None, stop=lambda: None)
    for label in brainid_module.DEVICES:
        w.ui.deviceComboBox.addItem(label)
    w.populateModels()
    w.errors = errors
    return w


def drive(w, timeout=240):
    import time

    deadline = time.monotonic() + timeout
    while w.job is not None:
        w.onTimer()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def tiny_model_file(tmp_path):
    import torch

    from BrainIDLib.model import Architecture, BrainIDModel
    from BrainIDLib.weights import save_model

    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=8, levels=3), heads={"segmentation": 33, "anatomy": 1})
    return str(save_model(model, tmp_path / "tiny.safetensors", {"name": "tiny-random"}))


@pytest.mark.slow
def test_widget_apply_runs_polls_and_imports(widget, tmp_path):
    node = sa.add_scalar_volume(np.random.default_rng(0).random((24, 20, 16)).astype(np.float32) * 100, "scan",
                                affine=np.diag([1.2, 1.2, 2.0, 1.0]))
    widget.initializeParameterNode()  # defaults -> GUI; the input is the scene's first volume
    assert widget.ui.inputSelector.currentNode() is node and widget.ui.segmentationCheckBox.checked
    widget.ui.anatomyCheckBox.checked = True
    widget.ui.modelComboBox.setEditText(tiny_model_file(tmp_path))
    widget.ui.deviceComboBox.currentText = "CPU"
    widget.updateParameterNodeFromGUI()  # what the widgets' signals trigger
    params = widget._parameterNode
    assert params.GetParameter("Tasks") == "segmentation,anatomy" and params.GetParameter("Device") == "cpu"
    assert widget.ui.modelStatusLabel.text == "Weights file"

    widget.onApplyButton()
    assert widget.job is not None and widget.ui.applyButton.text == "Cancel"
    assert not widget.ui.inputsCollapsibleButton.enabled
    drive(widget)
    assert not widget.errors, widget.errors
    assert widget.ui.applyButton.text == "Apply" and widget.ui.progressBar.value == 100
    assert widget.ui.statusLabel.text.startswith("Done: segmentation")
    assert any(line.startswith("$ ") for line in widget.ui.logTextEdit.lines)  # the command is logged
    assert slicer.mrmlScene.GetFirstNodeByName("scan segmentation") is not None
    assert slicer.mrmlScene.GetFirstNodeByName("scan synthetic T1") is not None


@pytest.mark.slow
def test_widget_cancel_and_error(widget, tmp_path):
    node = sa.add_scalar_volume(np.random.default_rng(0).random((90, 90, 90)).astype(np.float32), "big")
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.segmentationCheckBox.checked = True
    widget.ui.modelComboBox.setEditText(tiny_model_file(tmp_path))
    widget.ui.deviceComboBox.currentText = "CPU"
    widget.onApplyButton()
    widget.onApplyButton()  # the same button, now "Cancel"
    drive(widget)
    assert widget.ui.statusLabel.text == "Cancelled" and widget.ui.applyButton.text == "Apply"
    assert not widget.errors  # a user cancel is not an error popup
    assert slicer.mrmlScene.GetFirstNodeByName("big segmentation") is None

    flat = sa.add_scalar_volume(np.full((16, 16, 16), 3.0, np.float32), "flat")
    widget.ui.inputSelector.setCurrentNode(flat)
    widget.onApplyButton()
    drive(widget)
    assert len(widget.errors) == 1 and "brainid: error:" in widget.errors[0]


# ---------------------------------------------------------------- correspondence and few-shot sections


def painted_scan(name="scan", shape=(24, 20, 16)):
    rng = np.random.default_rng(1)
    node = sa.add_scalar_volume((rng.random(shape) * 100).astype(np.float32), name,
                                affine=np.array([[-1.2, 0, 0.2, 10], [0, -1.1, 0, 4], [0.1, 0, 1.8, -6], [0, 0, 0, 1]]))
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name + " painted")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    for seg_name, (lo, hi) in {"Core": ((8, 8, 6), (14, 12, 10)), "Rim": ((0, 0, 0), (24, 3, 16))}.items():
        sid = seg.GetSegmentation().AddEmptySegment("", seg_name)
        mask = np.zeros(shape, bool)
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        sa.set_segment_mask(seg, sid, mask, node)
    return node, seg


def test_widget_sections_parameter_node_buttons_and_head_files(widget, tmp_path):
    import torch

    from BrainIDLib.fewshot import FewShotHead

    node, seg = painted_scan()
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    other = sa.add_scalar_volume(np.random.default_rng(2).random((10, 10, 10)).astype(np.float32), "other")
    widget.initializeParameterNode()
    ui = widget.ui
    assert ui.headNameLineEdit.text == "few-shot" and ui.heatmapCheckBox.checked  # defaults
    assert not ui.findMatchButton.enabled and not ui.trainHeadButton.enabled and not ui.applyHeadButton.enabled
    ui.pointSelector.setCurrentNode(points)
    ui.targetVolumesSelector.setCheckState(other, 2)
    ui.fewShotSegmentationsSelector.setCheckState(seg, 2)
    ui.headNameLineEdit.text = "blob parts"
    ui.heatmapCheckBox.checked = False
    widget.updateParameterNodeFromGUI()
    p = widget._parameterNode
    assert p.GetNodeReference("CorrespondencePoints") is points
    assert p.GetNodeReference("CorrespondenceTarget") is other and p.GetNodeReference("FewShotSegmentation") is seg
    assert p.GetParameter("HeadName") == "blob parts" and p.GetParameter("ShowHeatmap") == "false"
    # the GUI follows the parameter node (e.g. a scene reloaded)
    ui.targetVolumesSelector.checked_ids, ui.pointSelector.node, ui.headNameLineEdit.text = (), None, ""
    widget.updateGUIFromParameterNode()
    assert ui.targetVolumesSelector.checkedNodes() == [other] and ui.pointSelector.currentNode() is points
    assert ui.headNameLineEdit.text == "blob parts" and not ui.heatmapCheckBox.checked
    assert ui.findMatchButton.enabled and ui.trainHeadButton.enabled
    assert not ui.applyHeadButton.enabled and not ui.saveHeadButton.enabled and ui.headLabel.text == "none"

    head = FewShotHead(torch.zeros(3, 8), torch.zeros(3), [1, 2], ["Core", "Rim"], [(255, 0, 0), (0, 0, 255)],
                       "blob parts", backbone={"name": "tiny"})
    head.save(tmp_path / "h.safetensors")
    qt = sys.modules["qt"]
    qt.QFileDialog.answers[:] = [str(tmp_path / "h.safetensors"), str(tmp_path / "copy")]
    widget.sections.onLoadHead()
    assert widget.logic.fewShotHead.names == ["Core", "Rim"] and ui.headLabel.text.startswith("blob parts: 1=Core")
    assert ui.applyHeadButton.enabled and ui.saveHeadButton.enabled
    widget.sections.onSaveHead()
    assert (tmp_path / "copy.safetensors").is_file() and "copy.safetensors" in ui.statusLabel.text
    assert not widget.errors, widget.errors


@pytest.mark.slow
def test_widget_find_match_train_and_segment_through_the_cli(widget, tmp_path):
    """The GUI path end to end: each button runs `brainid correspond|fewshot` in a child process."""
    import BrainIDLib.cli

    if "def cmd_correspond" not in Path(BrainIDLib.cli.__file__).read_text():
        pytest.skip("this checkout's CLI has no `brainid correspond` / `fewshot` yet")
    node, seg = painted_scan()
    other = sa.add_scalar_volume(np.random.default_rng(3).random((16, 18, 14)).astype(np.float32) * 50, "other",
                                 affine=np.diag([1.5, 1.5, 1.5, 1.0]))
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.AddControlPoint(*(sa.ijk_to_ras(node) @ np.array([10.0, 9.0, 7.0, 1.0]))[:3].tolist())
    widget.logic.featureCacheDir = str(tmp_path / "features")
    widget.initializeParameterNode()
    ui = widget.ui
    ui.inputSelector.setCurrentNode(node)
    ui.pointSelector.setCurrentNode(points)
    ui.targetVolumesSelector.setCheckState(other, 2)
    ui.fewShotSegmentationsSelector.setCheckState(seg, 2)
    ui.headNameLineEdit.text = "parts"
    ui.modelComboBox.setEditText(tiny_model_file(tmp_path))
    ui.deviceComboBox.currentText = "CPU"
    widget.updateParameterNodeFromGUI()

    widget.sections.onFindMatch()
    assert widget.job is not None and ui.findMatchButton.text == "Cancel" and not ui.trainHeadButton.enabled
    drive(widget)
    assert not widget.errors, widget.errors + ui.logTextEdit.lines[-10:]
    assert ui.findMatchButton.text == "Find match" and ui.progressBar.value == 100
    match = slicer.mrmlScene.GetFirstNodeByName("BrainID match")
    assert match.GetNumberOfControlPoints() == 2
    heat = slicer.mrmlScene.GetFirstNodeByName("other BrainID similarity")
    np.testing.assert_array_equal(sa.ijk_to_ras(heat), sa.ijk_to_ras(other))
    assert any(f.suffix == ".safetensors" for f in (tmp_path / "features").iterdir())  # the session's feature cache

    widget.sections.onTrainHead()
    drive(widget)
    assert not widget.errors, widget.errors + ui.logTextEdit.lines[-10:]
    head = widget.logic.fewShotHead
    assert head.name == "parts" and head.names == ["Core", "Rim"] and ui.headLabel.text.startswith("parts: 1=Core")
    colors = {n: c for _, n, c in sa.segments_of(seg)}
    assert head.colors[0] == tuple(round(v * 255) for v in colors["Core"])  # the painted colours

    ui.inputSelector.setCurrentNode(other)
    widget.sections.onApplyHead()
    drive(widget)
    assert not widget.errors, widget.errors + ui.logTextEdit.lines[-10:]
    out = slicer.mrmlScene.GetFirstNodeByName("other parts")
    assert out is not None and {n for _, n, _ in sa.segments_of(out)} <= {"Core", "Rim"}
