"""PredictLogic against slicer-core with a tiny random-weight model: the machinery, not the quality.

Blocking `process()` in this process, and the GUI path (`start`, then the job's `poll`/`finish`)
running the same engine in one child process; results on the input's exact geometry, volumes that
add up, cancel, and clear messages for bad input.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from slicer_helpers import require_slicer

slicer = require_slicer()

from BrainIDModuleLib import dependencies  # noqa: E402
from BrainIDModuleLib.predict_logic import PredictLogic  # noqa: E402

from BrainIDLib import slicer_adapter as sa  # noqa: E402
from BrainIDLib.errors import BrainIDError  # noqa: E402
from BrainIDLib.labels import label_name  # noqa: E402

ALL_TASKS = ["segmentation", "anatomy", "super_resolution", "bias_field", "features_pca"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from BrainIDLib.model import Architecture, BrainIDModel
    from BrainIDLib.weights import save_model

    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=8, levels=3),
                         heads={"segmentation": 33, "anatomy": 1, "super_resolution": 1, "bias_field": 1})
    with torch.no_grad():  # make the random segmentation use several labels
        model.heads["segmentation"].conv.bias.normal_(0, 2)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path, {"name": "tiny-random", "description": "random weights for tests"})
    return str(path)


@pytest.fixture(autouse=True)
def scene():
    return sa.init_headless_scene()


def oblique_input(shape=(20, 24, 18)):
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    data = (np.exp(-(x**2 + y**2 + z**2) * 3) * 800 + rng.random(shape) * 50).astype(np.float32)
    t = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-np.cos(t), 0, np.sin(t)], [0, -1, 0], [np.sin(t), 0, np.cos(t)]]) @ np.diag([1.5, 1.2, 2.5])
    affine[:3, 3] = [20, 30, -10]
    return sa.add_scalar_volume(data, "T1 scan", affine=affine)


def check_results(node, results):
    assert set(results) >= {"segmentation", "volumes", "anatomy", "super_resolution", "bias_field", "bias_corrected",
                            "features_pca"}
    ref = sa.ijk_to_ras(node)
    dims = node.GetImageData().GetDimensions()
    for key in ("anatomy", "super_resolution", "bias_field", "bias_corrected", "features_pca"):
        out = results[key]
        np.testing.assert_array_equal(sa.ijk_to_ras(out), ref)
        assert out.GetImageData().GetDimensions() == dims
    assert results["features_pca"].IsA("vtkMRMLVectorVolumeNode")
    seg = results["segmentation"]
    labels = sa.segmentation_to_labels(seg, node)
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert present, "random model produced no labels at all"
    names = {seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())}
    assert names == {label_name(v) for v in present}
    rows = sa.table_rows(results["volumes"])
    voxel_ml = abs(np.linalg.det(ref[:3, :3])) / 1000.0
    assert sum(r[2] for r in rows) == pytest.approx(np.count_nonzero(labels) * voxel_ml, rel=1e-6)
    for label, name, ml in rows:
        assert name == label_name(label)
        assert ml == pytest.approx(np.count_nonzero(labels == label) * voxel_ml, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_process_blocking_all_tasks(tiny_model):
    node = oblique_input()
    seen = []
    results = PredictLogic().process(node, tasks=ALL_TASKS, model=tiny_model, device="cpu",
                                        progress=lambda f, m: seen.append(f))
    check_results(node, results)
    assert seen and seen[-1] == pytest.approx(1.0)


@pytest.mark.slow
def test_gui_path_runs_cli_in_child_process(tiny_model, tmp_path):
    node = oblique_input()
    logic = PredictLogic()
    job = logic.start(node, tasks=ALL_TASKS, model=tiny_model, device="cpu", workdir=tmp_path / "job")
    assert len(job.runner.commands) == 1  # one child process: the feature PCA comes from the same pass
    fractions = []
    deadline = time.monotonic() + 240
    while job.poll() == "running":
        fractions.append(job.runner.fraction)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.state == "succeeded", "\n".join(job.runner.log[-20:])
    assert fractions == sorted(fractions) and job.runner.fraction == 1.0
    assert set(job.runner.outputs) >= {"segmentation", "features_pca", "qc"}  # OUTPUT lines were parsed
    child = job.finish()
    check_results(node, child)
    # the child process computes what the in-process path computes
    inproc = logic.process(node, tasks=["segmentation", "anatomy"], model=tiny_model, device="cpu")
    a = sa.segmentation_to_labels(child["segmentation"], node)
    b = sa.segmentation_to_labels(inproc["segmentation"], node)
    assert np.mean(a == b) > 0.99
    np.testing.assert_allclose(sa.array_from_volume(child["anatomy"])[0], sa.array_from_volume(inproc["anatomy"])[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cancel_stops_a_running_job(tiny_model, tmp_path):
    node = oblique_input((96, 96, 96))
    logic = PredictLogic()
    job = logic.start(node, tasks=["segmentation"], model=tiny_model, device="cpu")
    deadline = time.monotonic() + 120
    while job.poll() == "running" and job.runner.fraction < 0.1:  # wait until the network is running
        assert time.monotonic() < deadline, "\n".join(job.runner.log)
        time.sleep(0.05)
    assert job.state == "running", "job finished before it could be cancelled; use a larger input"
    proc = job.runner._proc
    t = time.monotonic()
    job.cancel()
    assert job.state == "cancelled" and time.monotonic() - t < 10
    assert proc.poll() is not None, f"process {proc.pid} still running"
    import os

    if os.name != "nt":
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # the whole process group is gone
    before = sa.scene().GetNumberOfNodes()
    with pytest.raises(BrainIDError, match="cancelled"):
        job.finish()
    assert sa.scene().GetNumberOfNodes() == before
    assert not job.workdir.exists()  # temporary files removed


def test_bad_input_messages(tiny_model):
    logic = PredictLogic()
    flat = sa.add_scalar_volume(np.full((16, 16, 16), 7.0, np.float32), "flat")
    with pytest.raises(BrainIDError) as e:
        logic.process(flat, tasks=["segmentation"], model=tiny_model, device="cpu")
    assert "constant" in str(e.value).lower() or "uniform" in str(e.value).lower()
    empty = sa.scene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(BrainIDError, match="no voxels"):
        logic.process(empty, tasks=["segmentation"], model=tiny_model)
    with pytest.raises(BrainIDError, match="unknown task"):
        logic.process(flat, tasks=["tumour"], model=tiny_model)
    with pytest.raises(BrainIDError, match="at least one task"):
        logic.process(flat, tasks=[], model=tiny_model)
    with pytest.raises(BrainIDError, match="flip averaging"):
        logic.process(flat, flipAverage="sometimes", model=tiny_model)
    with pytest.raises(BrainIDError, match="unknown task"):  # the child-process path refuses before starting
        logic.start(flat, tasks=["tumour"], model=tiny_model)


@pytest.mark.slow
def test_bad_input_in_child_process_reports_the_cli_error(tiny_model):
    flat = sa.add_scalar_volume(np.full((16, 16, 16), 7.0, np.float32), "flat")
    logic = PredictLogic()
    job = logic.start(flat, tasks=["segmentation"], model=tiny_model, device="cpu")
    assert job.runner.wait(timeout=120) == "failed"
    with pytest.raises(BrainIDError) as e:
        job.finish()
    assert "brainid: error:" in str(e.value) and "Traceback" not in str(e.value)


def test_task_aliases_reach_predict_and_results_come_back(monkeypatch):
    import types

    import BrainIDLib

    node = oblique_input((8, 9, 10))
    calls = {}

    def fake_predict(image, tasks, **kw):
        import nibabel as nib

        calls["tasks"], calls["affine"], calls["kw"] = tasks, image.affine, kw
        lab = np.zeros(image.shape, np.int16)
        lab[2:5, 2:5, 2:5] = 17
        return types.SimpleNamespace(outputs={"segmentation": nib.Nifti1Image(lab, image.affine)}, messages=[],
                                     qc=None)

    monkeypatch.setattr(BrainIDLib, "predict", fake_predict, raising=False)
    results = PredictLogic(log=lambda m: None).process(node, tasks="seg t1", device="cpu")
    assert calls["tasks"] == ("segmentation", "anatomy")
    assert calls["kw"]["flip_average"] is None and calls["kw"]["qc"] is True and not calls["kw"]["keep_features"]
    np.testing.assert_allclose(calls["affine"], sa.ijk_to_ras(node))
    assert results["segmentation"].GetSegmentation().GetNthSegment(0).GetName() == "Left-Hippocampus"
    rows = dict((r[1], r[2]) for r in sa.table_rows(results["volumes"]))
    assert rows["Left-Hippocampus"] == pytest.approx(27 * abs(np.linalg.det(sa.ijk_to_ras(node)[:3, :3])) / 1000)
    from BrainIDLib.labels import SEGMENTATION_LABELS

    # the CLI's table: every segmentation structure (background excluded), absent ones at 0 mL
    assert len(rows) == len([v for v in SEGMENTATION_LABELS if v])


# ------------------------------------------------------------------ dependencies


def spec_finder(present):
    return lambda name: object() if name in present else None


def test_dependencies_all_present_installs_nothing():
    asked = []
    ok = dependencies.ensure(confirm=lambda m: asked.append(m) or True, pip_install=lambda r: pytest.fail("pip"),
                             torch_installer=None, find_spec=spec_finder({"torch", "numpy", "nibabel", "safetensors", "tqdm"}))
    assert ok and not asked


def test_dependencies_torch_missing_without_pytorch_extension_explains():
    said = []
    ok = dependencies.ensure(confirm=lambda m: pytest.fail("must not ask"), pip_install=lambda r: pytest.fail("pip"),
                             torch_installer=None, explain=said.append, find_spec=spec_finder({"numpy"}))
    assert not ok and "PyTorch" in said[0] and "Extensions Manager" in said[0]


def test_dependencies_installs_after_asking_and_never_touches_slicer_packages():
    present = {"numpy", "tqdm"}
    installed = []

    def torch_installer():
        present.add("torch")
        return object()

    def pip(req):
        installed.append(req)
        present.update(r.split(">")[0] for r in req.split())

    ok = dependencies.ensure(confirm=lambda m: True, pip_install=pip, torch_installer=torch_installer,
                             find_spec=spec_finder(present))
    assert ok and installed == ["nibabel>=5.0 safetensors>=0.4"]
    assert not any(p in installed[0] for p in ("numpy", "SimpleITK", "requests"))


def test_dependencies_declined_installs_nothing():
    said = []
    ok = dependencies.ensure(confirm=lambda m: False, pip_install=lambda r: pytest.fail("pip"),
                             torch_installer=lambda: pytest.fail("torch"), explain=said.append,
                             find_spec=spec_finder({"numpy"}))
    assert not ok and "not installed" in said[0]
