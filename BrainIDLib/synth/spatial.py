"""Shared spatial transform of one subject draw: random affine (rotation, shear, scale) about a random
crop centre, a smooth nonlinear displacement sampled on a coarse grid and upsampled linearly, and an
optional left/right mirror. All of it is composed into ONE sampling grid, so the label map is
resampled once (nearest) and the T1 once (linear).

Small random numbers come from a CPU torch.Generator (identical on every device); the grid is built
on the label map's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(rng: torch.Generator, lo: float, hi: float, n: int | None = None):
    u = torch.rand(n if n is not None else 1, generator=rng, dtype=torch.float64)
    v = lo + (hi - lo) * u
    return v if n is not None else float(v[0])


def rotation_matrix(angles_deg) -> torch.Tensor:
    a, b, c = (math.radians(float(v)) for v in angles_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def random_affine(rng: torch.Generator, rotation: float, shear: float, scale: tuple[float, float]) -> dict:
    """Linear part A (3x3, output voxel -> input voxel) = R @ Sh @ S and its parameters."""
    angles = uniform(rng, -rotation, rotation, 3)
    shears = uniform(rng, -shear, shear, 6)
    scales = uniform(rng, scale[0], scale[1], 3)
    sh = torch.eye(3, dtype=torch.float64)
    sh[0, 1], sh[0, 2], sh[1, 0], sh[1, 2], sh[2, 0], sh[2, 1] = shears.tolist()
    A = rotation_matrix(angles.tolist()) @ sh @ torch.diag(scales)
    return {"A": A, "angles": angles, "shears": shears, "scales": scales}


def coarse_displacement(rng: torch.Generator, points: tuple[int, int], std_max: float) -> torch.Tensor:
    """(3, n, n, n) random displacement (input voxels) on a coarse grid; std ~ U(0, std_max)."""
    n = int(torch.randint(points[0], points[1] + 1, (1,), generator=rng))
    std = uniform(rng, 0.0, std_max)
    return torch.randn((3, n, n, n), generator=rng, dtype=torch.float32) * std


def foreground_box(labels: torch.Tensor, brain_lut: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """Inclusive min / max index per axis of the brain (labels with brain_lut[label] true) or, when
    there is none, of all non-zero voxels (whole volume when empty)."""
    # a 1-in-4 subsample is enough for a crop centre and 64x cheaper on a 256^3 map
    sub = 4 if min(labels.shape) >= 64 else 1
    small = labels[::sub, ::sub, ::sub]
    fg = small > 0
    if brain_lut is not None:
        ids = small.reshape(-1).long()
        known = ids < brain_lut.numel()
        brain = brain_lut.index_select(0, ids.clamp(0, brain_lut.numel() - 1)).view(small.shape)
        brain &= fg & known.view(small.shape)
        if bool(brain.any()):
            fg = brain
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        prof = fg.any(dim=other[1]).any(dim=other[0])
        idx = torch.nonzero(prof).flatten()
        if idx.numel() == 0:
            lo.append(0)
            hi.append(labels.shape[ax] - 1)
        else:
            lo.append(int(idx[0]) * sub)
            hi.append(min(labels.shape[ax] - 1, int(idx[-1]) * sub + sub - 1))
    return lo, hi


def random_centre(rng: torch.Generator, labels: torch.Tensor, size, centre_jitter: float = 1.0,
                  brain_lut: torch.Tensor | None = None) -> list[float]:
    """Crop centre: centre of the brain's box (of the head's when the map has no brain labels),
    shifted at random so that the crop stays inside the box along axes where the box is larger than
    the crop."""
    lo, hi = foreground_box(labels, brain_lut)
    c = []
    for ax in range(3):
        mid = 0.5 * (lo[ax] + hi[ax])
        slack = max(0.0, 0.5 * ((hi[ax] - lo[ax] + 1) - size[ax])) * centre_jitter
        c.append(mid + uniform(rng, -slack, slack))
    return c


def uniform_centre(rng: torch.Generator, labels: torch.Tensor) -> list[float]:
    """Crop centre drawn uniformly in the head's box (all non-zero labels): crops that hold the
    scalp, the skull base or the air beside the head, as real whole-head scans do."""
    lo, hi = foreground_box(labels)
    return [uniform(rng, float(lo[ax]), float(hi[ax])) for ax in range(3)]


def sampling_grid(A: torch.Tensor, centre, disp: torch.Tensor | None, size, in_shape, device,
                  mirror_axis: int | None = None) -> torch.Tensor:
    """grid_sample grid (1, *size, 3), align_corners=True, for x_in = M (A c + d(c)) + centre, where c
    is the output voxel position relative to the output centre and M mirrors `mirror_axis` about the
    centre (left/right flip in input space)."""
    A = A.clone()
    if mirror_axis is not None:
        A[mirror_axis] *= -1
    A = A.to(dtype=torch.float32)
    axes = [torch.arange(s, dtype=torch.float32, device=device) - (s - 1) / 2 for s in size]
    # voxel index -> [-1, 1] (align_corners=True), per input axis
    scales = [2.0 / max(n - 1, 1) for n in in_shape]
    # channels in grid_sample order (x=W, y=H, z=D): channel j holds input axis k = 2 - j
    if disp is not None:
        d = disp.to(torch.float32).clone()
        for k in range(3):
            d[k] *= scales[k] * (-1.0 if k == mirror_axis else 1.0)
        g = F.interpolate(d.flip(0)[None].to(device), size=tuple(size), mode="trilinear", align_corners=True)
    else:
        g = torch.zeros((1, 3, *size), device=device, dtype=torch.float32)
    for k in range(3):
        sc = scales[k]
        a01 = (float(A[k, 0]) * sc * axes[0]).view(-1, 1, 1) + (float(A[k, 1]) * sc * axes[1]).view(1, -1, 1)
        a2 = (float(A[k, 2]) * sc * axes[2] + (float(centre[k]) * sc - 1.0)).view(1, 1, -1)
        g[0, 2 - k].add_(a01).add_(a2)
    return g.permute(0, 2, 3, 4, 1)  # (1, D, H, W, 3) view; grid_sample takes it as is


def input_box(A: torch.Tensor, centre, disp: torch.Tensor | None, size, in_shape) -> list[tuple[int, int]]:
    """Index range [lo, hi) per axis of the input that the grid can touch: the transformed output
    corners plus the largest displacement and a 2-voxel margin. Resampling only that sub-volume
    saves converting a whole 256^3 map to float for every draw."""
    half = torch.tensor([(s - 1) / 2 for s in size], dtype=torch.float64)
    reach = (A.abs().to(torch.float64) @ half).tolist()  # max |A c| over the corners, per input axis
    pad = (float(disp.abs().max()) if disp is not None else 0.0) + 2.0
    box = []
    for k in range(3):
        lo = max(0, int(math.floor(centre[k] - reach[k] - pad)))
        hi = min(in_shape[k], int(math.ceil(centre[k] + reach[k] + pad)) + 1)
        if hi - lo < 2:  # nothing (or one slice) inside: keep the whole axis, the grid handles it
            lo, hi = 0, in_shape[k]
        box.append((lo, hi))
    return box


def warp_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer label map (ids stay exact up to 2^24); 0 outside."""
    src = labels.to(torch.float32)[None, None]
    out = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0].round_().long()


def warp_image(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    src = image.to(torch.float32)[None, None]
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
