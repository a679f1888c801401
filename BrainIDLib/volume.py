"""Reading, checking and preparing scans for the network, and mapping results back.

A scan goes: load + validate (`load_volume`) -> reorient to RAS by exact axis permutation/flips
(nibabel.orientations, no interpolation) -> resample each axis to the model spacing (linear, with a
Gaussian anti-aliasing blur along axes that shrink) -> normalise as the model's metadata says
(`normalize.py`: robust percentiles with a CT brain window, or the official min-max) -> pad to a multiple of 2**(levels-1). `Prepared` remembers every step so
outputs go back onto the input's exact grid (same shape, identical affine).

Oblique scans are not rotated: they are processed along their own (reoriented) voxel axes, which
avoids an extra interpolation; the "1 mm grid" then carries the scan's oblique direction cosines.
The voxel-to-world matrix is nibabel's `img.affine`, i.e. the sform when its code is set (> 0),
else the qform: where the two differ, BrainID follows the sform (as FreeSurfer, ANTs and Slicer).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainIDError
from .normalize import normalise_array

MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MIN_EXTENT_VOXELS = 8  # along each axis, counted at the model spacing
MAX_NONFINITE_FRACTION = 0.5


@dataclass
class Volume:
    """A 3D scan: float32 voxels and the 4x4 voxel-to-world (RAS+, mm) affine."""

    array: np.ndarray
    affine: np.ndarray
    name: str = "image"

    def __post_init__(self):
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise BrainIDError(f"{self.name}: expected a 3D volume, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise BrainIDError(f"{self.name}: the affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        return voxel_sizes(self.affine)

    @classmethod
    def from_nifti(cls, img, name: str | None = None) -> "Volume":
        """A validated Volume from a nibabel image (see `load_volume`)."""
        return load_volume(img) if name is None else _volume_from_image(img, name)

    def to_nifti(self, dtype=np.float32):
        return make_nifti(self.array, self.affine, dtype)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def make_nifti(array: np.ndarray, affine: np.ndarray, dtype=np.float32):
    """A NIfTI image with exactly `affine` (float64, as given) and both sform and qform set to it."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine.copy())
    img.header.set_data_dtype(dtype)
    img.header.set_sform(affine, code=1)  # scanner-anatomical
    img.header.set_qform(affine, code=1)  # header setters leave img.affine exact
    return img


# ----------------------------------------------------------------------------------- loading
def load_volume(source, name: str | None = None) -> Volume:
    """Read and validate a scan: a path, a nibabel image or a Volume -> Volume.

    Raises BrainIDError with a one-line fix for: unreadable or non-NIfTI files, 4D series with more
    than one volume, constant (empty) volumes, mostly non-finite voxels, absurd voxel sizes and
    volumes too small for the network. A minority of NaN/Inf voxels is replaced by 0 with a warning.
    """
    import nibabel as nib

    if isinstance(source, Volume):
        vol = Volume(source.array.copy(), source.affine.copy(), name or source.name)
        return _validate(vol)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        label = name or path.name
        if not path.is_file():
            raise BrainIDError(f"input image not found: {path}")
        try:
            img = nib.load(str(path))
        except Exception as e:  # ImageFileError, gzip/zlib errors, bad headers...
            raise BrainIDError(
                f"{label} is not a readable NIfTI image ({_first_line(e)}); give a .nii or .nii.gz file "
                "(convert DICOM with dcm2niix)"
            ) from None
        return _volume_from_image(img, label)
    if isinstance(source, nib.spatialimages.SpatialImage):
        return _volume_from_image(source, name or "image")
    raise BrainIDError(f"cannot read an image from a {type(source).__name__}; give a NIfTI path, a nibabel image or a Volume")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _volume_from_image(img, label: str) -> Volume:
    import nibabel as nib

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        raise BrainIDError(f"{label} is a {type(img).__name__}, not NIfTI; convert it to .nii.gz first (e.g. with dcm2niix)")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise BrainIDError(f"{label} is {len(shape)}D (shape {shape}); BrainID needs a 3D volume")
    extra = [(i + 1, s) for i, s in enumerate(shape) if i >= 3 and s > 1]
    if extra:
        dim, count = extra[0]
        raise BrainIDError(
            f"{label} is a {len(shape)}D series with {count} volumes along dimension {dim}; pick one first, "
            f"e.g. `fslroi in.nii.gz out.nii.gz 0 1` or nibabel `img.slicer[..., 0]`"
        )
    try:
        data = np.asarray(img.dataobj, dtype=np.float32) if not _has_scaling(img) else img.get_fdata(dtype=np.float32)
    except Exception as e:  # truncated/corrupt gzip, short file...
        raise BrainIDError(f"{label} is corrupt or truncated ({_first_line(e)}); export or download it again") from None
    data = np.ascontiguousarray(data.reshape(shape[:3]), dtype=np.float32)
    return _validate(Volume(data, np.asarray(img.affine, dtype=np.float64), label))


