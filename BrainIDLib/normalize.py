"""Intensity normalisation that survives real scans, shared by training and inference.

Whole-volume min-max (the official code's choice) lets one hot voxel, a bright fat pad or CT's
-1000..+3000 HU range decide where the brain lands in [0, 1]. "robust" instead:

1. CT in Hounsfield units (at least CT_AIR_FRACTION, 1%, of the voxels below -500, as air is around
   -1000 HU and no MR scan stores large negative values) is clipped to a brain window first;
2. lo = the `percentiles[0]` percentile of all voxels, hi = the `percentiles[1]` percentile of the
   *head* (voxels above lo + 10% of the robust range, FSL-bet's threshold), so the amount of air in
   the field of view does not move hi, and outliers above it saturate;
3. (x - lo) / (hi - lo), clipped to [0, 1].

The generator calls this on every synthetic sample and inference on every scan, and a model's
metadata names the method, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch

ROBUST = {"method": "robust", "percentiles": [0.5, 99.5], "ct_window": [0.0, 80.0]}
MINMAX = {"method": "minmax", "percentiles": [0.0, 100.0]}
METHODS = ("robust", "minmax", "none")

_SAMPLE = 2_000_000  # voxels used for the percentiles (a strided subsample of larger volumes)
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.01


def _subsample(flat: torch.Tensor) -> torch.Tensor:
    step = max(1, -(-flat.numel() // _SAMPLE))
    return flat[::step].float()


def looks_like_ct(x: torch.Tensor) -> bool:
    """True for Hounsfield-unit CT: at least 1% of the voxels below -500 (air)."""
    s = _subsample(x.reshape(-1))
    return bool((s < CT_AIR_HU).float().mean() >= CT_AIR_FRACTION)


def robust_range(x: torch.Tensor, percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """(lo, hi) as in the module docstring, from a strided sample of x (any shape)."""
    s = _subsample(x.reshape(-1))
    lo_p, hi_p = float(percentiles[0]) / 100, float(percentiles[1]) / 100
    lo = float(torch.quantile(s, lo_p)) if lo_p > 0 else float(s.min())
    top = float(torch.quantile(s, 0.999))
    head = s[s > lo + 0.1 * (top - lo)]
    if head.numel() < 16:
        head = s
    hi = float(torch.quantile(head, hi_p)) if hi_p < 1 else float(head.max())
    if hi <= lo:  # (nearly) constant inside the head: fall back to the full range
        lo, hi = float(x.min()), float(x.max())
    return lo, hi


def normalise_tensor(x: torch.Tensor, spec: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Normalise x (any shape, float) per `spec` (ROBUST, MINMAX or {"method": "none"}).

    Returns the float32 result and what was done ({"lo", "hi", "ct"}) so that a paired image (the
    generator's clean target) can get exactly the same mapping with `apply_range`."""
    spec = spec or MINMAX
    method = spec.get("method", "minmax")
    x = x.float()
    if method == "none":
        return x, {"lo": 0.0, "hi": 1.0, "ct": False}
    ct = method == "robust" and looks_like_ct(x)
    if ct:
        w_lo, w_hi = (float(v) for v in spec.get("ct_window", ROBUST["ct_window"]))
        x = x.clamp(w_lo, w_hi)
    if method == "robust":
        lo, hi = robust_range(x, spec.get("percentiles", ROBUST["percentiles"]))
    else:
        lo_p, hi_p = (list(spec.get("percentiles", [0.0, 100.0])) + [0.0, 100.0])[:2]
        s = _subsample(x.reshape(-1))
        lo = float(x.min()) if lo_p <= 0 else float(torch.quantile(s, lo_p / 100))
        hi = float(x.max()) if hi_p >= 100 else float(torch.quantile(s, hi_p / 100))
        if hi <= lo:
            lo, hi = float(x.min()), float(x.max())
    info = {"lo": lo, "hi": hi, "ct": ct}
    return apply_range(x, info), info


def apply_range(x: torch.Tensor, info: dict) -> torch.Tensor:
    """(x - lo) / (hi - lo) clipped to [0, 1] (a new float32 tensor)."""
    span = max(info["hi"] - info["lo"], 1e-12)
    return ((x.float() - info["lo"]) * (1.0 / span)).clamp_(0.0, 1.0)


def normalise_array(array: np.ndarray, spec: dict | None) -> tuple[np.ndarray, tuple[float, float]]:
    """numpy front end for inference: (normalised float32 array, (lo, hi) on the input's scale)."""
    method = (spec or MINMAX).get("method", "minmax")
    if method not in METHODS:
        from .errors import BrainIDError

        raise BrainIDError(f"the model asks for normalisation {method!r}, which this BrainID does not know; upgrade BrainID")
    out, info = normalise_tensor(torch.from_numpy(np.ascontiguousarray(array)), spec)
    return out.numpy(), (info["lo"], info["hi"])
