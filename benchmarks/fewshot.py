"""Few-shot head training on the CPU for a 1 mm volume: feature extraction vs head fitting vs
applying, and a float32 vs float16 feature cache (memory, fitting time, Dice on the other contrast).

The 1 mm volume is the shipped MNI152 sample resampled to 1 mm; white matter is painted in three
coronal slices (labels from BrainIDLib.demo_pairs.tissue_labels); the head is applied to a
re-contrasted (T2-like) copy moved by a known rigid transform. Wall and CPU seconds are printed
(the CPU figure is the fair one on a shared machine).

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/fewshot.py [--model brainid-lite] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

import BrainIDLib as bid
from BrainIDLib.correspondence import compute_feature_map
from BrainIDLib.demo_pairs import displaced, recontrast, tissue_labels
from BrainIDLib.fewshot import segment, train_head
from BrainIDLib.samples import sample_path
from BrainIDLib.volume import make_nifti


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brainid-lite")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sample = nib.load(sample_path())
    zoom = np.array(sample.header.get_zooms()[:3]) / 1.0
    data = ndimage.zoom(np.asarray(sample.dataobj, dtype=np.float32), zoom, order=1)
    affine = sample.affine.copy()
    affine[:3, :3] = np.eye(3)
    t1 = make_nifti(data, affine)
    labels = np.asarray(tissue_labels(t1).dataobj)
    wm = np.isin(labels, [2, 41])
    paint = np.zeros(labels.shape, np.int16)
    for j in np.linspace(0.3, 0.7, 3) * labels.shape[1]:
        paint[:, int(j), :] = wm[:, int(j), :]
    target, _ = displaced(recontrast(t1, "t2"), rotation_deg=(5, 0, 8), translation_mm=(6, -4, 3), spacing=1.0)
    truth_img, _ = displaced(make_nifti(wm.astype(np.int16), affine, np.int16), rotation_deg=(5, 0, 8),
                             translation_mm=(6, -4, 3), spacing=1.0, labels=True)
    truth = np.asarray(truth_img.dataobj) > 0
    model = bid.load_model(args.model)
    print(f"model {args.model}; 1 mm volume {t1.shape} ({np.prod(t1.shape) / 1e6:.1f} M voxels); "
          f"{int((paint > 0).sum())} painted voxels in 3 slices; {args.threads} threads")

    with Timer() as tf:
        fm = compute_feature_map(t1, model=model)
    with Timer() as tt:
        fmt = compute_feature_map(target, model=model)
    print(f"feature extraction (source): {tf.wall:7.2f} s wall {tf.cpu:7.2f} s CPU  -> grid {fm.shape}, "
          f"{fm.nbytes / 1e6:.1f} MB float16")
    print(f"feature extraction (target): {tt.wall:7.2f} s wall {tt.cpu:7.2f} s CPU")
    ann = make_nifti(paint, affine, np.int16)
    for label, f_src, f_tgt in (("float16", fm, fmt),
                                ("float32", replace(fm, features=fm.features.float()), replace(fmt, features=fmt.features.float()))):
        with Timer() as th:
            head = train_head([f_src], [ann], names={1: "WM"}, steps=args.steps)
        with Timer() as ta:
            seg = np.asarray(segment(f_tgt, head).dataobj) == 1
        mb = f_src.features.numel() * f_src.features.element_size() / 1e6
        print(f"{label} cache {mb:6.1f} MB | head fitting {th.wall:6.2f} s wall {th.cpu:6.2f} s CPU "
              f"({head.training['voxels']} voxels, {args.steps} steps) | apply {ta.wall:6.2f} s wall {ta.cpu:6.2f} s CPU "
              f"| Dice WM on the moved T2-like copy {dice(seg, truth):.3f}")


if __name__ == "__main__":
    main()