def _has_scaling(img) -> bool:
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return not (slope in (None, 1.0) and inter in (None, 0.0))


def _validate(vol: Volume) -> Volume:
    label, a = vol.name, vol.array
    affine = vol.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BrainIDError(f"{label} has a broken (singular or non-finite) affine; fix its header (sform/qform)")
    spacing = vol.spacing
    if spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM:
        sp = "x".join(f"{s:.3g}" for s in spacing)
        raise BrainIDError(
            f"{label} has voxel size {sp} mm, outside {MIN_SPACING_MM}..{MAX_SPACING_MM} mm; its header's "
            "units or affine are probably wrong (e.g. metres or microns): fix the header"
        )
    extent = np.array(a.shape) * spacing
    if min(a.shape) < 2 or extent.min() < MIN_EXTENT_VOXELS:
        raise BrainIDError(
            f"{label} is too small for the network (shape {a.shape}, {'x'.join(f'{e:.0f}' for e in extent)} mm); "
            f"it needs at least 2 slices and {MIN_EXTENT_VOXELS} mm along every axis"
        )
    finite = np.isfinite(a)
    bad = a.size - int(finite.sum())
    if bad:
        if bad >= MAX_NONFINITE_FRACTION * a.size:
            raise BrainIDError(
                f"{label}: {bad / a.size:.0%} of its voxels are NaN or Inf; the image is broken, export it again"
            )
        warnings.warn(f"{label}: {bad} NaN/Inf voxels ({bad / a.size:.2%}) replaced by 0", stacklevel=3)
        a = np.where(finite, a, np.float32(0))
        vol = Volume(a, affine, label)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi), abs(lo)):
        raise BrainIDError(f"{label} is constant (every voxel is {lo:g}): it holds no image; check the file")
    return vol


# ---------------------------------------------------------------------------- orientation
def _ras_transform(affine: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))


