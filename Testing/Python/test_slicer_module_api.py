"""BrainID.py under slicer-core: module metadata, sample registration, the parameter node and its
defaults (also from the console), and the widget's real setup() driven with injected fake logics.
The application pieces slicer-core lacks are stand-ins (slicer_gui_fakes); the scene is real MRML."""

from __future__ import annotations

import hashlib
import importlib
import sys
import types
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest

from BrainIDLib.devices import DEVICES

from slicer_helpers import MODULE_DIR, REPO, require_slicer

slicer = require_slicer()

import slicer_gui_fakes  # noqa: E402

from BrainIDLib import slicer_adapter as sa  # noqa: E402
from BrainIDLib.errors import BrainIDError  # noqa: E402


@pytest.fixture()
def module(monkeypatch):
    sa.init_headless_scene()
    record = slicer_gui_fakes.install(monkeypatch, MODULE_DIR)
    for name in [n for n in sys.modules if n == "BrainID" or n.startswith("BrainIDModuleLib.")]:
        monkeypatch.delitem(sys.modules, name)  # bind the stand-in qt / slicer pieces at import
    brainid = importlib.import_module("BrainID")
    brainid.record = record
    yield brainid
    for name in [n for n in sys.modules if n == "BrainID" or n.startswith("BrainIDModuleLib.")]:
        sys.modules.pop(name)


def scan(name="scan", shape=(10, 11, 12)):
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    return sa.add_scalar_volume(data, name, affine=np.diag([-1.0, -1.0, 2.0, 1.0]))


def test_module_metadata_and_sample_registration(module):
    parent = types.SimpleNamespace()
    module.BrainID(parent)
    assert parent.title == "BrainID" and parent.categories == ["Segmentation"]
    assert module.CITATION in parent.acknowledgementText
    (signal, register), = module.record.connections
    assert signal == "startupCompleted()"
    register()
    (sample,) = module.record.samples
    assert f"Sample Data module >\nBrainID > {sample['sampleName']}." in (REPO / "README.md").read_text()
    assert sample["category"] == "BrainID" and Path(sample["thumbnailFileName"]).is_file()
    data = Path(url2pathname(urlparse(sample["uris"]).path)).read_bytes()
    assert sample["checksums"] == "SHA256:" + hashlib.sha256(data).hexdigest()


class FakeEngine:
    """BrainIDModuleLib.engine.run's interface: Left-Hippocampus wherever the scan is bright."""

    def __init__(self):
        self.calls = []

    def run(self, image, tasks, **kw):
        from BrainIDModuleLib.engine import EngineResult

        self.calls.append({"tasks": tasks, **kw})
        data = np.asanyarray(image.dataobj)
        return EngineResult({"segmentation": np.where(data > 0.5, 17, 0).astype(np.int16), "anatomy": data * 2})


def test_parameter_node_defaults_and_console_process(module):
    from BrainIDModuleLib.predict_logic import PredictLogic

    engine = FakeEngine()
    logic = module.BrainIDLogic(predict=PredictLogic(engine=engine, log=lambda m: None))
    params = logic.getParameterNode()
    assert params.tasks() == ["segmentation"] and params.device == "auto" and params.qc
    assert params.flipAverage == "auto" and params.modelName == "" and params.headName == "few-shot"
    node = scan()
    results = logic.process(node)  # console use: nothing but the volume
    call, = engine.calls
    assert call["tasks"] == ("segmentation",) and call["model"] is None and call["device"] == "auto"
    assert call["qc"] is True and call["flipAverage"] == "auto"
    assert results["segmentation"].GetSegmentation().GetNthSegment(0).GetName() == "Left-Hippocampus"
    np.testing.assert_allclose(sa.array_from_volume(results["anatomy"])[0], sa.array_from_volume(node)[0] * 2)
    assert set(module.BrainIDLogic().getParameterNode().allParameters) == set(params.allParameters)


# ---------------------------------------------------------------- the widget with fake logics


class FakeRunner:
    def __init__(self):
        self.state, self.fraction, self.message, self.log, self.error, self.notices = "running", 0.0, "", [], None, []
        self.cancelled = False

    def poll(self):
        return self.state

    def cancel(self):
        self.cancelled, self.state = True, "cancelled"


