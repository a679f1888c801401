"""FFT-free separable filters: Gaussian blur (per-sample sigmas, grouped 1D convolutions) and the 1D
blur+resample / linear-upsample matrices used for slice thickness and resolution loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernels(sigmas: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """(n, k) normalised 1D Gaussian kernels with one common odd length; sigma 0 -> identity."""
    s = sigmas.to(torch.float32).clamp_min(0)
    half = max(1, int(math.ceil(truncate * float(s.max())))) if s.numel() else 1
    x = torch.arange(-half, half + 1, dtype=torch.float32, device=s.device)
    k = torch.exp(-0.5 * (x[None] / s.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    ident = torch.zeros_like(k)
    ident[:, half] = 1
    return torch.where((s < 1e-3)[:, None], ident, k)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur (n, D, H, W) with per-sample sigma (n,) or (n, 3) in voxels; replicate borders."""
    n = x.shape[0]
    sigma = sigma.to(x.device, torch.float32)
    if sigma.dim() == 1:
        sigma = sigma[:, None].expand(n, 3)
    y = x[None]  # (1, n, D, H, W): samples as channels, grouped conv
    for ax in range(3):
        s = sigma[:, ax]
        if float(s.max()) < 1e-3:
            continue
        k = gaussian_kernels(s)
        half = (k.shape[1] - 1) // 2
        shape = [n, 1, 1, 1, 1]
        shape[2 + ax] = k.shape[1]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = half
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape).to(x.dtype), groups=n)
    return y[0]


def downsample_matrix(n: int, n_low: int, sigma: float, device=None) -> torch.Tensor:
    """(n_low, n): Gaussian blur (sigma, high-res voxels) evaluated at the low-res cell centres,
    weights renormalised at the borders (no darkening)."""
    step = n / n_low
    pos = (torch.arange(n_low, dtype=torch.float64) + 0.5) * step - 0.5
    i = torch.arange(n, dtype=torch.float64)
    sig = max(float(sigma), 0.3)
    w = torch.exp(-0.5 * ((i[None] - pos[:, None]) / sig) ** 2)
    w = w / w.sum(dim=1, keepdim=True)
    return w.to(device=device, dtype=torch.float32)


def upsample_matrix(n: int, n_low: int, device=None) -> torch.Tensor:
    """(n, n_low): linear interpolation from the low-res cell centres back to every voxel
    (constant beyond the first/last centre)."""
    step = n / n_low
    pos = (torch.arange(n_low, dtype=torch.float64) + 0.5) * step - 0.5
    i = torch.arange(n, dtype=torch.float64)
    if n_low == 1:
        return torch.ones((n, 1), dtype=torch.float32, device=device)
    w = (1 - (i[:, None] - pos[None]).abs() / step).clamp_min(0)
    w[i < pos[0], 0] = 1
    w[i > pos[-1], -1] = 1
    w = w / w.sum(dim=1, keepdim=True)
    return w.to(device=device, dtype=torch.float32)


def apply_along(x: torch.Tensor, M: torch.Tensor, axis: int) -> torch.Tensor:
    """Contract the (m, n) matrix M with axis `axis` of the 3D tensor x (size n there)."""
    y = torch.tensordot(M, x, dims=([1], [axis]))  # new axis first
    return y.movedim(0, axis)
