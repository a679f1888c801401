"""Anatomical correspondence: a point on one scan -> where the same anatomy is on other scans.

Brain-ID features describe *where in the anatomy* a voxel is, whatever the contrast. A point is
described by the features at it and on cubes of 12-50 mm around it (`point_descriptor`), and
matched by the cosine similarity of that descriptor with the same descriptor at every voxel, on the
same scan (self-similarity) and on any other scan (another contrast, another subject). Each ring is
one dilated 3x3x3 convolution over the target's features, so a whole heatmap costs < 1 s on a CPU
for a 2 mm feature grid. `context_mm=()` gives the plain per-voxel cosine similarity.

    from BrainIDLib.correspondence import find_correspondence
    matches = find_correspondence("t1.nii.gz", (-24.0, -20.0, -12.0), ["flair.nii.gz"], model="brainid-lite")
    matches[0].point_ras, matches[0].similarity, matches[0].heatmap   # heatmap: NIfTI on flair's grid

Features come from `BrainIDLib.feature_maps` (computed once per scan and backbone, cached);
on their grid a dot product is a cosine similarity.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainIDError
from .feature_maps import FeatureCache, FeatureMap, compute_feature_map, sample_grid
from .loader import resolve
from .progress import Progress, Span
from .volume import Volume, make_nifti

# Ring radii (mm) of the point descriptor. Brain-ID features of one voxel are not distinctive enough
# to find it again on a moved, re-contrasted scan (brainid-lite: median error 43 mm over 40 points,
# benchmarks/correspondence.py); comparing the features on cubes of 12-50 mm around the point as
# well brings it to a few voxels. Smaller rings (2-8 mm) made it worse: fine-scale features vary
# with contrast and orientation more than the anatomy does.
CONTEXT_MM = (12.0, 20.0, 30.0, 40.0, 50.0)
CONTEXT_GRID_MM = 2.0  # finer feature grids are averaged down to about this for the context search
REFINE_RADIUS = 1  # sub-voxel refinement: weighted centroid over the (2r+1)^3 neighbourhood of the argmax


# ------------------------------------------------------------------------------- similarity
@dataclass
class PointDescriptor:
    """What the source looks like at a point and around it, as dilated-convolution kernels.

    taps: (dilation in voxels, kernel (C, k, k, k), mask (k, k, k)) per ring; the kernel holds the
    source's features at the point (k = 1) or at the 27 corners/edges/faces of a cube of that
    radius (k = 3, dilation = radius), masked where the cube leaves the source volume.
    spacing_mm: the voxel size of the grid it is compared on (0: any, for the single-voxel case)."""

    taps: list
    spacing_mm: float
    norm: float


def search_spacing(fm: FeatureMap) -> tuple[float, int]:
    """(voxel size in mm, factor) of the grid a feature map is searched on: its own, averaged down
    by an integer factor when finer than CONTEXT_GRID_MM (the 1 mm official model: 8x fewer voxels
    for the context search, whose rings are >= 12 mm anyway)."""
    spacing = float(np.sqrt((np.asarray(fm.affine)[:3, :3] ** 2).sum(0)).mean())
    factor = max(1, int(round(CONTEXT_GRID_MM / spacing)))
    return spacing * factor, factor


def search_grid(fm: FeatureMap, device="cpu") -> tuple[torch.Tensor, np.ndarray]:
    """(unit features float32 (C, d, h, w) on `device`, voxel->RAS affine) on the search grid."""
    _, factor = search_spacing(fm)
    g = fm.features.to(device).float()
    if factor == 1:
        return g, np.asarray(fm.affine, dtype=np.float64)
    size = tuple(int(math.ceil(s / factor)) for s in fm.shape)
    g = F.adaptive_avg_pool3d(g[None], size)[0]
    g /= g.norm(dim=0, keepdim=True).clamp_min(1e-8)
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return g, np.asarray(fm.affine, dtype=np.float64) @ scale


def point_descriptor(source: FeatureMap, point_ras, context_mm=None, spacing_mm: float | None = None) -> PointDescriptor:
    """The source's features at a RAS point and on cubes of `context_mm` radii around it.

    context_mm: ring radii (mm); None: CONTEXT_MM; (): the point's own feature vector only (plain
    per-voxel cosine similarity). spacing_mm: the voxel size of the grid it will be compared on
    (default: the source's search grid); ring radii are rounded to whole voxels of it."""
    _require_inside(source, point_ras)
    point = np.asarray(point_ras, dtype=np.float64).reshape(1, 3)
    rings = CONTEXT_MM if context_mm is None else tuple(float(r) for r in context_mm)
    c = source.channels
    if not rings:
        v = sample_grid(source.features, source.affine, point)[:, 0]
        v = v / v.norm().clamp_min(1e-8)
        return PointDescriptor([(1, v.reshape(c, 1, 1, 1), torch.ones(1, 1, 1))], 0.0, 1.0)
    g, affine = search_grid(source)
    spacing = float(spacing_mm) if spacing_mm else search_spacing(source)[0]
    taps, total = [], 0.0
    for i, radius in enumerate(sorted(set(rings))):
        d = max(1, int(round(radius / spacing)))
        ras = point + _CUBE * d * spacing
        ijk = np.linalg.solve(affine[:3, :3], (ras - affine[:3, 3]).T).T
        inside = torch.from_numpy(np.all((ijk >= -0.5) & (ijk <= np.array(g.shape[1:]) - 0.5), axis=1)).float()
        if i:  # the centre belongs to the first ring only
            inside[13] = 0.0
        k = sample_grid(g, affine, ras) * inside
        taps.append((d, k.reshape(c, 3, 3, 3), inside.reshape(3, 3, 3)))
        total += float((k * k).sum())
    return PointDescriptor(taps, spacing, math.sqrt(max(total, 1e-12)))


_CUBE = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.float64)


