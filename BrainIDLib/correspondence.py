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

Features are computed once per (image content, backbone weights) and kept in a `FeatureCache`:
an in-memory LRU bounded in bytes, plus (optionally) safetensors files on disk so separate
processes (the CLI, the Slicer module's worker) reuse them.

The feature grid is the model's own grid (`volume.prepare`: RAS voxel axes at the model's spacing,
1 mm for the official model, 2 mm for brainid-lite), unpadded. Features are stored as float16,
L2-normalised per voxel, so a dot product is a cosine similarity; float16 halves the memory of
float32 and changes similarities by < 1e-3. (A PCA-compressed cache was considered and left out:
each volume would get its own basis, and cosine similarities between volumes need one shared basis.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainIDError
from .loader import resolve
from .progress import Progress, Span
from .volume import AxisMap, Prepared, Volume, load_volume, make_nifti

CACHE_FORMAT = 2  # 2: + the source padding mask ("padding" tensor)
# Ring radii (mm) of the point descriptor. Brain-ID features of one voxel are not distinctive enough
# to find it again on a moved, re-contrasted scan (brainid-lite: median error 43 mm over 40 points,
# benchmarks/correspondence.py); comparing the features on cubes of 12-50 mm around the point as
# well brings it to a few voxels. Smaller rings (2-8 mm) made it worse: fine-scale features vary
# with contrast and orientation more than the anatomy does.
CONTEXT_MM = (12.0, 20.0, 30.0, 40.0, 50.0)
CONTEXT_GRID_MM = 2.0  # finer feature grids are averaged down to about this for the context search
REFINE_RADIUS = 1  # sub-voxel refinement: weighted centroid over the (2r+1)^3 neighbourhood of the argmax
FOREGROUND_LEVEL = 0.02  # normalised intensity above which a voxel can be a match (skips the air)


# ----------------------------------------------------------------------------------- features
@dataclass
class FeatureMap:
    """Brain-ID features of one scan on the model grid.

    features: (C, D, H, W) float16, L2-normalised per voxel, on the grid `affine` (4x4 voxel->RAS)
    of shape `shape` (the model's grid: RAS axes at the model spacing, no padding).
    source_shape / source_affine: the input image's own grid (where heatmaps and labels go back).
    foreground: (D, H, W) bool, voxels brighter than the air (candidate matches), or None.
    padding: the input's empty padding (`inference.padding_mask` of the input array, on the input
    grid), bit-packed (np.packbits of the C-order flattened mask, uint8), or None when the input has
    none (or the map was made by hand). Few-shot `segment` labels these voxels "none", as predict()
    does; `source_padding()` unpacks it.
    """

    features: torch.Tensor
    affine: np.ndarray
    shape: tuple
    source_shape: tuple
    source_affine: np.ndarray
    foreground: torch.Tensor | None = None
    image_hash: str = ""
    model_hash: str = ""
    model_name: str = ""
    name: str = "image"
    prepared: Prepared | None = field(default=None, repr=False)  # grid mapping (its tensor dropped)
    padding: torch.Tensor | None = field(default=None, repr=False)  # packed bits, see above

    @property
    def channels(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        n = self.features.numel() * self.features.element_size()
        n += self.padding.numel() if self.padding is not None else 0
        return n + (self.foreground.numel() if self.foreground is not None else 0)

    def source_padding(self) -> np.ndarray | None:
        """The input's empty padding as a bool array of `source_shape`, or None."""
        if self.padding is None:
            return None
        n = int(np.prod(self.source_shape))
        return np.unpackbits(self.padding.numpy(), count=n).astype(bool).reshape(self.source_shape)

    def to_source_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(K, *shape) on the feature grid -> (K, *source_shape) float32 on the input grid (linear)."""
        t = t.float()
        if self.prepared is not None:
            return replace(self.prepared, pad_before=(0, 0, 0)).to_input_grid(t, channel_chunk=4)
        # no grid mapping kept (hand-made FeatureMap): sample at every source voxel's position
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in self.source_shape], indexing="ij"), -1).reshape(-1, 3)
        ras = ijk @ self.source_affine[:3, :3].T + self.source_affine[:3, 3]
        return sample_grid(t, self.affine, ras).reshape((t.shape[0],) + tuple(self.source_shape))

    def voxel_of(self, point_ras) -> np.ndarray:
        """Continuous voxel coordinates of a RAS point on the feature grid."""
        p = np.append(np.asarray(point_ras, dtype=np.float64).reshape(3), 1.0)
        return (np.linalg.inv(self.affine) @ p)[:3]

    def ras_of(self, ijk) -> np.ndarray:
        return (self.affine @ np.append(np.asarray(ijk, dtype=np.float64).reshape(3), 1.0))[:3]

    def contains(self, point_ras, tolerance_voxels: float = 0.01) -> bool:
        """Whether a RAS point lies inside the input image's field of view (voxel edges included)."""
        p = np.append(np.asarray(point_ras, dtype=np.float64).reshape(3), 1.0)
        ijk = (np.linalg.inv(self.source_affine) @ p)[:3]
        margin = 0.5 + tolerance_voxels
        return bool(np.all(ijk >= -margin) and np.all(ijk <= np.array(self.source_shape) - 1 + margin))


def sample_grid(t: torch.Tensor, affine: np.ndarray, points_ras: np.ndarray, chunk: int = 1 << 18) -> torch.Tensor:
    """Trilinear values of a (K, D, H, W) grid tensor at RAS points (N, 3) -> (K, N) float32.

    Points outside the grid take the nearest border value."""
    pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    ijk = (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    shape = np.array(t.shape[1:], dtype=np.float64)
    # grid_sample wants (x, y, z) = (W, H, D) in [-1, 1] (align_corners=True)
    norm = 2.0 * ijk / np.maximum(shape - 1, 1) - 1.0
    norm = torch.from_numpy(norm[:, ::-1].copy()).float()
    src = t.float()[None]
    out = torch.empty(t.shape[0], len(pts), dtype=torch.float32)
    for s in range(0, len(pts), chunk):
        g = norm[s : s + chunk].view(1, -1, 1, 1, 3)
        out[:, s : s + chunk] = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0, 0]
    return out


def model_fingerprint(model) -> str:
    """SHA-256 of the backbone's tensors (sorted state-dict keys, float32 bytes): identifies the
    weights whatever file format they came from (official .pth or BrainID safetensors)."""
    h = hashlib.sha256()
    for key, value in sorted(model.backbone.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _model_key(model) -> str:
    """Fingerprint plus the input spec (spacing, normalisation): both change the features."""
    cached = getattr(model, "_brainid_fingerprint", None)
    version = sum(int(p._version) for p in model.backbone.parameters())  # in-place updates bump it
    if cached is None or cached[0] != version:
        from .inference import _model_input

        spacing, norm = _model_input(model)
        fp = model_fingerprint(model)
        spec = json.dumps({"spacing": [float(s) for s in spacing], "norm": norm}, sort_keys=True)
        key = hashlib.sha256((fp + spec).encode()).hexdigest()
        cached = (version, key, fp)
        try:
            model._brainid_fingerprint = cached
        except Exception:  # noqa: BLE001 - frozen/slotted objects: recompute next time
            pass
    return cached[1]


def backbone_sha256(model) -> str:
    _model_key(model)
    cached = getattr(model, "_brainid_fingerprint", None)
    return cached[2] if cached else model_fingerprint(model)


def volume_hash(vol: Volume) -> str:
    """SHA-256 of a volume's voxels and affine (a scan's identity in the feature cache)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(vol.array, dtype=np.float32).tobytes())
    h.update(np.asarray(vol.affine, dtype=np.float64).tobytes())
    h.update(str(vol.shape).encode())
    return h.hexdigest()


def _model_name(model) -> str:
    return str((getattr(model, "metadata", None) or {}).get("name") or "unnamed")


# --------------------------------------------------------------------------------------- cache
class FeatureCache:
    """Feature maps keyed by (image content hash, model weights hash).

    In memory: an LRU bounded by `max_memory_gb` (float16 features; a 2 mm brainid-lite map of a
    head is ~30 MB, a 1 mm official map ~1 GB). On disk (when `directory` is given; "default" means
    `$BRAINID_CACHE/features`, i.e. ~/.cache/brainid/features): one safetensors file per map,
    written atomically, oldest files removed beyond `max_disk_gb`. Thread-safe.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_memory_gb: float = 2.0, max_disk_gb: float = 10.0):
        if directory == "default":
            from .registry import cache_dir

            directory = cache_dir() / "features"
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.max_memory_bytes = int(float(max_memory_gb) * (1 << 30))
        self.max_disk_bytes = int(float(max_disk_gb) * (1 << 30))
        self._items: OrderedDict[tuple, FeatureMap] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.disk_hits = 0

    @staticmethod
    def default() -> "FeatureCache":
        """The on-disk cache under $BRAINID_CACHE/features (what the CLI uses)."""
        return FeatureCache("default")

    def __len__(self) -> int:
        return len(self._items)

    @property
    def memory_bytes(self) -> int:
        return sum(fm.nbytes for fm in self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _file(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{key[0][:24]}-{key[1][:16]}.safetensors"

    def get(self, key: tuple) -> FeatureMap | None:
        with self._lock:
            fm = self._items.get(key)
            if fm is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return fm
        path = self._file(key)
        if path is not None and path.is_file():
            try:
                fm = _read_feature_file(path)
            except Exception:  # noqa: BLE001 - a broken cache file is recomputed, not fatal
                path.unlink(missing_ok=True)
                fm = None
            if fm is not None and (fm.image_hash, fm.model_hash) == key:
                self.disk_hits += 1
                try:
                    os.utime(path)
                except OSError:
                    pass
                self._remember(key, fm)
                return fm
        self.misses += 1
        return None

    def put(self, key: tuple, fm: FeatureMap) -> None:
        self._remember(key, fm)
        path = self._file(key)
        if path is not None:
            try:
                _write_feature_file(fm, path)
                self._trim_disk()
            except OSError:
                pass  # a read-only or full disk only costs recomputation

    def _remember(self, key: tuple, fm: FeatureMap) -> None:
        with self._lock:
            self._items[key] = fm
            self._items.move_to_end(key)
            total = sum(f.nbytes for f in self._items.values())
            while total > self.max_memory_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                total -= old.nbytes
            if total > self.max_memory_bytes:  # a single map larger than the budget is not kept
                self._items.clear()

    def _trim_disk(self) -> None:
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_disk_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


def _prep_to_dict(prep: Prepared | None) -> dict | None:
    if prep is None:
        return None
    return {"input_shape": list(prep.input_shape), "input_affine": np.asarray(prep.input_affine).tolist(),
            "ornt": np.asarray(prep.ornt).tolist(), "ras_shape": list(prep.ras_shape),
            "axis_maps": [[a.n, a.m, a.r, a.offset] for a in prep.axis_maps],
            "grid_affine": np.asarray(prep.grid_affine).tolist(), "grid_shape": list(prep.grid_shape),
            "intensity_range": list(prep.intensity_range)}


def _prep_from_dict(d: dict | None) -> Prepared | None:
    if not d:
        return None
    return Prepared(torch.empty(0), tuple(d["input_shape"]), np.array(d["input_affine"]), np.array(d["ornt"]),
                    tuple(d["ras_shape"]), [AxisMap(int(n), int(m), float(r), float(o)) for n, m, r, o in d["axis_maps"]],
                    np.array(d["grid_affine"]), (0, 0, 0), tuple(d["grid_shape"]), tuple(d["intensity_range"]))


def _write_feature_file(fm: FeatureMap, path: Path) -> None:
    from safetensors.torch import save_file

    from .files import atomic_write

    meta = {"format": "brainid-features", "format_version": CACHE_FORMAT, "affine": np.asarray(fm.affine).tolist(),
            "shape": list(fm.shape), "source_shape": list(fm.source_shape),
            "source_affine": np.asarray(fm.source_affine).tolist(), "image_hash": fm.image_hash,
            "model_hash": fm.model_hash, "model_name": fm.model_name, "name": fm.name,
            "prepared": _prep_to_dict(fm.prepared)}
    tensors = {"features": fm.features.contiguous()}
    if fm.foreground is not None:
        tensors["foreground"] = fm.foreground.to(torch.uint8).contiguous()
    if fm.padding is not None:
        tensors["padding"] = fm.padding.to(torch.uint8).contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"brainid": json.dumps(meta)}))


def _read_feature_file(path: Path) -> FeatureMap:
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["brainid"])
    if meta.get("format") != "brainid-features" or int(meta.get("format_version", 0)) != CACHE_FORMAT:
        raise ValueError("not a feature cache file of this version")
    t = load_file(str(path))
    fg = t.get("foreground")
    return FeatureMap(t["features"], np.array(meta["affine"]), tuple(meta["shape"]), tuple(meta["source_shape"]),
                      np.array(meta["source_affine"]), fg.bool() if fg is not None else None, meta["image_hash"],
                      meta["model_hash"], meta.get("model_name", ""), meta.get("name", "image"),
                      _prep_from_dict(meta.get("prepared")), t.get("padding"))


