"""Evaluation metrics: Dice per FreeSurfer structure, PSNR, 3D SSIM and MS-SSIM, L1, normalised L2,
and the feature-robustness measures of Brain-ID (intra-subject consistency, inter-subject
distinctiveness).

Every function accepts numpy arrays or torch tensors and returns plain Python floats (or dicts of
them), computed in float64 on the CPU unless stated otherwise.

Conventions
- Dice of a structure absent from both prediction and reference is NaN (undefined) and is left out
  of the mean; present in one only, it is 0.
- PSNR uses the reference's intensity range (max - min) unless `data_range` is given. Identical
  images have infinite PSNR; it is capped at `PSNR_CAP_DB` (100 dB) so that means and JSON stay
  finite, and every value is clipped to that cap.
- SSIM is the 3D Gaussian-window SSIM (sigma 1.5, window 11 voxels, shrunk to fit small volumes,
  K1=0.01, K2=0.03), averaged over the 'valid' region.
- MS-SSIM is its multi-scale form with Wang et al.'s weights (0.0448, 0.2856, 0.3001, 0.2363,
  0.1333) over 5 scales when the volume allows: every axis must still span the 11-voxel window at
  the coarsest scale (at least 161 voxels per axis for 5 scales, 81 for 4, 41 for 3, 21 for 2).
  Smaller volumes use fewer scales, with the first weights renormalised to sum 1 (one scale =
  SSIM). Terms are clamped at 0 so that the fractional powers stay real (as pytorch-msssim does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .labels import SEGMENTATION_LABELS, label_name

PSNR_CAP_DB = 100.0
# Wang et al.'s MS-SSIM exponents, finest scale first
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _t64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _check_shapes(a, b, what: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{what}: prediction {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape")


# --- segmentation ---------------------------------------------------------------------------

def dice_per_label(pred, target, labels=SEGMENTATION_LABELS, include_background: bool = False) -> dict[int, float]:
    """{FreeSurfer id: Dice} for label maps holding FreeSurfer ids (background 0 skipped by default)."""
    p, t = _np(pred), _np(target)
    _check_shapes(p, t, "dice")
    out = {}
    for lab in labels:
        lab = int(lab)
        if lab == 0 and not include_background:
            continue
        pm, tm = p == lab, t == lab
        denom = int(pm.sum()) + int(tm.sum())
        out[lab] = float("nan") if denom == 0 else 2.0 * int(np.logical_and(pm, tm).sum()) / denom
    return out


def mean_dice(per_label: dict) -> float:
    """Mean over the structures that are defined (not NaN); NaN if none is."""
    vals = [v for v in per_label.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def dice_table(pred, target, labels=SEGMENTATION_LABELS) -> dict:
    """{"per_structure": {name: dice}, "mean": mean Dice} with FreeSurfer structure names."""
    per = dice_per_label(pred, target, labels)
    return {"per_structure": {label_name(k): v for k, v in per.items()}, "mean": mean_dice(per)}


# --- images ---------------------------------------------------------------------------------

def l1(pred, target, mask=None) -> float:
    p, t = _t64(pred), _t64(target)
    _check_shapes(p, t, "l1")
    d = (p - t).abs()
    if mask is not None:
        m = _t64(mask).bool()
        return float(d[m].mean()) if m.any() else float("nan")
    return float(d.mean())


def psnr(pred, target, data_range: float | None = None, mask=None, cap_db: float = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio in dB, capped at `cap_db` (identical images give the cap)."""
    p, t = _t64(pred), _t64(target)
    _check_shapes(p, t, "psnr")
    if mask is not None:
        m = _t64(mask).bool()
        p, t = p[m], t[m]
    rng = float(t.max() - t.min()) if data_range is None else float(data_range)
    if rng <= 0:
        raise ValueError("psnr: the reference is constant; pass data_range")
    mse = float(((p - t) ** 2).mean())
    if mse == 0:
        return float(cap_db)
    return float(min(cap_db, 10.0 * math.log10(rng * rng / mse)))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _prepare_pair(pred, target, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, D, H, W) float64 copies; 2D inputs become one slice."""
    p, t = _t64(pred), _t64(target)
    _check_shapes(p, t, what)
    if p.dim() == 2:
        p, t = p[None], t[None]
    if p.dim() != 3:
        raise ValueError(f"{what} expects 2D or 3D images, got shape {tuple(p.shape)}")
    return p[None, None], t[None, None]


def _constants(t: torch.Tensor, data_range: float | None, k1: float, k2: float) -> tuple[float, float]:
    rng = float(t.max() - t.min()) if data_range is None else float(data_range)
    if rng <= 0:
        rng = 1.0
    return (k1 * rng) ** 2, (k2 * rng) ** 2


def _ssim_and_cs(p: torch.Tensor, t: torch.Tensor, c1: float, c2: float, sigma: float, window: int) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term over the 'valid' region of (1,1,D,H,W) images;
    the window shrinks (to an odd size) along axes shorter than it."""
    sizes = [min(window, s) for s in p.shape[2:]]
    sizes = [s if s % 2 == 1 or s == 1 else s - 1 for s in sizes]

    def blur(x):
        for axis, size in enumerate(sizes):
            if size == 1:
                continue
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = size
            x = F.conv3d(x, _gaussian_window(size, sigma).view(shape))
        return x

    mu_p, mu_t = blur(p), blur(t)
    s_pp = blur(p * p) - mu_p**2
    s_tt = blur(t * t) - mu_t**2
    s_pt = blur(p * t) - mu_p * mu_t
    cs = (2 * s_pt + c2) / (s_pp + s_tt + c2)
    luminance = (2 * mu_p * mu_t + c1) / (mu_p**2 + mu_t**2 + c1)
    return float((luminance * cs).mean()), float(cs.mean())