class FakeLogic:
    """Records each start*/load/save call and hands back a real jobs.Job over a FakeRunner whose
    completion callback returns `results` (or raises when `fail` is set)."""

    def __init__(self, results=None, head=None):
        self.calls, self.results, self.fail, self.fewShotHead, self.lastMatches = [], results or {}, None, head, []
        self.runner = None

    def _job(self, _method, *args, **kw):
        from BrainIDModuleLib.jobs import Job

        self.calls.append((_method, args, kw))
        self.runner = FakeRunner()

        def done(job):
            if self.fail:
                raise BrainIDError(self.fail)
            return self.results

        return Job(self.runner, done, Path("unused"), ownWorkdir=False)

    def __getattr__(self, name):
        if name.startswith("start"):
            return lambda *args, **kw: self._job(name, *args, **kw)
        raise AttributeError(name)

    def loadHead(self, path):
        self.calls.append(("loadHead", (path,), {}))
        self.fewShotHead = types.SimpleNamespace(name="loaded head", summary=lambda: "loaded head: 1=Core")
        return self.fewShotHead

    def saveHead(self, head, path):
        self.calls.append(("saveHead", (head, path), {}))
        return Path(path + ".safetensors")


@pytest.fixture()
def widget(module):
    logics = {"predictLogic": FakeLogic({"segmentation": object(), "volumes": object()}),
              "correspondenceLogic": FakeLogic({"match": object()}), "fewShotLogic": FakeLogic()}
    w = module.BrainIDWidget(None, **logics)
    w.first = scan("first")
    w.setup()
    w.fakes = types.SimpleNamespace(**logics)
    return w


def finish(w, runner, state="succeeded"):
    runner.state, runner.fraction = state, 1.0
    w.panel.onTimer()


def test_widget_setup_binds_the_parameter_node_both_ways(widget, module):
    ui, p = widget.ui, widget._parameterNode
    bound = {w.property("SlicerParameterName") for w in vars(ui).values()} - {None}
    assert bound == set(p.allParameters) - {"modelName"}  # the editable model box is synced by the panel
    assert [t for t, _ in ui.deviceComboBox.items] == list(DEVICES) and "mps" in DEVICES
    assert p.inputVolume is widget.first and ui.inputSelector.currentNode() is widget.first
    assert ui.segmentationCheckBox.checked and ui.applyButton.enabled and ui.applyButton.text == "Apply"
    ui.anatomyCheckBox.checked = True  # the GUI drives the parameter node ...
    ui.deviceComboBox.currentIndex = DEVICES.index("mps")
    assert p.tasks() == ["segmentation", "anatomy"] and p.device == "mps"
    p.anatomy, p.segmentation = False, False  # ... and the parameter node drives the GUI
    assert not ui.anatomyCheckBox.checked and not ui.segmentationCheckBox.checked
    assert not ui.applyButton.enabled  # no task: nothing to apply
    assert ui.modelComboBox.currentText == "brainid-lite" and p.modelName == "brainid-lite"  # the registry default
    ui.modelComboBox.setEditText("/nowhere/weights.safetensors")
    assert p.modelName == "/nowhere/weights.safetensors"
    assert ui.modelStatusLabel.text == "Not a registered model or file"
    assert {"brainid-lite", "official"} <= {name for name, _ in ui.modelComboBox.items}


def test_apply_runs_one_job_polls_it_and_imports_through_its_own_callback(widget, module):
    ui, predict = widget.ui, widget.fakes.predictLogic
    ui.biasFieldCheckBox.checked = True
    ui.flipAverageComboBox.currentIndex = 2  # "off"
    ui.qcCheckBox.checked = False
    ui.applyButton.click()
    (name, args, kw), = predict.calls
    assert name == "start" and args == (widget.first,)
    assert kw == {"tasks": ["segmentation", "bias_field"], "qc": False, "flipAverage": "off",
                  "model": "brainid-lite", "device": "auto"}
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled and widget.panel.timer.active
    assert not ui.findMatchButton.enabled and not ui.downloadButton.enabled and not ui.inputsCollapsibleButton.enabled
    predict.runner.fraction, predict.runner.message, predict.runner.log = 0.5, "network", ["$ python -m ...", "INFO x"]
    widget.panel.onTimer()
    assert ui.progressBar.value == 50 and ui.statusLabel.text == "network"
    assert ui.logTextEdit.lines[-2:] == ["$ python -m ...", "INFO x"]
    widget.panel.onTimer()
    assert ui.logTextEdit.lines.count("INFO x") == 1  # each log line once
    predict.runner.notices = ["GPU out of memory: tiled"]
    finish(widget, predict.runner)
    assert ui.statusLabel.text == "Done: segmentation, volumes (GPU out of memory: tiled)"
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled and not widget.panel.timer.active
    assert not module.record.errors


