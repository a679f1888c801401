"""Correspondence accuracy and speed: the point descriptor's context rings vs single-voxel features.

Known-answer pairs from the shipped MNI152 sample (brainid_devtools.demo_pairs): a T2-like copy (the
brain's intensities inverted) and a gamma-changed copy, each moved by a rigid transform (rotations
5 deg about R and 8 deg about S, a 6/-4/3 mm shift) onto a 2 mm grid, so the true location of every
point is known. For N random points inside the brain, it prints the median / mean error, the share
within 3 feature voxels (6 mm) and the seconds per point, for each descriptor; plus the same pairs
without the rotation (a shift only), which shows what the rotation costs.

    python benchmarks/correspondence.py [--model brainid-lite] [--points 40] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's brainid_devtools

import BrainIDLib as bid  # noqa: E402
from BrainIDLib.correspondence import CONTEXT_MM, find_correspondence  # noqa: E402
from BrainIDLib.feature_maps import compute_feature_map  # noqa: E402
from BrainIDLib.samples import sample_path  # noqa: E402
from brainid_devtools.demo_pairs import apply_transform, displaced, grid_points, recontrast  # noqa: E402

DESCRIPTORS = {"single voxel": (), "rings 12-50 mm (default)": CONTEXT_MM, "rings 4-16 mm": (4.0, 8.0, 12.0, 16.0),
               "rings 12-32 mm": (12.0, 20.0, 32.0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brainid-lite")
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = bid.load_model(args.model)
    t1 = nib.load(sample_path())
    t0 = time.perf_counter()
    src = compute_feature_map(t1, model=model, device=args.device)
    print(f"model {args.model}, source features {tuple(src.features.shape)} in {time.perf_counter() - t0:.1f} s")
    pts = grid_points(t1, n=args.points, seed=0)
    pairs = []
    for mode in ("t2", "gamma"):
        for rot, label in (((5, 0, 8), "moved"), ((0, 0, 0), "shifted")):
            img, transform = displaced(recontrast(t1, mode), rotation_deg=rot, translation_mm=(6, -4, 3), spacing=2.0)
            pairs.append((f"{mode}-like, {label}", compute_feature_map(img, model=model, device=args.device), transform))
    print(f"{'descriptor':26s} {'pair':20s} {'median':>7s} {'mean':>6s} {'<=6mm':>6s} {'s/point':>8s}")
    for name, rings in DESCRIPTORS.items():
        for pair, tgt, transform in pairs:
            t0 = time.perf_counter()
            found = np.array([find_correspondence(src, p, [tgt], context_mm=rings)[0].point_ras for p in pts])
            per_point = (time.perf_counter() - t0) / len(pts)
            err = np.linalg.norm(found - apply_transform(transform, pts), axis=1)
            print(f"{name:26s} {pair:20s} {np.median(err):6.1f}  {err.mean():6.1f} {np.mean(err <= 6):6.2f} {per_point:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
