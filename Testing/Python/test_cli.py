"""`brainid` CLI end to end on small volumes with a tiny random-weight model (tests the machinery,
not model quality), the model registry commands, and every bad input as one clear line, exit 2."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib import cli
from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.weights import official_shapes, save_model

ALL_TASKS = {"segmentation": 33, "anatomy": 1, "super_resolution": 1, "bias_field": 1}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)
    monkeypatch.delenv("BRAINID_OFFLINE", raising=False)


def tiny_model(path, heads=ALL_TASKS, seed=0):
    torch.manual_seed(seed)
    model = BrainIDModel(Architecture(f_maps=8, levels=3), heads=dict(heads))
    model.metadata = {"name": "tiny-test", "description": "random weights for tests"}
    return save_model(model, path)


@pytest.fixture
def model_file(tmp_path):
    return tiny_model(tmp_path / "tiny.safetensors")


def make_scan(path, shape=(20, 24, 18), spacing=(2.0, 1.8, 2.2), lps=True):
    """A blob-like scan in LPS orientation (non-RAS) with anisotropic voxels."""
    rng = np.random.default_rng(0)
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    data = 400 * np.exp(-3 * (zz**2).sum(0)) + 20 * rng.random(shape)
    affine = np.diag(list(spacing) + [1.0])
    if lps:
        affine[0, 0] *= -1
        affine[1, 1] *= -1
    affine[:3, 3] = [30.0, 25.0, -20.0]
    img = nib.Nifti1Image(data.astype(np.int16), affine)
    nib.save(img, path)
    return path


@pytest.fixture
def scan(tmp_path):
    return make_scan(tmp_path / "subject01.nii.gz")


def registry_without_default(tmp_path, monkeypatch):
    """The shipped registry with its default removed (as before a default model shipped)."""
    from BrainIDLib.resources import resource_path

    doc = json.loads(resource_path("models.json").read_text())
    doc["default"] = None
    doc["models"] = [m for m in doc["models"] if m["name"] == "official"]
    path = tmp_path / "no-default-models.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("BRAINID_REGISTRY", str(path))
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("brainid: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


# ------------------------------------------------------------------------------- predict
def test_predict_end_to_end(tmp_path, scan, model_file, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, "predict", scan, "--task", "segmentation", "--task", "anatomy,bias_field",
                       "--task", "sr", "--output", f"{out_dir}/", "--model", model_file, "--device", "cpu",
                       "--progress-format", "machine")
    assert rc == 0, err
    src = nib.load(scan)
    expected = {k: out_dir / f"subject01_{k}.nii.gz"
                for k in ("segmentation", "anatomy", "super_resolution", "bias_field", "bias_corrected")}
    for key, path in expected.items():
        img = nib.load(path)
        assert img.shape == src.shape, key
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
        assert np.isfinite(img.get_fdata()).all()
    seg = np.asarray(nib.load(expected["segmentation"]).dataobj)
    assert seg.dtype == np.int16 and set(np.unique(seg)) <= set(SEGMENTATION_LABELS)
    assert (nib.load(expected["bias_field"]).get_fdata() > 0).all()

    # structure volumes in mL with FreeSurfer names
    with open(out_dir / "subject01_volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [str(x) for x in sorted(SEGMENTATION_LABELS) if x != 0]
    names = {r["label"]: r["name"] for r in rows}
    assert names["17"] == "Left-Hippocampus" and names["4"] == "Left-Lateral-Ventricle"
    voxel_ml = 2.0 * 1.8 * 2.2 / 1000
    assert sum(int(r["voxels"]) for r in rows) == int((seg != 0).sum())
    np.testing.assert_allclose(sum(float(r["volume_ml"]) for r in rows), (seg != 0).sum() * voxel_ml, rtol=1e-3)

    # machine-readable progress and outputs
    progress = [float(line.split()[1]) for line in out.splitlines() if line.startswith("PROGRESS ")]
    assert progress and progress == sorted(progress) and progress[-1] == 1.0
    outputs = {line.split()[1]: line.split(maxsplit=2)[2] for line in out.splitlines() if line.startswith("OUTPUT ")}
    assert set(outputs) == set(expected) | {"volumes", "qc"}  # QC is on with segmentation (test_qc.py)
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([p.name for p in expected.values()]
                                                              + ["subject01_volumes.csv", "subject01_qc.json"])


def test_output_prefix_single_file_and_1mm(tmp_path, scan, model_file, capsys):
    rc, out, err = run(capsys, "predict", scan, "--task", "anatomy", "--output", tmp_path / "res" / "case",
                       "--model", model_file, "--on-1mm", "--progress-format", "none")
    assert rc == 0, err
    assert nib.load(tmp_path / "res" / "case_anatomy.nii.gz").shape == nib.load(scan).shape
    one_mm = nib.load(tmp_path / "res" / "case_anatomy_1mm.nii.gz")
    np.testing.assert_allclose(np.sqrt((one_mm.affine[:3, :3] ** 2).sum(0)), 1.0, atol=1e-5)
    assert nib.aff2axcodes(one_mm.affine) == ("R", "A", "S")
    assert "wrote anatomy" in out

    rc, out, err = run(capsys, "predict", scan, "--task", "segmentation", "--output", tmp_path / "seg.nii.gz",
                       "--model", model_file, "--progress-format", "none")
    assert rc == 0, err
    assert nib.load(tmp_path / "seg.nii.gz").shape == nib.load(scan).shape
    assert (tmp_path / "seg_volumes.csv").is_file()


def test_progress_bar_goes_to_stderr(tmp_path, scan, model_file, capsys):
    rc, out, err = run(capsys, "predict", scan, "--task", "anatomy", "-o", tmp_path / "p", "--model", model_file)
    assert rc == 0
    assert "100%" in err and "PROGRESS" not in out


def test_features_with_pca(tmp_path, scan, model_file, capsys):
    rc, out, err = run(capsys, "features", scan, "--output", tmp_path / "feats.nii.gz", "--pca", "3",
                       "--model", model_file, "--progress-format", "none")
    assert rc == 0, err
    img = nib.load(tmp_path / "feats.nii.gz")
    assert img.shape == nib.load(scan).shape + (3,)
    np.testing.assert_allclose(img.affine, nib.load(scan).affine, atol=1e-6)
    rc, out, err = run(capsys, "features", scan, "--output", tmp_path / "all.nii.gz", "--model", model_file,
                       "--progress-format", "none")
    assert rc == 0 and nib.load(tmp_path / "all.nii.gz").shape[-1] == 8


def test_sample_input_is_the_shipped_volume(tmp_path, model_file, monkeypatch, capsys):
    """`--sample` / `predict sample` feed the verified shipped volume to the engine (stubbed here:
    a real run on the 1.5 mm sample takes ~30 s on 2 cores, see the README command)."""
    import BrainIDLib.inference as inference
    from BrainIDLib.inference import Prediction
    from BrainIDLib.samples import sample_manifest, sample_path

    path = sample_path()
    meta = sample_manifest()[0]
    assert path.stat().st_size < 2_000_000 and path.stat().st_size == meta["size"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
    img = nib.load(path)
    assert img.shape == tuple(meta["shape"]) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.get_data_dtype() == np.int16

    seen = []

    def fake_predict(image, tasks, model, **kwargs):  # gets the scan the CLI read and checked first
        seen.append(image.name)
        seg = np.zeros(image.shape, np.int16)
        seg[image.array > 500] = 2
        return Prediction(outputs={"segmentation": nib.Nifti1Image(seg, image.affine)})

    monkeypatch.setattr(inference, "predict", fake_predict)
    for argv in (["--sample"], ["sample"]):
        rc, out, err = run(capsys, "predict", *argv, "--task", "segmentation", "-o", f"{tmp_path / 's'}/",
                           "--model", model_file, "--progress-format", "none")
        assert rc == 0, err
    assert seen == [path.name, path.name]
    rows = list(csv.DictReader(open(tmp_path / "s" / "MNI152-brain-1.5mm_volumes.csv")))
    wm = next(r for r in rows if r["label"] == "2")
    assert wm["name"] == "Left-Cerebral-White-Matter" and float(wm["volume_ml"]) > 100


# ------------------------------------------------------------------------------- registry commands
def test_models_lists_registry_and_cache(tmp_path, capsys, monkeypatch):
    rc, out, err = run(capsys, "models")
    assert rc == 0, err
    assert "brainid-lite" in out and "shipped" in out
    registry_without_default(tmp_path, monkeypatch)
    rc, out, err = run(capsys, "models")
    assert rc == 0, err
    assert "official" in out and "NONE (unverified)" in out and "missing" in out
    assert str(tmp_path / "cache" / "official" / "brain_id_pretrained.pth") in out
    assert "no default model" in out
    rc, out, _ = run(capsys, "models", "--json")
    data = json.loads(out)
    official = next(m for m in data["models"] if m["name"] == "official")
    assert official["verified"] is False and official["files"][0]["status"] == "missing"
    # placed by hand -> reported as present but unverified
    target = tmp_path / "cache" / "official" / "brain_id_pretrained.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    rc, out, _ = run(capsys, "models")
    assert "unverified" in out.splitlines()[3]


def test_download_official_explains_manual_placement(tmp_path, capsys):
    rc, out, err = run(capsys, "download", "official")
    target = tmp_path / "cache" / "official" / "brain_id_pretrained.pth"
    assert_one_line_error(rc, err, str(target), "drive.google.com")
    assert f"Save it as {target}" in err and "1vuNu2dt-YdBCRW1E4gJtUsi0b_BcX6S_" in err


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_then_predict_by_name(tmp_path, scan, monkeypatch, capsys):
    served = tmp_path / "www"
    served.mkdir()
    model = tiny_model(served / "tiny.safetensors")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        doc = {"format_version": 1, "default": None, "models": [{
            "name": "tiny", "description": "test", "tasks": list(ALL_TASKS), "licence": "test", "source": "test",
            "architecture": {"f_maps": 8, "levels": 3},
            "files": [{"filename": "tiny.safetensors", "urls": [f"http://127.0.0.1:{httpd.server_address[1]}/tiny.safetensors"],
                       "sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "size": model.stat().st_size}]}]}
        (tmp_path / "models.json").write_text(json.dumps(doc))
        monkeypatch.setenv("BRAINID_REGISTRY", str(tmp_path / "models.json"))
        monkeypatch.setenv("BRAINID_ALLOW_HTTP", "1")  # a plain-http server on 127.0.0.1
        rc, out, err = run(capsys, "download", "tiny", "--progress-format", "machine")
        assert rc == 0, err
        cached = tmp_path / "cache" / "tiny" / "tiny.safetensors"
        assert cached.read_bytes() == model.read_bytes() and "SHA-256 verified" in out
        rc, out, err = run(capsys, "predict", scan, "--task", "segmentation", "-o", f"{tmp_path / 'o'}/",
                           "--model", "tiny", "--progress-format", "none")
        assert rc == 0, err
        rc, out, err = run(capsys, "models")
        assert "cached" in out
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------- bad inputs
def test_no_model_says_how_to_get_weights(scan, tmp_path, capsys, monkeypatch):
    registry_without_default(tmp_path, monkeypatch)
    rc, out, err = run(capsys, "predict", scan, "--task", "segmentation", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "no model is available", "brainid download", "brain_id_pretrained.pth",
                          "--model")
    assert not (tmp_path / "o_segmentation.nii.gz").exists()


def test_not_a_nifti(tmp_path, model_file, capsys):
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("this is not an image")
    rc, out, err = run(capsys, "predict", bad, "-o", tmp_path / "o", "--model", model_file)
    assert_one_line_error(rc, err, "scan.nii.gz", "NIfTI")


def test_corrupt_checkpoint(tmp_path, scan, model_file, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(model_file.read_bytes()[:1000])
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", broken)
    assert_one_line_error(rc, err, "broken.safetensors")
    pth = tmp_path / "broken.pth"
    pth.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", pth)
    assert_one_line_error(rc, err, "broken.pth", "not a readable torch checkpoint")


def test_official_checkpoint_with_wrong_shape(tmp_path, scan, capsys):
    import argparse

    shapes = official_shapes(Architecture(f_maps=8, levels=3))
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["backbone.encoders.1.basic_module.SingleConv2.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    path = tmp_path / "brain_id_pretrained.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 1, "args": argparse.Namespace(num_groups=8),
                "best_val_stats": None}, path)
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", path, "--task", "anatomy")
    assert_one_line_error(rc, err, "mis-shaped keys: backbone.encoders.1.basic_module.SingleConv2.conv.weight")


def test_unknown_task_and_missing_head(tmp_path, scan, capsys):
    rc, out, err = run(capsys, "predict", scan, "--task", "telepathy", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "unknown task 'telepathy'", "segmentation")
    seg_only = tiny_model(tmp_path / "seg.safetensors", heads={"segmentation": 33})
    rc, out, err = run(capsys, "predict", scan, "--task", "bias_field", "-o", tmp_path / "o", "--model", seg_only)
    assert_one_line_error(rc, err, "no head for bias_field", "--head bias_field=FILE")
    rc, out, err = run(capsys, "predict", scan, "--head", "nonsense", "-o", tmp_path / "o", "--model", seg_only)
    assert_one_line_error(rc, err, "TASK=FILE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(tmp_path, scan, model_file, capsys):
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", model_file, "--device", "cuda")
    assert_one_line_error(rc, err, "GPU", "--device cpu")


def test_bad_volumes(tmp_path, model_file, capsys):
    affine = np.eye(4)
    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16, 3).astype(np.float32), affine), four_d)
    constant = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), affine), constant)
    for path in (four_d, constant):
        rc, out, err = run(capsys, "predict", path, "-o", tmp_path / "o", "--model", model_file)
        assert_one_line_error(rc, err, path.name)
    rc, out, err = run(capsys, "predict", tmp_path / "absent.nii.gz", "-o", tmp_path / "o", "--model", model_file)
    assert_one_line_error(rc, err, "not found")
    rc, out, err = run(capsys, "features", tmp_path, "-o", tmp_path / "f.nii.gz", "--model", model_file)
    assert_one_line_error(rc, err, "folder")  # (predict takes a folder as a cohort: test_cohort.py)


def test_usage_errors_are_one_line(capsys):
    rc, out, err = run(capsys, "predict")
    assert_one_line_error(rc, err, "--output")
    rc, out, err = run(capsys, "frobnicate")
    assert_one_line_error(rc, err, "invalid choice")
    rc, out, err = run(capsys, "download", "no-such-model")
    assert_one_line_error(rc, err, "no registered model named 'no-such-model'")


def test_interrupt_exits_130_without_partial_outputs(tmp_path, scan, model_file, monkeypatch, capsys):
    import BrainIDLib.inference as inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "predict", interrupted)
    rc, out, err = run(capsys, "predict", scan, "-o", f"{tmp_path / 'o'}/", "--model", model_file)
    assert rc == 130 and "brainid: interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bias_corrected_only(tmp_path, scan, model_file, capsys):
    rc, out, err = run(capsys, "predict", scan, "--task", "bias_corrected", "-o", tmp_path / "b",
                       "--model", model_file, "--progress-format", "none")
    assert rc == 0, err
    assert (tmp_path / "b_bias_corrected.nii.gz").is_file() and not (tmp_path / "b_bias_field.nii.gz").exists()


def test_console_process_exit_codes(tmp_path):
    """The real process: exit status 2 and one line on stderr, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "BRAINID_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "BrainIDLib.cli", "predict", str(tmp_path / "none.nii.gz"),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("brainid: error: input image not found")
    proc = subprocess.run([sys.executable, "-m", "BrainIDLib.cli", "models"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and "official" in proc.stdout


@pytest.mark.parametrize("exc", [MemoryError, torch.cuda.OutOfMemoryError])
def test_out_of_memory_is_one_line(tmp_path, scan, model_file, monkeypatch, capsys, exc):
    import BrainIDLib.inference as inference

    def oom(*args, **kwargs):
        raise exc("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(inference, "predict", oom)
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", model_file)
    assert_one_line_error(rc, err, "out of memory", "--mode tiled")
    rc, out, err = run(capsys, "predict", scan, "-o", tmp_path / "o", "--model", model_file, "--memory-gb", "-1")
    assert_one_line_error(rc, err, "--memory-gb")


def test_sigterm_exits_130_cleanly(tmp_path, scan, model_file):
    """Front ends (Slicer) stop a run with SIGTERM: exit 130, one line, no traceback, no outputs."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not hasattr(signal, "SIGTERM") or os.name == "nt":
        pytest.skip("POSIX signals only")
    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys, time, BrainIDLib.inference as inf\n"
        "def slow(*a, **k):\n"
        "    print('PROGRESS 0.100 started', flush=True)\n"
        "    time.sleep(60)\n"
        "inf.predict = slow\n"
        "from BrainIDLib.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(repo), "BRAINID_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code, "predict", str(scan), "-o", f"{out}/", "--model",
                             str(model_file), "--progress-format", "machine"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        line = ""
        while "PROGRESS 0.100" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "brainid: interrupted"
    assert not out.exists() or not any(out.iterdir())
