"""`brainid predict` over a cohort (folder or list file): one model load, prefetching, the summary
CSV, resuming, bad scans recorded while the others go on, exit codes, and torchrun sharding (two
CPU processes under gloo). Tiny random-weight models: the machinery, not model quality."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from test_cli import assert_one_line_error, make_scan, run, tiny_model

REPO = Path(__file__).resolve().parents[2]
QUIET = ("--progress-format", "none", "--device", "cpu", "--task", "segmentation,anatomy")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)


@pytest.fixture
def model_file(tmp_path):
    return tiny_model(tmp_path / "tiny.safetensors")


def cohort(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_scan(folder / f"s{i}.nii.gz", shape=(18 + 2 * i, 22, 18), lps=bool(i % 2)) for i in range(n)]


def summary(out: Path) -> list[dict]:
    with open(out / "cohort_volumes.csv", newline="") as f:
        return list(csv.DictReader(f))


def per_scan_ml(out: Path, stem: str) -> dict:
    with open(out / f"{stem}_volumes.csv", newline="") as f:
        return {r["name"] + "_mL": float(r["volume_ml"]) for r in csv.DictReader(f)}


def test_folder_cohort_summary_bad_scan_resume_and_overwrite(tmp_path, model_file, capsys, monkeypatch):
    scans = cohort(tmp_path / "in")
    (tmp_path / "in" / "broken.nii.gz").write_text("not an image")
    out = tmp_path / "out"
    builds = []
    import BrainIDLib.weights as weights

    real_build = weights.build_model
    monkeypatch.setattr(weights, "build_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", out, "--model", model_file, *QUIET)
    assert rc == 1, err  # one scan failed, the others ran
    assert len(builds) == 1  # the model loaded once for the cohort
    notes = [ln for ln in err.splitlines() if "broken.nii.gz" in ln]
    assert len(notes) == 1 and notes[0].startswith("brainid: note: ") and "Traceback" not in err
    rows = summary(out)
    assert [r["output"] for r in rows] == ["broken", "s0", "s1", "s2"]  # folder order (sorted)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok"]
    assert "not a readable NIfTI" in rows[0]["error"] and rows[1]["error"] == ""
    for r in rows[1:]:  # one column per structure, the scan's own volumes CSV in mL
        assert float(r["seconds"]) > 0
        ml = per_scan_ml(out, r["output"])
        assert ml and {k: float(r[k]) for k in ml} == pytest.approx(ml, abs=1e-4)
        assert sum(ml.values()) > 0
    # the cohort's outputs equal those of a single predict of the same scan
    single = tmp_path / "single"
    assert run(capsys, "predict", scans[1], "-o", f"{single}/", "--model", model_file, *QUIET)[0] == 0
    import nibabel as nib

    for task in ("segmentation", "anatomy"):
        a = nib.load(out / f"s1_{task}.nii.gz")
        b = nib.load(single / f"s1_{task}.nii.gz")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)

    # resume: finished scans are skipped (their files untouched), the failed one is tried again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", out, "--model", model_file, *QUIET)
    assert rc == 1, err
    rows2 = summary(out)
    assert [r["status"] for r in rows2] == ["failed", "skipped", "skipped", "skipped"]
    assert [r["Left-Hippocampus_mL"] for r in rows2[1:]] == [r["Left-Hippocampus_mL"] for r in rows[1:]]
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if p.name.startswith("s"))
    # a scan with a missing output is not complete: it runs again
    (out / "s2_anatomy.nii.gz").unlink()
    (tmp_path / "in" / "broken.nii.gz").unlink()
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", out, "--model", model_file, *QUIET)
    assert rc == 0, err
    assert [r["status"] for r in summary(out)] == ["skipped", "skipped", "ok"]
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", out, "--model", model_file, "--overwrite", *QUIET)
    assert rc == 0 and [r["status"] for r in summary(out)] == ["ok", "ok", "ok"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_list_file_missing_scan_duplicates_and_machine_progress(tmp_path, model_file, capsys):
    scans = cohort(tmp_path / "data", 2)
    listing = tmp_path / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n{scans[0]}\n\n../data/s1.nii.gz\n{tmp_path / 'absent.nii.gz'}\n{scans[0]}\n")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "predict", listing, "-o", out, "--model", model_file, *QUIET[2:],
                          "--progress-format", "machine")
    assert rc == 1, err
    rows = summary(out)
    assert [(r["output"], r["status"]) for r in rows] == [("s0", "ok"), ("s1", "ok"), ("absent", "failed")]
    assert "not found" in rows[2]["error"]
    progress = [float(ln.split()[1]) for ln in stdout.splitlines() if ln.startswith("PROGRESS ")]
    assert progress and progress == sorted(progress)
    outputs = [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("OUTPUT ")]
    assert outputs.count("segmentation") == 2 and outputs[-1] == "summary"


def test_next_scan_is_prepared_while_the_current_one_computes(tmp_path, model_file, capsys, monkeypatch):
    """predict() of scan 0 waits until scan 1's preparation has started on the prefetch thread."""
    import BrainIDLib.inference as inference

    cohort(tmp_path / "in", 2)
    started = {}
    real_prepare, real_predict = inference.prepare_scan, inference.predict

    def prepare_spy(path, *a, **k):
        started.setdefault(Path(path).name, threading.Event()).set()
        return real_prepare(path, *a, **k)

    def predict_spy(image, *a, **k):
        if image.volume.name == "s0.nii.gz":
            assert started.setdefault("s1.nii.gz", threading.Event()).wait(30), "s1 was not prefetched"
        return real_predict(image, *a, **k)

    monkeypatch.setattr(inference, "prepare_scan", prepare_spy)
    monkeypatch.setattr(inference, "predict", predict_spy)
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", tmp_path / "out", "--model", model_file, *QUIET)
    assert rc == 0, err
    assert [r["status"] for r in summary(tmp_path / "out")] == ["ok", "ok"]


