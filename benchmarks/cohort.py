"""Cohort mode against one `brainid predict` process per scan: scans per hour on this machine.

    python benchmarks/cohort.py [--scans 8] [--threads 2]

The scans are copies of the shipped sample, each resampled to a slightly different grid and
intensity scale (so no step can be skipped as a repeat). Baseline: one `python -m BrainIDLib.cli
predict SCAN` process per scan, one after the other (interpreter start, torch import and model load
every time). Cohort: one `python -m BrainIDLib.cli predict FOLDER` process (model loaded once, the next
scan read while the current one computes). Both run the README's default (segmentation with QC) on
the same files, in the same invocation; the summary prints scans per hour and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_scans(folder: Path, n: int) -> list[Path]:
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(REPO))
    from BrainIDLib.samples import sample_path

    img = nib.load(str(sample_path()))
    data = np.asarray(img.dataobj, dtype=np.float32)
    paths = []
    for i in range(n):
        affine = img.affine.copy()
        affine[:3, :3] *= 1.0 + 0.02 * i  # 1.5 mm, 1.53 mm, ...: a different grid each time
        p = folder / f"scan{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data * (1.0 + 0.1 * i), affine), p)
        paths.append(p)
    return paths


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads), BRAINID_OFFLINE="1")
    cli = [sys.executable, "-m", "BrainIDLib.cli", "predict"]
    with tempfile.TemporaryDirectory(prefix="brainid-cohort-") as tmp:
        tmp = Path(tmp)
        (tmp / "scans").mkdir()
        scans = make_scans(tmp / "scans", args.scans)
        print(f"{args.scans} scans (the shipped sample on {args.scans} grids), {args.threads} threads, default model, "
              "segmentation with QC", flush=True)
        per_scan = sum(run(cli + [str(s), "-o", f"{tmp / 'single'}/"], env) for s in scans)
        print(f"one process per scan: {per_scan:.1f} s wall, {3600 * args.scans / per_scan:.0f} scans/hour", flush=True)
        cohort = run(cli + [str(tmp / "scans"), "-o", f"{tmp / 'cohort'}/"], env)
        print(f"cohort (one process): {cohort:.1f} s wall, {3600 * args.scans / cohort:.0f} scans/hour", flush=True)
        rows = (tmp / "cohort" / "cohort_volumes.csv").read_text().splitlines()
        assert len(rows) == args.scans + 1, rows[:3]
    print(f"cohort / per-scan throughput: {per_scan / cohort:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