def test_cancel_is_not_an_error_and_a_failure_is_shown(widget, module):
    ui, predict = widget.ui, widget.fakes.predictLogic
    ui.applyButton.click()
    ui.applyButton.click()  # the same button, now "Cancel"
    assert predict.runner.cancelled
    widget.panel.onTimer()
    assert ui.statusLabel.text == "Cancelled" and ui.applyButton.text == "Apply" and not module.record.errors
    predict.fail = "brainid: error: input.nii is constant"
    ui.applyButton.click()
    finish(widget, predict.runner)
    assert module.record.errors == ["BrainID failed. brainid: error: input.nii is constant"]
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled


def test_sections_start_their_own_logics_jobs(widget, module):
    ui, p = widget.ui, widget._parameterNode
    corr, fewshot = widget.fakes.correspondenceLogic, widget.fakes.fewShotLogic
    assert not ui.findMatchButton.enabled and not ui.trainHeadButton.enabled and not ui.applyHeadButton.enabled
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    other = scan("other")
    ui.pointSelector.setCurrentNode(points)
    assert p.points is points and ui.pointPlaceWidget.currentNode() is points and ui.findMatchButton.enabled
    ui.targetVolumesSelector.check(other)
    ui.findMatchButton.click()
    (name, args, kw), = corr.calls
    assert name == "startCorrespondence" and args == (widget.first, points, [other])
    assert ui.findMatchButton.text == "Cancel" and not ui.applyButton.enabled  # one job at a time
    ui.applyButton.click()
    assert not widget.fakes.predictLogic.calls
    finish(widget, corr.runner)
    assert ui.findMatchButton.text == "Find match" and ui.statusLabel.text == "Done: match"

    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    ui.fewShotSegmentationsSelector.check(seg)
    ui.headNameLineEdit.text = "hippo"
    assert p.headName == "hippo" and ui.trainHeadButton.enabled
    ui.trainHeadButton.click()
    assert not module.record.errors
    name, args, kw = fewshot.calls[-1]
    assert name == "startFewShotTrain" and args == ([seg], [widget.first]) and kw["name"] == "hippo"
    finish(widget, fewshot.runner)
    assert not ui.applyHeadButton.enabled and not ui.saveHeadButton.enabled and ui.headLabel.text == "none"
    module.record.file_answers[:] = ["/tmp/h.safetensors", "/tmp/copy"]
    ui.loadHeadButton.click()
    assert p.headName == "loaded head" and ui.headLabel.text == "loaded head: 1=Core"
    assert ui.applyHeadButton.enabled and ui.saveHeadButton.enabled
    ui.saveHeadButton.click()
    assert fewshot.calls[-1][0] == "saveHead" and ui.statusLabel.text == "Head saved to /tmp/copy.safetensors"
    ui.applyHeadButton.click()
    assert fewshot.calls[-1][:2] == ("startFewShotApply", (widget.first,))
    assert not module.record.errors


def test_download_lists_the_models_again_when_done(widget, monkeypatch):
    from BrainIDModuleLib import panel

    ui, predict = widget.ui, widget.fakes.predictLogic
    ui.downloadButton.click()
    assert predict.calls[-1][:2] == ("startDownload", ("brainid-lite",))
    monkeypatch.setattr(panel, "model_choices", lambda: [{"name": "new", "description": "", "tasks": ["segmentation"],
                                                          "status": "cached", "default": True}])
    finish(widget, predict.runner)
    assert ui.modelComboBox.items == [("new", "new")] and ui.modelStatusLabel.text == "cached - tasks: segmentation"


# ---------------------------------------------------------------- the widget with the real logics (child processes)


def tiny_model_file(tmp_path):
    import torch

    from BrainIDLib.model import Architecture, BrainIDModel
    from BrainIDLib.weights import save_model

    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=8, levels=3), heads={"segmentation": 33, "anatomy": 1})
    return str(save_model(model, tmp_path / "tiny.safetensors", {"name": "tiny-random"}))