def test_a_bug_on_one_scan_shows_its_traceback_and_the_cohort_goes_on(tmp_path, model_file, capsys, monkeypatch):
    import BrainIDLib.inference as inference

    cohort(tmp_path / "in", 2)
    real_predict = inference.predict

    def buggy(image, *a, **k):
        if image.volume.name == "s0.nii.gz":
            raise TypeError("unsupported operand")
        return real_predict(image, *a, **k)

    monkeypatch.setattr(inference, "predict", buggy)
    rc, _, err = run(capsys, "predict", tmp_path / "in", "-o", tmp_path / "out", "--model", model_file, *QUIET)
    assert rc == 1 and "Traceback" in err and "TypeError: unsupported operand (a BrainID bug?" in err
    assert [r["status"] for r in summary(tmp_path / "out")] == ["failed", "ok"]


def test_cohort_usage_errors_before_the_model_loads(tmp_path, model_file, capsys, monkeypatch):
    import BrainIDLib.weights as weights

    monkeypatch.setattr(weights, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cohort(tmp_path / "in", 1)
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("# nothing\n\n")
    (tmp_path / "dicoms").mkdir()
    (tmp_path / "dicoms" / "IM0001.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "a_file").write_text("x")
    cases = [((empty_list, "-o", tmp_path / "o"), "names no scan"),
             ((tmp_path / "dicoms", "-o", tmp_path / "o"), "no NIfTI"),
             ((tmp_path / "in", "-o", tmp_path / "seg.nii.gz"), "must be a folder"),
             ((tmp_path / "in", "-o", tmp_path / "a_file"), "must be a folder"),
             ((tmp_path / "in", "-o", tmp_path / "a_file" / "o"), "is a file"),
             ((tmp_path / "in", "-o", tmp_path / "o", "--precision", "fp16"), "invalid choice")]
    for argv, needle in cases:
        rc, _, err = run(capsys, "predict", *argv, "--model", model_file, "--progress-format", "none")
        assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "seg.nii.gz").exists()


def test_torchrun_shards_the_cohort_over_two_processes(tmp_path, model_file, capsys):
    scans = cohort(tmp_path / "in", 4)
    listing = tmp_path / "scans.txt"
    listing.write_text("\n".join(str(p) for p in scans) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "BRAINID_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "BrainIDLib.cli", "predict", str(listing), "-o", str(tmp_path / "dist"), "--model", str(model_file),
           *QUIET]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: 2 of 4 scans" in proc.stderr and "rank 1 of 2: 2 of 4 scans" in proc.stderr
    rows = summary(tmp_path / "dist")
    assert [(r["output"], r["status"]) for r in rows] == [(f"s{i}", "ok") for i in range(4)]
    assert not [p for p in (tmp_path / "dist").iterdir() if p.name.startswith(".")]  # rank files removed
    # the same figures as one process computing every scan
    assert run(capsys, "predict", listing, "-o", tmp_path / "one", "--model", model_file, *QUIET)[0] == 0
    volumes = [{k: v for k, v in r.items() if k.endswith("_mL")} for r in rows]
    assert volumes == [{k: v for k, v in r.items() if k.endswith("_mL")} for r in summary(tmp_path / "one")]