def ssim(pred, target, data_range: float | None = None, sigma: float = 1.5, window: int = 11,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean 3D SSIM with a separable Gaussian window (2D inputs are treated as one slice)."""
    p, t = _prepare_pair(pred, target, "ssim")
    c1, c2 = _constants(t, data_range, k1, k2)
    return _ssim_and_cs(p, t, c1, c2, sigma, window)[0]


def ms_ssim_scales(shape, window: int = 11, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many scales fit: the most (up to 5) for which every axis longer than one voxel still
    spans a whole window at the coarsest scale (sizes halve, rounding up); at least one."""
    sizes = [int(s) for s in shape if int(s) > 1]
    scales = 1
    while scales < max_scales and all(math.ceil(s / 2**scales) >= window for s in sizes):
        scales += 1
    return scales


def _ms_ssim_from(pred, target, data_range, sigma, window, k1, k2, weights) -> tuple[float, float]:
    """(SSIM, MS-SSIM): the finest scale's SSIM is the plain SSIM, so both come from one pass."""
    p, t = _prepare_pair(pred, target, "ms_ssim")
    c1, c2 = _constants(t, data_range, k1, k2)
    scales = ms_ssim_scales(p.shape[2:], window, len(weights))
    w = torch.tensor(list(weights)[:scales], dtype=torch.float64)
    if scales < len(weights):  # the standard 5 weights are used as published (they sum to 1.0001)
        w = w / w.sum()
    value, first = 1.0, None
    for j in range(scales):
        s, cs = _ssim_and_cs(p, t, c1, c2, sigma, window)
        first = s if first is None else first
        term = s if j == scales - 1 else cs
        value *= max(term, 0.0) ** float(w[j])
        if j < scales - 1:
            kernel = [2 if n > 1 else 1 for n in p.shape[2:]]
            p = F.avg_pool3d(p, kernel, ceil_mode=True)
            t = F.avg_pool3d(t, kernel, ceil_mode=True)
    return first, float(value)


def ms_ssim(pred, target, data_range: float | None = None, sigma: float = 1.5, window: int = 11,
            k1: float = 0.01, k2: float = 0.03, weights=MS_SSIM_WEIGHTS) -> float:
    """3D multi-scale SSIM (Wang, Simoncelli & Bovik 2003): prod_j cs_j^w_j over the finer scales
    times SSIM^w_M at the coarsest, each term clamped at 0, images halved by 2x2x2 averaging between
    scales (an odd axis keeps its last voxel alone, as Wang's reference code with symmetric borders;
    pytorch-msssim zero-pads there instead, so the two agree exactly on even sizes only).
    Scales: ms_ssim_scales (fewer than len(weights) for small volumes, the weights then cut to that
    many and renormalised to sum 1). C1, C2 come from the full-resolution reference."""
    return _ms_ssim_from(pred, target, data_range, sigma, window, k1, k2, weights)[1]


def normalised_l2(pred, target, mask=None) -> float:
    """||pred - target|| / ||target|| (inside `mask` if given): the bias-field error measure."""
    p, t = _t64(pred), _t64(target)
    _check_shapes(p, t, "normalised_l2")
    if mask is not None:
        m = _t64(mask).bool()
        p, t = p[m], t[m]
    denom = float(t.norm())
    return float((p - t).norm()) / denom if denom > 0 else float("nan")


def image_metrics(pred, target, mask=None, data_range: float | None = None) -> dict:
    """L1, PSNR, SSIM and MS-SSIM of an image prediction against its reference."""
    structural, multi_scale = _ms_ssim_from(pred, target, data_range, 1.5, 11, 0.01, 0.03, MS_SSIM_WEIGHTS)
    return {"l1": l1(pred, target, mask), "psnr": psnr(pred, target, data_range, mask),
            "ssim": structural, "ms_ssim": multi_scale}


# --- feature robustness ---------------------------------------------------------------------

def _unit_features(features, mask=None) -> torch.Tensor:
    """(S, C, *spatial) -> (S, C, V) unit vectors per voxel, restricted to `mask` (spatial)."""
    f = features.detach().float() if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features), dtype=torch.float32)
    f = f.reshape(f.shape[0], f.shape[1], -1)
    if mask is not None:
        m = (mask.detach() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))).reshape(-1).bool()
        f = f[:, :, m.to(f.device)]
    return F.normalize(f.double(), dim=1, eps=1e-12)