def drive(w, timeout=240):
    import time

    deadline = time.monotonic() + timeout
    while w.panel.job is not None:
        w.panel.onTimer()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_widget_apply_with_the_real_logic_runs_one_child_process(module, tmp_path):
    node = scan("scan", (24, 20, 16))
    w = module.BrainIDWidget(None)
    w.setup()
    ui = w.ui
    ui.anatomyCheckBox.checked = ui.featuresPcaCheckBox.checked = True
    ui.modelComboBox.setEditText(tiny_model_file(tmp_path))
    ui.deviceComboBox.currentIndex = DEVICES.index("cpu")
    assert ui.modelStatusLabel.text == "Weights file"
    ui.applyButton.click()
    assert len(w.panel.job.runner.commands) == 1  # one process: PCA from the same network pass
    drive(w)
    assert not module.record.errors, module.record.errors + ui.logTextEdit.lines[-10:]
    assert ui.progressBar.value == 100 and ui.statusLabel.text.startswith("Done: ")
    for suffix in ("segmentation", "synthetic T1", "features PCA", "QC uncertainty", "structure volumes"):
        assert slicer.mrmlScene.GetFirstNodeByName(f"scan {suffix}") is not None, suffix
    assert slicer.mrmlScene.GetFirstNodeByName("scan features PCA").IsA("vtkMRMLVectorVolumeNode")
    assert node.GetName() == "scan"


@pytest.mark.slow
def test_widget_find_match_train_and_segment_through_the_cli(module, tmp_path):
    """The sections with the real logics: each button runs `brainid correspond|fewshot` in a child process."""
    from BrainIDModuleLib.correspondence_logic import CorrespondenceLogic
    from BrainIDModuleLib.fewshot_logic import FewShotLogic

    node = scan("scan", (24, 20, 16))
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    for name, (lo, hi) in {"Core": ((8, 8, 6), (14, 12, 10)), "Rim": ((0, 0, 0), (24, 3, 16))}.items():
        mask = np.zeros((24, 20, 16), bool)
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        sa.set_segment_mask(seg, seg.GetSegmentation().AddEmptySegment("", name), mask, node)
    other = scan("other", (16, 18, 14))
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.AddControlPoint(*(sa.ijk_to_ras(node) @ np.array([10.0, 9.0, 7.0, 1.0]))[:3].tolist())
    cache = tmp_path / "features"
    w = module.BrainIDWidget(None, correspondenceLogic=CorrespondenceLogic(featureCacheDir=cache),
                             fewShotLogic=FewShotLogic(featureCacheDir=cache))
    w.setup()
    ui = w.ui
    ui.pointSelector.setCurrentNode(points)
    ui.targetVolumesSelector.check(other)
    ui.fewShotSegmentationsSelector.check(seg)
    ui.headNameLineEdit.text = "parts"
    ui.modelComboBox.setEditText(tiny_model_file(tmp_path))
    ui.deviceComboBox.currentIndex = DEVICES.index("cpu")

    ui.findMatchButton.click()
    drive(w)
    assert not module.record.errors, module.record.errors + ui.logTextEdit.lines[-10:]
    assert slicer.mrmlScene.GetFirstNodeByName("BrainID match").GetNumberOfControlPoints() == 2
    heat = slicer.mrmlScene.GetFirstNodeByName("other BrainID similarity")
    np.testing.assert_array_equal(sa.ijk_to_ras(heat), sa.ijk_to_ras(other))
    assert any(f.suffix == ".safetensors" for f in cache.iterdir())  # the on-disk feature cache

    ui.trainHeadButton.click()
    drive(w)
    assert not module.record.errors, module.record.errors + ui.logTextEdit.lines[-10:]
    assert ui.headLabel.text.startswith("parts: 1=Core") and ui.applyHeadButton.enabled

    ui.inputSelector.setCurrentNode(other)
    ui.applyHeadButton.click()
    drive(w)
    assert not module.record.errors, module.record.errors + ui.logTextEdit.lines[-10:]
    out = slicer.mrmlScene.GetFirstNodeByName("other parts")
    assert out is not None and {n for _, n, _ in sa.segments_of(out)} <= {"Core", "Rim"}