def _require_inside(source: FeatureMap, point_ras) -> None:
    """A BrainIDError that says where the source is, for a point outside it."""
    if not source.contains(point_ras):
        p = ", ".join(f"{v:.1f}" for v in np.asarray(point_ras, dtype=float).reshape(3))
        lo, hi = _extent(source)
        raise BrainIDError(
            f"the point ({p}) mm RAS is outside the source volume {source.name} "
            f"(it spans R {lo[0]:.0f}..{hi[0]:.0f}, A {lo[1]:.0f}..{hi[1]:.0f}, S {lo[2]:.0f}..{hi[2]:.0f} mm); "
            "pick a point inside it"
        )


def _extent(fm: FeatureMap) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1.0] for i in (0, fm.source_shape[0] - 1) for j in (0, fm.source_shape[1] - 1)
                        for k in (0, fm.source_shape[2] - 1)])
    ras = (fm.source_affine @ corners.T).T[:, :3]
    return ras.min(0), ras.max(0)


def similarity_grid(descriptor: PointDescriptor, target: FeatureMap, device="cpu") -> torch.Tensor:
    """Cosine similarity (D, H, W) float32 (on the CPU) on the target's feature grid between the
    point's descriptor and the same descriptor centred on every target voxel.

    Each ring is one dilated convolution of the target's features with the ring's kernel; the
    target's features are unit vectors, so its descriptor norm is the square root of the number
    of taps inside the volume (a convolution of ones with the masks). device: where the
    convolutions run (a CUDA GPU makes a heatmap take milliseconds; the result comes back)."""
    if descriptor.spacing_mm == 0.0:  # single voxel: a dot product
        feats = target.features.reshape(target.channels, -1)
        v = descriptor.taps[0][1].reshape(1, -1)
        out = torch.empty(feats.shape[1], dtype=torch.float32)
        for s in range(0, feats.shape[1], 1 << 20):
            out[s : s + (1 << 20)] = (v @ feats[:, s : s + (1 << 20)].float())[0]
        return out.reshape(tuple(target.shape))
    spacing, factor = search_spacing(target)
    if abs(spacing - descriptor.spacing_mm) > 1e-3 * spacing:
        raise ValueError(f"descriptor made for a {descriptor.spacing_mm:g} mm grid, {target.name} is searched on {spacing:g} mm")
    g, _ = search_grid(target, device)
    ones = torch.ones((1, 1) + tuple(g.shape[1:]), device=g.device)
    num = torch.zeros(g.shape[1:], device=g.device)
    count = torch.zeros(g.shape[1:], device=g.device)
    for d, kernel, mask in descriptor.taps:
        num += F.conv3d(g[None], kernel.to(g.device)[None], padding=d, dilation=d)[0, 0]
        count += F.conv3d(ones, mask.to(g.device)[None, None], padding=d, dilation=d)[0, 0]
    del g, ones
    sim = num / (descriptor.norm * count.clamp_min(1.0).sqrt())
    if factor > 1:  # back onto the feature grid (matching and heatmaps use it)
        sim = F.interpolate(sim[None, None], size=tuple(target.shape), mode="trilinear", align_corners=False)[0, 0]
    return sim.cpu()


def _match_device(device) -> torch.device:
    """Where heatmaps are computed: the CUDA GPU when one is selected, else the CPU (dilated 3D
    convolutions are not on every other backend)."""
    from .devices import select_device

    dev = select_device(device)
    return dev if dev.type == "cuda" else torch.device("cpu")


