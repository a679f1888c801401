"""Known-answer image pairs for correspondence and few-shot checks (tests, benchmarks, figures).

From one brain scan (e.g. the shipped MNI152 sample): a coarse tissue label map, a re-contrasted
copy (T2-like: the brain's intensities inverted, so white matter turns dark and CSF bright) and a
copy displaced by a known rigid transform and resampled on another grid. The true location of
any point is then known: `transform @ point`.

    img = nib.load(sample_path())
    moved, T = displaced(recontrast(img), rotation_deg=(5, 0, 8), translation_mm=(6, -4, 3), spacing=2.0)
    true_point = apply_transform(T, point_ras)
"""

from __future__ import annotations

import numpy as np

from BrainIDLib.volume import load_volume, make_nifti

# FreeSurfer ids for the coarse tissue classes (left/right split at the image's R = 0 plane)
CSF, LEFT_GM, LEFT_WM, RIGHT_GM, RIGHT_WM = 24, 3, 2, 42, 41


def _brain(img) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vol = load_volume(img)
    a = vol.array.astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
    mask = a > 0.05
    return a, mask, vol.affine


def tissue_labels(img, thresholds=(0.35, 0.62)):
    """Coarse CSF / GM / WM labels by intensity of a T1-like scan, hemispheres split at R = 0 (FreeSurfer ids)."""
    a, mask, affine = _brain(img)
    lo, hi = thresholds
    ijk = np.indices(a.shape).reshape(3, -1).T
    r = (ijk @ affine[:3, :3].T + affine[:3, 3])[:, 0].reshape(a.shape)
    left = r < 0
    lab = np.zeros(a.shape, np.int16)
    lab[mask & (a < lo)] = CSF
    gm = mask & (a >= lo) & (a < hi)
    wm = mask & (a >= hi)
    lab[gm & left], lab[gm & ~left] = LEFT_GM, RIGHT_GM
    lab[wm & left], lab[wm & ~left] = LEFT_WM, RIGHT_WM
    return make_nifti(lab, affine, np.int16)


def recontrast(img, mode: str = "t2", gamma: float = 0.8):
    """A re-contrasted copy: "t2" inverts the brain's intensities (background stays 0), "gamma"
    applies a monotonic power law (a mild contrast change)."""
    a, mask, affine = _brain(img)
    if mode == "t2":
        out = np.where(mask, (1.1 - a) ** gamma, 0.0)
    elif mode == "gamma":
        out = np.where(mask, a**gamma, 0.0)
    else:
        raise ValueError(f"unknown mode {mode!r}; use t2 or gamma")
    return make_nifti((out * 1000).astype(np.float32), affine)


def rigid_transform(rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world transform: rotations about R, A, S (degrees, applied in that order) around
    `centre`, then a translation (mm)."""
    rx, ry, rz = np.deg2rad(rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    c = np.asarray(centre, dtype=float)
    t = np.eye(4)
    t[:3, :3] = rot
    t[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=float)
    return t


def apply_transform(t: np.ndarray, points) -> np.ndarray:
    p = np.asarray(points, dtype=float)
    return p @ t[:3, :3].T + t[:3, 3]


def displaced(img, rotation_deg=(0.0, 0.0, 8.0), translation_mm=(6.0, -4.0, 3.0), spacing: float | None = 2.0,
              order: int = 1, labels: bool = False):
    """(moved image, T): the scan moved by the rigid world transform T (content at x goes to T x),
    resampled on a new RAS grid of `spacing` mm covering the moved content. Labels: nearest neighbour."""
    from scipy import ndimage

    vol = load_volume(img) if not labels else None
    if labels:
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=float)
    else:
        data, affine = vol.array, vol.affine
    centre = affine[:3, :3] @ ((np.array(data.shape) - 1) / 2.0) + affine[:3, 3]
    t = rigid_transform(rotation_deg, translation_mm, centre)
    # the moved content's bounding box -> the new grid
    corners = np.array([[i, j, k] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1) for k in (0, data.shape[2] - 1)], float)
    world = apply_transform(t, corners @ affine[:3, :3].T + affine[:3, 3])
    sp = float(spacing) if spacing else float(np.sqrt((affine[:3, :3] ** 2).sum(0)).mean())
    lo, hi = world.min(0) - sp, world.max(0) + sp
    shape = tuple(int(np.ceil((h - l) / sp)) + 1 for l, h in zip(lo, hi))
    new_affine = np.diag([sp, sp, sp, 1.0])
    new_affine[:3, 3] = lo
    # output voxel -> world -> T^-1 -> input voxel
    m = np.linalg.inv(affine) @ np.linalg.inv(t) @ new_affine
    out = ndimage.affine_transform(data.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape,
                                   order=0 if labels else order, mode="constant", cval=0.0)
    if labels:
        return make_nifti(out.astype(np.int16), new_affine, np.int16), t
    return make_nifti(out, new_affine), t


def grid_points(img, n: int = 12, seed: int = 0, margin_mm: float = 12.0, level: float = 0.2) -> np.ndarray:
    """n random RAS points inside the brain of a scan, at least `margin_mm` from its bounding box edge."""
    from scipy import ndimage

    a, mask, affine = _brain(img)
    sp = float(np.sqrt((affine[:3, :3] ** 2).sum(0)).mean())
    inner = ndimage.binary_erosion(mask & (a > level), iterations=max(1, int(round(margin_mm / sp))))
    ijk = np.argwhere(inner)
    rng = np.random.default_rng(seed)
    pick = ijk[rng.choice(len(ijk), min(n, len(ijk)), replace=False)]
    return pick @ affine[:3, :3].T + affine[:3, 3]


def intensity_feature_map(fm, img):
    """A baseline for few-shot checks: `fm` (a FeatureMap) with its features replaced by a cubic
    encoding of the raw intensity of `img` on the same grid (unit length per voxel). A head on it
    can only learn intensity rules, which flip when the contrast does."""
    from dataclasses import replace

    import torch

    from BrainIDLib.feature_maps import sample_grid

    vol = load_volume(img)
    ijk = np.indices(fm.shape).reshape(3, -1).T.astype(float)
    world = ijk @ fm.affine[:3, :3].T + fm.affine[:3, 3]
    i = sample_grid(torch.from_numpy(vol.array)[None], vol.affine, world)[0]
    i = (i - i.min()) / (i.max() - i.min())
    f = torch.stack([i, i**2, i**3, torch.full_like(i, 0.5)]).reshape((4,) + tuple(fm.shape))
    return replace(fm, features=(f / f.norm(dim=0, keepdim=True)).half())


def painted_slices(mask: np.ndarray, axis: int, slices) -> np.ndarray:
    """A few-shot annotation as a user would paint it: `mask` copied (as label 1) into the given
    slices along `axis`, 0 everywhere else (int16)."""
    paint = np.zeros(mask.shape, np.int16)
    for j in slices:
        sl = [slice(None)] * mask.ndim
        sl[axis] = int(j)
        paint[tuple(sl)] = mask[tuple(sl)]
    return paint
