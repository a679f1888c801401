"""Per-sample corruption: bias field, resolution loss (four regimes, slice thickness, blur,
downsample, noise at low resolution, linear upsample), and optional motion / ghosting artefacts.

Everything is separable matrix products or grouped 1D convolutions (no FFT), so it runs the same on
CPU and GPU. Small random numbers come from a CPU generator, voxel noise from the device generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .filters import apply_along, downsample_matrix
from .spatial import uniform

LN5_OVER_PI = math.log(5.0) / math.pi
REGIMES = ("1mm", "thick_slice", "low_field", "isotropic_low")


def bias_field(rng: torch.Generator, size, fractions, stds, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 1, *size) multiplicative field exp(upsampled N(0, std)), the coarse grid having
    max(2, ceil(fraction * size)) points per axis (upsampled linearly, as the official code)."""
    if out is None:
        out = torch.empty((len(stds), 1, *size), device=device, dtype=torch.float32)
    for i, (frac, std) in enumerate(zip(fractions, stds)):
        shape = [max(2, int(math.ceil(float(frac) * s))) for s in size]
        coarse = torch.randn(shape, generator=rng, dtype=torch.float32) * float(std)
        up = F.interpolate(coarse[None, None].to(device), size=tuple(size), mode="trilinear", align_corners=True)
        torch.exp(up[0], out=out[i])
    return out


def draw_resolution(rng: torch.Generator, probs, blur_factor=(0.85, 1.15)) -> dict:
    """One regime (index into REGIMES) with spacing, slice thickness and blur sigma per axis (mm =
    voxels of the 1 mm grid). Sigma = U(blur_factor) * ln(5)/pi * thickness on axes with
    thickness > 1 mm, 0 elsewhere."""
    p = torch.tensor(probs, dtype=torch.float64)
    regime = int(torch.multinomial(p / p.sum(), 1, generator=rng))
    spacing = [1.0, 1.0, 1.0]
    thickness = [1.0, 1.0, 1.0]
    if regime == 1:
        ax = int(torch.randint(0, 3, (1,), generator=rng))
        spacing[ax] = uniform(rng, 2.5, 8.5)
        thickness[ax] = min(spacing[ax], uniform(rng, 4.0, 6.0))
    elif regime == 2:
        ax = int(torch.randint(0, 3, (1,), generator=rng))  # the 5 mm axis
        base = [1.3, 1.3, 1.3]
        base[ax] = 5.0
        spacing = [b + uniform(rng, 0.0, 0.4) for b in base]
        thickness = list(spacing)
    elif regime == 3:
        spacing = [uniform(rng, 2.0, 5.0) for _ in range(3)]
        thickness = list(spacing)
    f = uniform(rng, blur_factor[0], blur_factor[1])
    sigma = [f * LN5_OVER_PI * t if t > 1.0 else 0.0 for t in thickness]
    return {"regime": regime, "spacing": spacing, "thickness": thickness, "sigma": sigma}


def degrade(x: torch.Tensor, res: dict, noise_std: float, noise_gen: torch.Generator) -> torch.Tensor:
    """One sample (D, H, W): blur with slice thickness, downsample to `spacing`, add Gaussian noise
    (std on the 25-225 scale), clamp at 0, upsample linearly back to the grid."""
    size = x.shape
    dev = x.device
    lows = [max(1, int(round(n / s))) if s > 1.0 else n for n, s in zip(size, res["spacing"])]
    # the axis that shrinks most goes first: cheaper contractions
    order = sorted(range(3), key=lambda a: lows[a] / size[a])
    y = x
    for ax in order:
        if lows[ax] != size[ax] or res["sigma"][ax] > 0:
            y = apply_along(y, downsample_matrix(size[ax], lows[ax], res["sigma"][ax], dev), ax)
    if noise_std > 0:
        noise = torch.randn(y.shape, generator=noise_gen, device=dev, dtype=y.dtype)
        y = noise.mul_(noise_std).add_(y)
    elif y is x:
        y = x.clone()
    y = y.clamp_min_(0)
    if tuple(y.shape) != tuple(size):
        # linear interpolation from the low-res cell centres (align_corners=False), constant beyond
        # the outer centres: one trilinear call, same numbers as the separable upsample_matrix
        y = F.interpolate(y[None, None], size=tuple(size), mode="trilinear", align_corners=False)[0, 0]
    return y.contiguous()


def ghosting(x: torch.Tensor, rng: torch.Generator, strength: float) -> torch.Tensor:
    """Motion-like artefacts without FFT, for one sample (D, H, W): N/2 ghost along a random
    phase-encoding axis (amplitude ~ strength) plus a short translational smear along it."""
    ax = int(torch.randint(0, 3, (1,), generator=rng))
    amp = strength * uniform(rng, 0.5, 1.0)
    shift = int(torch.randint(1, 4, (1,), generator=rng))
    w = min(0.5, strength)
    n = x.shape[ax]
    out = x * (1 - w)
    # smear: half the moving weight `shift` voxels each way (zero beyond the edge)
    if shift < n:
        out.narrow(ax, shift, n - shift).add_(x.narrow(ax, 0, n - shift), alpha=w / 2)
        out.narrow(ax, 0, n - shift).add_(x.narrow(ax, shift, n - shift), alpha=w / 2)
    # N/2 ghost, wrapping around the field of view
    h = n // 2
    if h:
        out.narrow(ax, h, n - h).add_(x.narrow(ax, 0, n - h), alpha=amp)
        out.narrow(ax, 0, h).add_(x.narrow(ax, n - h, h), alpha=amp)
    return out
