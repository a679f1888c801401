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


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """Blur (n, D, H, W) with per-sample sigma (n,) or (n, 3) in voxels; replicate borders.
    Weighted sums of shifted views (one fused multiply-add per tap): faster on CPU than a grouped
    conv3d for the short kernels used here, and the same on GPU."""
    n = x.shape[0]
    sigma = sigma.to(x.device, torch.float32)
    if sigma.dim() == 1:
        sigma = sigma[:, None].expand(n, 3)
    y = x
    for ax in range(3):
        s = sigma[:, ax]
        if float(s.max()) < 1e-3:
            continue
        k = gaussian_kernels(s, truncate).to(x.dtype)
        half = (k.shape[1] - 1) // 2
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = half
        yp = F.pad(y[None], pad, mode="replicate")[0]
        length = y.shape[ax + 1]
        out = yp.narrow(ax + 1, 0, length) * k[:, 0].view(n, 1, 1, 1)
        for j in range(1, k.shape[1]):
            out.addcmul_(yp.narrow(ax + 1, j, length), k[:, j].view(n, 1, 1, 1))
        y = out
    return y


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
    """Contract the (m, n) matrix M with axis `axis` of the 3D tensor x (size n there); plain
    (batched) matrix products that need no permuted copies; the result is contiguous."""
    x = x.contiguous()
    a, b, c = x.shape
    m = M.shape[0]
    if axis == 0:
        return (M @ x.view(a, b * c)).view(m, b, c)
    if axis == 1:
        return torch.matmul(M, x)  # broadcast over the first axis
    return (x.view(a * b, c) @ M.t().contiguous()).view(a, b, m)


def lookup(lut: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """lut[index] for an integer volume (index_select: about twice as fast as advanced indexing)."""
    return lut.index_select(0, index.reshape(-1)).view(index.shape)
