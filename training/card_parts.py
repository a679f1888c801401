"""What the model card and the whole-head evaluation (head_eval) share: the renderer's contrast
families, the coarse tissue groups, segmentation scores and the figure helpers. Its own module so
neither of the two imports the other."""

from __future__ import annotations

import math

import numpy as np

from BrainIDLib.labels import SEGMENTATION_LABELS, label_color

FAMILIES = ("t1", "t2", "flair", "ct", "gmm")
FAMILY_NAMES = {"t1": "T1-like", "t2": "T2-like", "flair": "FLAIR-like", "ct": "CT-like", "gmm": "random GMM"}
FAMILY_OPTIONS = {f: {"ct_prob": float(f == "ct"), "flair_prob": float(f == "flair"), "t1_prob": float(f == "t1"),
                      "t2_prob": float(f == "t2")} for f in FAMILIES}
REGIMES = ("1mm", "thick_slice", "low_field", "low_iso")
SEVERITIES = (0.0, 0.5, 1.0)
TISSUES = {
    "cerebral WM": (2, 41, 77),
    "cerebral cortex": (3, 42),
    "CSF + ventricles": (4, 43, 14, 15, 24),
    "deep GM": (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60),
    "cerebellum": (7, 8, 46, 47),
    "brainstem": (16,),
}
_SEG = np.array(SEGMENTATION_LABELS)


def condition(k: int) -> tuple[str, str, float]:
    """The k-th (family, regime, severity) of a series of draws: the three cycle at co-prime periods
    (5, 4, 3), so 10+ consecutive draws cover every family, regime and severity."""
    return FAMILIES[k % len(FAMILIES)], REGIMES[k % len(REGIMES)], SEVERITIES[k % len(SEVERITIES)]


def tissue_of(ids: np.ndarray) -> np.ndarray:
    lut = np.zeros(max(SEGMENTATION_LABELS) + 1, dtype=np.int8)
    for k, labs in enumerate(TISSUES.values(), start=1):
        lut[list(labs)] = k
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, np.int8)
    ok = (ids >= 0) & (ids < len(lut))
    out[ok] = lut[ids[ok]]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else float("nan")


def nanmean(v) -> float:
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def colour(ids: np.ndarray) -> np.ndarray:
    out = np.zeros(ids.shape + (3,), np.float32)
    for lab in np.unique(ids):
        if lab:
            out[ids == lab] = np.array(label_color(int(lab))) / 255.0
    return out


def overlay(gray: np.ndarray, ids: np.ndarray, alpha=0.45) -> np.ndarray:
    g = (gray - gray.min()) / max(1e-6, float(gray.max() - gray.min()))
    rgb = np.repeat(g[..., None], 3, -1)
    m = ids > 0
    rgb[m] = (1 - alpha) * rgb[m] + alpha * colour(ids)[m]
    return rgb


def show(ax, img, title=None, cmap="gray"):
    # axis 0 = x (left-right), axis 1 = y (posterior-anterior): transpose for display, origin lower
    ax.imshow(np.swapaxes(img, 0, 1), cmap=cmap, origin="lower", interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
