"""Few-shot head training on the CPU for a 1 mm volume: feature extraction vs head fitting vs
applying, and a float32 vs float16 feature cache (memory, fitting time, Dice on the other contrast).
With --quality: the few-shot Dice across contrast for several paint choices (see `quality`).

The 1 mm volume is the shipped MNI152 sample resampled to 1 mm; white matter is painted in three
coronal slices (labels from brainid_devtools.demo_pairs.tissue_labels); the head is applied to a
re-contrasted (T2-like) copy moved by a known rigid transform. Wall and CPU seconds are printed
(the CPU figure is the fair one on a shared machine).

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/fewshot.py [--model brainid-lite] [--threads 2]
    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/fewshot.py --quality [--weight-decay 1e-4] [--no-padding-rule]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's brainid_devtools

import BrainIDLib as bid  # noqa: E402
from BrainIDLib.feature_maps import compute_feature_map  # noqa: E402
from BrainIDLib.fewshot import segment, train_head  # noqa: E402
from BrainIDLib.samples import sample_path  # noqa: E402
from BrainIDLib.volume import make_nifti  # noqa: E402
from brainid_devtools.demo_pairs import displaced, intensity_feature_map, painted_slices, recontrast, tissue_labels  # noqa: E402


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


# ------------------------------------------------------------------------------------ quality
# Paint choices: (description, axis, slice indices) on the shipped 1.5 mm sample (105 x 129 x 112).
# The first is the slow test's (Testing/Python/test_correspondence_fewshot.py).
PAINTS = [("3 coronal 45,65,85 (test)", 1, (45, 65, 85)),
          ("3 coronal 40,60,80", 1, (40, 60, 80)),
          ("3 coronal 50,70,90", 1, (50, 70, 90)),
          ("1 coronal 65", 1, (65,)),
          ("5 coronal 35,50,65,80,95", 1, (35, 50, 65, 80, 95)),
          ("3 axial 45,60,75", 2, (45, 60, 75))]
MOVE = {"rotation_deg": (5, 0, 8), "translation_mm": (6, -4, 3), "spacing": 2.0}


def quality_setup(model, cache=None) -> dict:
    """The slow test's pair: the sample (T1) and its T2-like copy moved onto a 2 mm grid, their
    features, WM truth on both, and the intensity-baseline feature maps."""
    t1 = nib.load(sample_path())
    moved, _ = displaced(recontrast(t1, "t2"), **MOVE)
    labels = tissue_labels(t1)
    moved_labels, _ = displaced(labels, labels=True, **MOVE)
    src = compute_feature_map(t1, model=model, cache=cache)
    tgt = compute_feature_map(moved, model=model, cache=cache)
    return {"t1": t1, "moved": moved, "wm": np.isin(np.asarray(labels.dataobj), [2, 41]),
            "truth": np.isin(np.asarray(moved_labels.dataobj), [2, 41]), "src": src, "tgt": tgt,
            "src_int": intensity_feature_map(src, t1), "tgt_int": intensity_feature_map(tgt, moved)}


def quality_rows(setup: dict, paints=PAINTS, baseline: bool = True, **train_kwargs) -> list[dict]:
    """Dice of WM on the moved T2-like copy (brainid-lite head and intensity-baseline head) and on
    the painted T1 itself, for each paint choice."""
    rows = []
    for label, axis, slices in paints:
        ann = make_nifti(painted_slices(setup["wm"], axis, slices), setup["t1"].affine, np.int16)
        head = train_head([setup["src"]], [ann], names={1: "WM"}, **train_kwargs)
        d_tgt = dice(np.asarray(segment(setup["tgt"], head).dataobj) == 1, setup["truth"])
        d_src = dice(np.asarray(segment(setup["src"], head).dataobj) == 1, setup["wm"])
        d_base = float("nan")
        if baseline:
            base = train_head([setup["src_int"]], [ann], names={1: "WM"}, **train_kwargs)
            d_base = dice(np.asarray(segment(setup["tgt_int"], base).dataobj) == 1, setup["truth"])
        rows.append({"paint": label, "voxels": int((ann.get_fdata() > 0).sum()), "dice": d_tgt, "dice_t1": d_src,
                     "baseline": d_base})
    return rows


def print_quality(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'paint':28s} {'painted':>8s} {'Dice T2-like moved':>19s} {'Dice painted T1':>16s} {'intensity baseline':>19s}")
    for r in rows:
        print(f"{r['paint']:28s} {r['voxels']:8d} {r['dice']:19.3f} {r['dice_t1']:16.3f} {r['baseline']:19.3f}")
    d = np.array([r["dice"] for r in rows])
    b = np.array([r["baseline"] for r in rows])
    print(f"{'min / mean / max':28s} {'':8s} {d.min():.3f}/{d.mean():.3f}/{d.max():.3f}     "
          f"{'':16s} {b.min():.3f}/{b.mean():.3f}/{b.max():.3f}")


def quality(args) -> None:
    from BrainIDLib.feature_maps import FeatureCache

    model = bid.load_model(args.model)
    cache = FeatureCache(args.feature_cache) if args.feature_cache else None
    with Timer() as t:
        setup = quality_setup(model, cache)
    print(f"model {args.model}; sample {setup['t1'].shape} at 1.5 mm -> T2-like copy moved by {MOVE}; "
          f"features in {t.wall:.1f} s")
    kwargs = {k: v for k, v in (("steps", args.steps), ("weight_decay", args.weight_decay)) if v is not None}
    if args.no_padding_rule:  # as before the rule: the head's labels in the empty padding are kept
        for k in ("src", "tgt", "src_int", "tgt_int"):
            setup[k] = replace(setup[k], padding=None)
    print_quality(quality_rows(setup, **kwargs), "few-shot WM Dice (train_head defaults"
                  + "".join(f", {k}={v}" for k, v in kwargs.items())
                  + (", without the padding rule)" if args.no_padding_rule else ")"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brainid-lite")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="head fitting steps (default: train_head's)")
    ap.add_argument("--quality", action="store_true", help="Dice across contrast for several paint choices")
    ap.add_argument("--feature-cache", default=None, help="a folder to keep features in between runs (--quality)")
    ap.add_argument("--weight-decay", type=float, default=None, help="head L2 penalty (default: train_head's)")
    ap.add_argument("--no-padding-rule", action="store_true",
                    help="--quality: keep the head's labels in the scans' empty padding (as before the rule)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quality:
        return quality(args)
    args.steps = args.steps or 300
    sample = nib.load(sample_path())
    zoom = np.array(sample.header.get_zooms()[:3]) / 1.0
    data = ndimage.zoom(np.asarray(sample.dataobj, dtype=np.float32), zoom, order=1)
    affine = sample.affine.copy()
    affine[:3, :3] = np.eye(3)
    t1 = make_nifti(data, affine)
    labels = np.asarray(tissue_labels(t1).dataobj)
    wm = np.isin(labels, [2, 41])
    paint = painted_slices(wm, 1, np.linspace(0.3, 0.7, 3) * labels.shape[1])
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