def _similarity_anywhere(descriptor: PointDescriptor, target: FeatureMap, device: torch.device) -> torch.Tensor:
    """similarity_grid on `device`, on the CPU when the GPU runs out of memory."""
    if device.type == "cuda":
        try:
            return similarity_grid(descriptor, target, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return similarity_grid(descriptor, target)


def similarity_map(source: FeatureMap, point_ras, target: FeatureMap, on_source_grid: bool = True, context_mm=None,
                   device="cpu"):
    """Similarity between the anatomy at `point_ras` on the source and every voxel of `target`,
    as a float32 NIfTI on the target's original image grid (`on_source_grid`, default) or on its
    feature grid. Values lie in [-1, 1]; context_mm as in point_descriptor; device as in find_correspondence."""
    descriptor = point_descriptor(source, point_ras, context_mm, search_spacing(target)[0])
    sim = _similarity_anywhere(descriptor, target, _match_device(device))
    return _heatmap_image(sim, target, on_source_grid)


def _heatmap_image(sim: torch.Tensor, target: FeatureMap, on_source_grid: bool):
    """The similarity as a NIfTI; -1 in the air around the head (never a match: see best_point)."""
    if target.foreground is not None:
        sim = torch.where(target.foreground, sim, torch.full_like(sim, -1.0))
    if on_source_grid:
        return make_nifti(target.to_source_grid(sim[None])[0].numpy(), target.source_affine)
    return make_nifti(sim.numpy(), target.affine)


def best_point(sim: torch.Tensor, target: FeatureMap, refine: bool = True) -> tuple[np.ndarray, float]:
    """(RAS point, similarity) of the best match on a similarity grid: the argmax over foreground
    voxels, refined to sub-voxel precision by the similarity-weighted centroid of its neighbourhood."""
    masked = sim if target.foreground is None else torch.where(target.foreground, sim, torch.full_like(sim, -2.0))
    flat = int(torch.argmax(masked))
    ijk = np.array(np.unravel_index(flat, tuple(sim.shape)), dtype=np.float64)
    best = float(sim.reshape(-1)[flat])
    if refine:
        r = REFINE_RADIUS
        lo = np.maximum(ijk.astype(int) - r, 0)
        hi = np.minimum(ijk.astype(int) + r + 1, np.array(sim.shape))
        patch = masked[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].double()
        w = (patch - patch.min()).clamp_min(0) ** 2
        if float(w.sum()) > 0:
            grids = torch.meshgrid(*[torch.arange(a, b, dtype=torch.float64) for a, b in zip(lo, hi)], indexing="ij")
            ijk = np.array([float((g * w).sum() / w.sum()) for g in grids])
    return target.ras_of(ijk), best


@dataclass
class Match:
    """The best-matching point on one target, its similarity and the whole heatmap."""

    point_ras: np.ndarray
    similarity: float
    heatmap: object  # nibabel.Nifti1Image, float32, on the target's original grid
    target_index: int


def find_correspondence(source, point_ras, targets, model=None, device="auto", cache: FeatureCache | None = None,
                        progress: Callable | None = None, cancel: Callable | None = None,
                        refine: bool = True, context_mm=None) -> list[Match]:
    """Where the anatomy at `point_ras` (mm, RAS) on `source` lies on each target.

    source / targets: scans (path, nibabel image, Volume) or FeatureMaps; `targets` may be one of
    them or a list. Returns one Match per target (in order). A point outside the source volume
    raises BrainIDError. Include the source itself among the targets for its self-similarity.
    context_mm: ring radii of the point descriptor (None: CONTEXT_MM; (): the point's voxel alone).
    """
    if isinstance(targets, (str, os.PathLike, FeatureMap, Volume)) or hasattr(targets, "dataobj"):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise BrainIDError("no target given: pass one or more scans to search")
    prog = Progress(progress, cancel)
    if model is None and not all(isinstance(t, FeatureMap) for t in [source, *targets]):
        model = resolve(None).model
    elif model is not None and not isinstance(model, torch.nn.Module):
        model = resolve(model).model
    n = len(targets) + 1
    src = compute_feature_map(source, model=model, device=device, cache=cache, progress=Span(prog, 0, 1 / n),
                              cancel=cancel)
    _require_inside(src, point_ras)  # before any target is read
    match_dev = _match_device(device)
    descriptors = {}  # by search spacing: one for all targets of one model (pooling the source is not free)
    matches = []
    for i, t in enumerate(targets):
        fm = src if t is source else compute_feature_map(t, model=model, device=device, cache=cache,
                                                                progress=Span(prog, (i + 1) / n, (i + 1.9) / n), cancel=cancel)
        _check_same_model(src, fm)
        spacing = search_spacing(fm)[0]
        if spacing not in descriptors:
            descriptors[spacing] = point_descriptor(src, point_ras, context_mm, spacing)
        sim = _similarity_anywhere(descriptors[spacing], fm, match_dev)
        point, value = best_point(sim, fm, refine)
        matches.append(Match(point, value, _heatmap_image(sim, fm, True), i))
        prog((i + 2) / n, f"target {i + 1}/{len(targets)} matched")
    prog(1.0, "done")
    return matches


def _check_same_model(a: FeatureMap, b: FeatureMap) -> None:
    if a.model_hash and b.model_hash and a.model_hash != b.model_hash:
        raise BrainIDError(f"{a.name} and {b.name} have features from different models ({a.model_name}, "
                           f"{b.model_name}); compute both with the same model")
    if a.channels != b.channels:
        raise BrainIDError(f"{a.name} has {a.channels} feature channels and {b.name} {b.channels}; use one model")


def point_error_mm(a, b) -> float:
    return float(math.dist(np.asarray(a, float).reshape(3), np.asarray(b, float).reshape(3)))


__all__ = ["Match", "PointDescriptor", "point_descriptor", "similarity_grid", "similarity_map", "find_correspondence"]
