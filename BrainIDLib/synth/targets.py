"""The anatomy (T1) target convention, one definition for synthetic and real training data.

A T1 target is divided by the median of its white matter (FreeSurfer labels 2 and 41), as the
official generator does for the deformed T1, so that WM is ~1 whatever the scanner's scale. When
the crop has no labels or too little WM (< WM_MIN_VOXELS), the 99.5th percentile of the positive
voxels is the divisor instead: robust to a few hot voxels, and on a skull-stripped T1 it lands just
above the WM intensity (WM ~0.8-0.95 rather than exactly 1).
"""

from __future__ import annotations

import torch

from .tables import WM_LABELS

WM_MIN_VOXELS = 10
FALLBACK_PERCENTILE = 99.5
_MAX_QUANTILE_VOXELS = 1_000_000  # torch.quantile's input limit is 2^24; a strided subsample is plenty


def anatomy_target(t1: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """t1 (any shape) clamped at 0 and divided by its WM median (labels on the same grid), else by
    its positive voxels' 99.5th percentile. Returns a new float32 tensor."""
    t = torch.nan_to_num(t1.float()).clamp_min(0)
    scale = 0.0
    if labels is not None:
        wm = t[(labels == WM_LABELS[0]) | (labels == WM_LABELS[1])]
        if wm.numel() >= WM_MIN_VOXELS:
            scale = float(wm.median())
    if scale <= 0:
        pos = t[t > 0]
        if pos.numel():
            pos = pos[:: max(1, pos.numel() // _MAX_QUANTILE_VOXELS)]
            scale = float(torch.quantile(pos, FALLBACK_PERCENTILE / 100))
    return t / max(scale, 1e-6)