def apply_orientation(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """nibabel's apply_orientation on the last three (spatial) dims of a tensor."""
    sp0 = t.dim() - 3
    flips = [sp0 + i for i, (_, f) in enumerate(ornt) if f == -1]
    if flips:
        t = t.flip(flips)
    perm = np.argsort(ornt[:, 0])
    return t.permute(*range(sp0), *(sp0 + int(p) for p in perm))


# ------------------------------------------------------------------------------ resampling
@dataclass
class AxisMap:
    """Input axis of n voxels -> output axis of m voxels: output j sits at input (j+0.5)*r - 0.5 + offset."""

    n: int
    m: int
    r: float  # output spacing / input spacing
    offset: float

    @property
    def identity(self) -> bool:
        return self.n == self.m and abs(self.r - 1) < 1e-9 and abs(self.offset) < 1e-9

    def forward_positions(self) -> torch.Tensor:
        return (torch.arange(self.m, dtype=torch.float64) + 0.5) * self.r - 0.5 + self.offset

    def inverse_positions(self) -> torch.Tensor:
        return (torch.arange(self.n, dtype=torch.float64) + 0.5 - self.offset) / self.r - 0.5


def _axis_map(n: int, spacing: float, target: float) -> AxisMap:
    if abs(spacing - target) <= 1e-4 * target:
        return AxisMap(n, n, 1.0, 0.0)
    r = target / spacing
    m = max(1, int(round(n / r)))
    return AxisMap(n, m, r, (n - m * r) / 2.0)


def _gaussian_blur_axis(t: torch.Tensor, dim: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, X, Y, Z) tensor along one spatial dim, edges replicated."""
    if sigma <= 0.1:
        return t
    from .synth.filters import gaussian_kernels  # the generator's kernels: one Gaussian in the project

    k = gaussian_kernels(torch.tensor([float(sigma)]))[0].to(t.dtype)
    radius = (k.numel() - 1) // 2
    moved = t.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    flat = F.pad(flat, (radius, radius), mode="replicate")
    out = torch.empty(flat.shape[0], 1, shape[-1], dtype=t.dtype)
    step = max(1, (1 << 24) // max(1, flat.shape[-1]))
    for s in range(0, flat.shape[0], step):
        out[s : s + step] = F.conv1d(flat[s : s + step], k.view(1, 1, -1))
    return out.reshape(shape).movedim(-1, dim)


def _linear_axis(t: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of t along `dim` at fractional (clamped) voxel positions."""
    n = t.shape[dim]
    pos = positions.clamp(0, n - 1)
    i0 = pos.floor().long().clamp(0, n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    w1 = (pos - i0.double()).to(t.dtype)
    shape = [1] * t.dim()
    shape[dim] = -1
    w1 = w1.view(shape)
    a = t.index_select(dim, i0)
    b = t.index_select(dim, i1)
    return a.add_(b.sub_(a).mul_(w1))


def resample_axes(t: torch.Tensor, maps: list[AxisMap], inverse: bool = False, antialias: bool = True) -> torch.Tensor:
    """Resample the three spatial dims (last three) of t through per-axis maps (or back)."""
    sp0 = t.dim() - 3
    for i, am in enumerate(maps):
        if am.identity:
            continue
        dim = sp0 + i
        if inverse:
            pos, shrink = am.inverse_positions(), 1.0 / am.r
        else:
            pos, shrink = am.forward_positions(), am.r
        if antialias and shrink > 1.0:
            t = _gaussian_blur_axis(t, dim, (shrink - 1.0) / 2.0)
        t = _linear_axis(t, dim, pos)
    return t


# ------------------------------------------------------------------------------ prepared
@dataclass
class Prepared:
    """The network's input for one scan and everything needed to map outputs back."""

    tensor: torch.Tensor  # (1, 1, *padded) normalised, on the model grid
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ornt: np.ndarray  # input -> RAS (nibabel orientation transform)
    ras_shape: tuple[int, int, int]
    axis_maps: list[AxisMap]
    grid_affine: np.ndarray  # affine of the (unpadded) model grid
    pad_before: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    intensity_range: tuple[float, float] = (0.0, 1.0)
    notes: list[str] = field(default_factory=list)

    def unpadded(self) -> Prepared:
        """The same mapping for tensors already cropped to the model grid."""
        return replace(self, pad_before=(0, 0, 0))

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """Drop the padding from a (..., *padded) tensor -> (..., *grid_shape)."""
        sl = tuple(slice(p, p + s) for p, s in zip(self.pad_before, self.grid_shape))
        return t[(Ellipsis,) + sl]

    def to_input_grid(self, t: torch.Tensor, channel_chunk: int = 8) -> torch.Tensor:
        """(C, *padded) on the model grid -> (C, *input_shape) on the input grid, linearly."""
        t = self.crop(t)
        parts = []
        for s in range(0, t.shape[0], channel_chunk):
            parts.append(self._back(t[s : s + channel_chunk].float()))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _back(self, t: torch.Tensor) -> torch.Tensor:
        t = resample_axes(t, self.axis_maps, inverse=True)
        return apply_orientation(t, _inverse_transform(self.ornt)).contiguous()

    def argmax_on_input_grid(self, probs: torch.Tensor) -> torch.Tensor:
        """Argmax over channels of probabilities resampled to the input grid, one channel at a time."""
        return argmax_of_resampled(self.crop(probs), lambda t: self._back(t.float()))


def argmax_of_resampled(probs: torch.Tensor, resample) -> torch.Tensor:
    """Argmax over the channels of (K, ...) probabilities after `resample` ((1, ...) -> (1, *out)), one
    channel at a time, so only one resampled channel and the running best are ever in memory."""
    best = idx = None
    for c in range(probs.shape[0]):
        p = resample(probs[c : c + 1])[0]
        if best is None:
            best, idx = p, torch.zeros(p.shape, dtype=torch.int64)
        else:
            better = p > best
            best = torch.where(better, p, best)
            idx[better] = c
    return idx


def _inverse_transform(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `ornt` (RAS array -> input array)."""
    inv = np.zeros_like(ornt, dtype=float)
    for i, (ax, fl) in enumerate(ornt):
        inv[int(ax)] = [i, fl]
    return inv


def grid_shape(vol: Volume, spacing_mm) -> tuple[int, int, int]:
    """The model-grid shape `prepare` makes of `vol` at `spacing_mm`, computed from the header alone."""
    ornt = _ras_transform(vol.affine)
    import nibabel.orientations as nio

    ras_affine = vol.affine @ nio.inv_ornt_aff(ornt, vol.shape)
    ras_shape = [vol.shape[int(a)] for a in np.argsort(ornt[:, 0])]
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    return tuple(_axis_map(n, s, t).m for n, s, t in zip(ras_shape, spacing, np.broadcast_to(spacing_mm, 3)))


def prepare(vol: Volume, spacing_mm=(1.0, 1.0, 1.0), normalisation: dict | None = None, multiple: int = 16) -> Prepared:
    """Reorient to RAS, resample to the model spacing (anti-aliased), normalise and pad."""
    spacing_mm = [float(s) for s in (list(spacing_mm) * 3 if np.ndim(spacing_mm) == 0 else spacing_mm)][:3]
    ornt = _ras_transform(vol.affine)
    import nibabel.orientations as nio

    ras_affine = vol.affine @ nio.inv_ornt_aff(ornt, vol.shape)
    arr, value_range = normalise_array(vol.array, normalisation)
    t = apply_orientation(torch.from_numpy(arr)[None], ornt).contiguous()
    ras_shape = tuple(int(s) for s in t.shape[1:])
    ras_spacing = voxel_sizes(ras_affine)
    maps = [_axis_map(n, s, target) for n, s, target in zip(ras_shape, ras_spacing, spacing_mm)]
    grid = resample_axes(t, maps)[0]
    scale = np.eye(4)
    for i, am in enumerate(maps):
        scale[i, i] = am.r
        scale[i, 3] = 0.5 * am.r - 0.5 + am.offset
    grid_affine = ras_affine @ scale
    grid_shape = tuple(int(s) for s in grid.shape)
    padded = [int(math.ceil(s / multiple) * multiple) for s in grid_shape]
    pad_before = tuple((p - s) // 2 for p, s in zip(padded, grid_shape))
    pads = []
    for p, s, b in reversed(list(zip(padded, grid_shape, pad_before))):
        pads += [b, p - s - b]
    x = F.pad(grid[None, None], pads) if any(pads) else grid[None, None]
    return Prepared(x.contiguous(), vol.shape, vol.affine.copy(), ornt, ras_shape, maps, grid_affine,
                    pad_before, grid_shape, value_range)