# ------------------------------------------------------------------------------ computing them
def compute_feature_map(image, model=None, device="auto", cache: FeatureCache | None = None,
                        progress: Callable | None = None, cancel: Callable | None = None, mode: str = "auto",
                        memory_budget_gb: float | None = None) -> FeatureMap:
    """Brain-ID features of a scan (path, nibabel image or Volume) on the model grid, L2-normalised
    per voxel, float16; from `cache` when it holds them (same voxels, same backbone weights)."""
    from .devices import release_memory, select_device
    from .inference import _model_input, check_grid, padding_mask, run_network
    from .volume import prepare

    if isinstance(image, FeatureMap):
        return image
    prog = Progress(progress, cancel)
    model = resolve(model).model
    prog(0.0, "reading the image")
    vol = load_volume(image)
    key = (volume_hash(vol), _model_key(model))
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            prog(1.0, "features from the cache")
            return hit
    spacing, norm = _model_input(model)
    check_grid(vol, spacing)
    prep = prepare(vol, spacing, norm, multiple=2 ** (model.arch.levels - 1))
    prog(0.05, "image resampled to the model grid")
    dev = select_device(device)
    budget = None if memory_budget_gb is None else int(float(memory_budget_gb) * (1 << 30))
    was_training = model.training
    model.eval()
    try:
        raw, _, _, _ = run_network(model, prep, [], True, dev, mode, budget, Span(prog, 0.05, 0.9), [])
    finally:
        model.train(was_training)
        release_memory(dev)
    prog(0.92, "normalising the features")
    feats = prep.crop(raw)
    del raw
    fg = prep.crop(prep.tensor[0, 0]) > FOREGROUND_LEVEL
    if fg.sum() < 8:  # odd intensities (e.g. negative background): every voxel is a candidate
        fg = torch.ones_like(fg)
    feats = standardise(feats.float(), fg).to(torch.float16).contiguous()
    light = replace(prep, tensor=torch.empty(0), pad_before=(0, 0, 0))
    pad = padding_mask(vol.array)
    packed = torch.from_numpy(np.packbits(pad.reshape(-1))) if pad is not None else None
    fm = FeatureMap(feats, np.asarray(prep.grid_affine, dtype=np.float64), tuple(prep.grid_shape), vol.shape,
                    vol.affine.copy(), fg.contiguous(), key[0], key[1], _model_name(model), vol.name, light, packed)
    if cache is not None:
        cache.put(key, fm)
    prog(1.0, "features ready")
    return fm


