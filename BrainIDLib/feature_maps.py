"""Brain-ID feature maps of scans: computed once, cached, and compared or fed to small heads.

A `FeatureMap` holds a scan's features on the model's own grid (`volume.prepare`: RAS voxel axes at
the model's spacing, 1 mm for the official model, 2 mm for brainid-lite), unpadded, as float16,
standardised and L2-normalised per voxel, so a dot product is a cosine similarity; float16 halves
the memory of float32 and changes similarities by < 1e-3. (A PCA-compressed cache was considered and
left out: each volume would get its own basis, and cosine similarities between volumes need one
shared basis.) Correspondence, few-shot heads, the CLI and Slicer all read features from here.

Feature maps are computed once per (image content, backbone weights) and kept in a `FeatureCache`:
an in-memory LRU bounded in bytes, plus (optionally) safetensors files on disk so separate
processes (the CLI, the Slicer module's worker) reuse them.

`features()` is the other view: the raw features (or their PCA, for colour) on the input's grid,
as a NIfTI to look at (`brainid features`, Slicer's feature PCA).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .devices import release_memory, select_device
from .errors import BrainIDError
from .inference import check_grid, cpu_precision, model_input, padding_mask, prepare_scan, run_network
from .loader import resolve
from .progress import Progress, Span
from .volume import AxisMap, Prepared, Volume, load_volume, make_nifti, prepare

CACHE_FORMAT = 2  # 2: + the source padding mask ("padding" tensor)
FOREGROUND_LEVEL = 0.02  # normalised intensity above which a voxel can be a match (skips the air)

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
            return self.prepared.unpadded().to_input_grid(t, channel_chunk=4)
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


def tensors_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's tensors (sorted state-dict keys, float32 bytes): identifies the weights
    whatever file format they came from (official .pth or BrainID safetensors)."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The backbone's `tensors_sha256`: what the features depend on, whatever heads are attached."""
    return tensors_sha256(model.backbone)


def _model_key(model) -> str:
    """Fingerprint plus the input spec (spacing, normalisation): both change the features."""
    cached = getattr(model, "_brainid_fingerprint", None)
    version = sum(int(p._version) for p in model.backbone.parameters())  # in-place updates bump it
    if cached is None or cached[0] != version:
        spacing, norm = model_input(model)
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
    def from_setting(value) -> FeatureCache:
        """The cache a CLI option or config value names: "default" ($BRAINID_CACHE/features), a
        folder, or off / none (in memory only)."""
        if value is None or str(value).lower() in ("off", "none", "no", ""):
            return FeatureCache(None)
        return FeatureCache(value)

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
    spacing, norm = model_input(model)
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


# ------------------------------------------------------------------------- features to look at
def pca_channels(feats: torch.Tensor, k: int = 3, sample: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Project (C, *spatial) features on their first k principal components, each scaled to [0, 1]
    by its 1st-99th percentiles (for viewing as RGB). Components are fitted on a voxel sample."""
    c = feats.shape[0]
    if not 1 <= k <= c:
        raise BrainIDError(f"pca must be between 1 and {c} (the number of feature channels), got {k}")
    flat = feats.reshape(c, -1)
    g = torch.Generator().manual_seed(seed)
    n = flat.shape[1]
    idx = torch.randperm(n, generator=g)[:sample] if n > sample else torch.arange(n)
    x = flat[:, idx].T.double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    comps = v[:k].float()  # (k, C)
    # sign convention: make each component's largest loading positive (stable colours)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).clamp_min(0) * 2 - 1
    comps = comps * signs
    out = torch.empty(k, n, dtype=torch.float32)
    step = 1 << 20
    for s in range(0, n, step):
        out[:, s : s + step] = comps @ (flat[:, s : s + step].float() - mean.float()[:, None])
    sample_proj = out[:, idx] if n > sample else out
    lo = torch.quantile(sample_proj, 0.01, dim=1)
    hi = torch.quantile(sample_proj, 0.99, dim=1)
    out = ((out - lo[:, None]) / (hi - lo).clamp_min(1e-12)[:, None]).clamp_(0, 1)
    return out.reshape((k,) + tuple(feats.shape[1:]))


def features(image, model=None, device="auto", pca=None, on_1mm=False, mode="auto", memory_budget_gb=None,
             progress=None, cancel=None, max_voxels=None, precision="auto"):
    """Brain-ID features (or their k-channel PCA, scaled to [0, 1]) as a 4D NIfTI (X,Y,Z,C).

    On the input's grid (same shape and affine) by default; on the model's 1 mm grid with on_1mm.
    precision: as in predict().
    """
    prog = Progress(progress, cancel)
    loaded = resolve(model)
    model, owned = loaded.model, loaded.owned
    dev = select_device(device)
    precision = cpu_precision(precision, model, dev, prog)
    scan = prepare_scan(image, model, max_voxels, prog)
    vol, prep = scan.volume, scan.prepared
    budget = None if memory_budget_gb is None else int(float(memory_budget_gb) * (1 << 30))
    messages: list = []
    try:
        raw, _, _, _ = run_network(model, prep, [], True, dev, mode, budget, Span(prog, 0.1, 0.85), messages, None,
                                   precision)
    finally:
        if owned:
            model.to("cpu")
        release_memory(dev)
    feats = prep.crop(raw)
    del raw
    if pca:
        prog(0.87, "principal components")
        feats = pca_channels(feats, int(pca))
    prog(0.92, "mapping features back")
    if on_1mm:
        img = make_nifti(np.moveaxis(feats.numpy(), 0, -1), prep.grid_affine)
    else:
        img = make_nifti(np.moveaxis(prep.unpadded().to_input_grid(feats).numpy(), 0, -1), vol.affine)
    prog(1.0, "done")
    return img