def feature_consistency(features, mask=None) -> float:
    """Intra-subject consistency: mean cosine similarity of the features at the same voxel across
    S samples of one subject (same anatomy, different contrast/resolution/corruption).

    `features` is (S, C, *spatial) with S >= 2; 1 means identical directions in every sample.
    """
    z = _unit_features(features, mask)
    s = z.shape[0]
    if s < 2:
        raise ValueError("feature_consistency needs at least two samples of one subject")
    if z.shape[2] == 0:
        return float("nan")
    total = z.sum(0)  # (C, V)
    pair_sum = (total * total).sum(0) - (z * z).sum((0, 1))  # sum over i != j of z_i . z_j
    return float((pair_sum / (s * (s - 1))).mean())


def feature_similarity_between(features_a, features_b, mask=None) -> float:
    """Mean cosine similarity of two subjects' features at the same voxel (all sample pairs)."""
    za, zb = _unit_features(features_a, mask), _unit_features(features_b, mask)
    if za.shape[2] == 0:
        return float("nan")
    return float(torch.einsum("scv,tcv->v", za, zb).mean() / (za.shape[0] * zb.shape[0]))


def feature_distinctiveness(features_by_subject: list, mask=None) -> float:
    """Inter-subject distinctiveness: 1 - mean cosine similarity between different subjects'
    features at the same voxel (different anatomy there). Higher is more distinct."""
    if len(features_by_subject) < 2:
        raise ValueError("feature_distinctiveness needs at least two subjects")
    sims = [feature_similarity_between(a, b, mask)
            for i, a in enumerate(features_by_subject) for b in features_by_subject[i + 1:]]
    return float(1.0 - np.nanmean(sims))


__all__ = ["PSNR_CAP_DB", "MS_SSIM_WEIGHTS", "dice_per_label", "mean_dice", "dice_table", "l1", "psnr", "ssim",
           "ms_ssim", "ms_ssim_scales", "normalised_l2",
           "image_metrics", "feature_consistency", "feature_similarity_between", "feature_distinctiveness"]