def standardise(feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel z-scores over the foreground voxels, then unit length per voxel (in place).

    Raw Brain-ID features share a large common component: cosine similarities between any two
    brain voxels are ~0.999 (brainid-lite), which float16 cannot even tell apart. Centring each
    channel on the scan's own foreground mean (and scaling by its spread) removes it, so cosine
    similarity measures anatomy; it also cancels global offsets between scans."""
    feats = feats.contiguous()
    c = feats.shape[0]
    flat = feats.view(c, -1)
    sel = flat[:, mask.reshape(-1)] if mask is not None and bool(mask.any()) else flat
    mean = sel.mean(1, keepdim=True)
    std = sel.std(1, keepdim=True).clamp_min(1e-6)
    flat.sub_(mean).div_(std)
    feats /= feats.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return feats


def _as_feature_map(x, model, device, cache, progress, cancel) -> FeatureMap:
    if isinstance(x, FeatureMap):
        return x
    return compute_feature_map(x, model=model, device=device, cache=cache, progress=progress, cancel=cancel)


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
    src = _as_feature_map(source, model, device, cache, Span(prog, 0, 1 / n), cancel)
    _require_inside(src, point_ras)  # before any target is read
    match_dev = _match_device(device)
    descriptors = {}  # by search spacing: one for all targets of one model (pooling the source is not free)
    matches = []
    for i, t in enumerate(targets):
        fm = src if t is source else _as_feature_map(t, model, device, cache, Span(prog, (i + 1) / n, (i + 1.9) / n), cancel)
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


__all__ = ["FeatureMap", "FeatureCache", "Match", "PointDescriptor", "compute_feature_map", "point_descriptor",
           "similarity_grid", "similarity_map", "find_correspondence",
           "sample_grid", "model_fingerprint", "backbone_sha256", "volume_hash"]
