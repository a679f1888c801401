"""Training data: synthetic subjects from the generator, or real NIfTI images mildly corrupted.

Every optimizer step's data is a pure function of (seed, step, rank): subject choice follows an
epoch-wise permutation over the global sample slot (what a DistributedSampler does) and every draw
gets its own seed. The data position of a run is therefore its step, a resumed run sees exactly
the data the uninterrupted run would have seen, and DataLoader workers can draw ahead freely.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from BrainIDLib.errors import BrainIDError
from BrainIDLib.labels import SEGMENTATION_LABELS

from .config import crop_sizes, size3

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def list_files(spec, what: str) -> list[Path]:
    """A folder, a glob pattern, one file, or a list of any of these -> sorted image files."""
    if spec is None:
        raise BrainIDError(f"{what} is not set; give a folder, a glob pattern or a list of NIfTI files")
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if _is_nifti(q))
        elif p.is_file():
            files.append(p)
        else:
            files += sorted(Path(q) for q in glob.glob(str(p)) if _is_nifti(Path(q)))
    if not files:
        raise BrainIDError(f"{what}: no NIfTI files found in {spec!r}")
    return files


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, slot, ...), stable across platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def subject_slot(seed: int, slot: int, n: int) -> int:
    """Which of n subjects global sample slot `slot` uses: a fresh permutation every epoch."""
    epoch, pos = divmod(slot, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[pos])


# FreeSurfer id -> index into SEGMENTATION_LABELS (ids outside the 33 classes count as background).
_LUT = np.zeros(max(SEGMENTATION_LABELS) + 1, dtype=np.int64)
for _i, _lab in enumerate(SEGMENTATION_LABELS):
    _LUT[_lab] = _i


def labels_to_indices(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels).astype(np.int64)
    out = np.zeros_like(lab)
    inside = (lab >= 0) & (lab < len(_LUT))
    out[inside] = _LUT[lab[inside]]
    return out


class _LRU:
    def __init__(self, capacity: int):
        self.capacity, self.items = capacity, OrderedDict()

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        if self.capacity > 0:
            self.items[key] = value
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return value


def _load_array(path: Path, dtype) -> np.ndarray:
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # noqa: BLE001
        raise BrainIDError(f"cannot read {path}: {e}") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise BrainIDError(f"{path} is not a 3D volume (shape {data.shape})")
    return np.ascontiguousarray(data.astype(dtype))


def collate_draws(draws: list[dict]) -> dict:
    """B per-subject draws -> one batch: per-sample keys concatenated, per-subject keys stacked."""
    out = {}
    for key in draws[0]:
        vals = [d[key] for d in draws]
        if not isinstance(vals[0], torch.Tensor):
            out[key] = vals
        elif key in ("inputs", "bias_field", "clean", "severity"):
            out[key] = torch.cat(vals)
        else:
            out[key] = torch.stack(vals)
    out["subjects"] = len(draws)
    return out


class GeneratorSteps(torch.utils.data.Dataset):
    """Item `step` = the synthetic subjects that rank `rank` trains on at that step."""

    def __init__(self, data_cfg: dict, seed: int, rank: int = 0, world: int = 1):
        self.cfg = dict(data_cfg)
        self.seed, self.rank, self.world = int(seed), rank, world
        self.label_files = list_files(self.cfg["labels"], "data.labels")
        self.t1_files = self._match_t1(self.cfg.get("t1"))
        self.sizes = crop_sizes(self.cfg["size"])
        probs = self.cfg.get("size_probs") or [1.0] * len(self.sizes)
        self.size_cdf = np.cumsum(probs) / np.sum(probs)
        self.per_step = int(self.cfg["subjects_per_step"])
        make_generator(self.cfg, self.sizes[0])  # bad generator options fail now, not in a worker later
        self._gens = {}  # one generator per crop size, built by each (worker) process
        self._cache = _LRU(int(self.cfg.get("cache_label_maps", 16)))

    def _match_t1(self, spec):
        if spec is None:
            return None
        by_name = {p.name: p for p in list_files(spec, "data.t1")}
        missing = [p.name for p in self.label_files if p.name not in by_name]
        if missing:
            raise BrainIDError(f"data.t1 has no T1 named like these label maps: {', '.join(missing[:4])}")
        return [by_name[p.name] for p in self.label_files]

    def __len__(self) -> int:
        return 2**62

    def generator(self, size):
        if size not in self._gens:
            device = self.cfg.get("generator_device", "cpu")
            if device == "cuda" and not torch.cuda.is_available():
                raise BrainIDError("data.generator_device=cuda but no CUDA GPU is visible; use data.generator_device=cpu")
            self._gens[size] = make_generator(self.cfg, size, device)
        return self._gens[size]

    def size_at(self, step: int) -> tuple[int, int, int]:
        """The crop size of a step (one per step, so a batch stacks), a pure function of (seed, step)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        u = np.random.default_rng([self.seed, int(step), 11]).random()
        return self.sizes[int(np.searchsorted(self.size_cdf, u, side="right").clip(0, len(self.sizes) - 1))]

    def subject(self, index: int):
        """(labels, t1 or None) tensors, reoriented to RAS (the generator flips along axis 0) and
        cropped to the head by the generator's own loader."""
        from BrainIDLib.synth import load_label_map

        t1_path = None if self.t1_files is None else self.t1_files[index]
        return self._cache.get(index, lambda: load_label_map(self.label_files[index], t1_path)[:2])

    def __getitem__(self, step: int) -> dict:
        draws = []
        generator = self.generator(self.size_at(step))
        for b in range(self.per_step):
            slot = (int(step) * self.world + self.rank) * self.per_step + b
            index = subject_slot(self.seed, slot, len(self.label_files))
            labels, t1 = self.subject(index)
            # step: what data.generator.schedule=curriculum grows severity with (fixed ignores it)
            draw = generator(labels, t1=t1, seed=seed_for(self.seed, slot), step=int(step))
            draws.append({k: v for k, v in draw.items() if isinstance(v, torch.Tensor)})
        batch = collate_draws(draws)
        batch["step"] = int(step)
        return batch


def generator_normalisation(data_cfg: dict) -> str:
    """The generator's input normalisation ("max" or "robust"): its option, else its preset's."""
    from BrainIDLib.synth.generator import PRESETS

    gen = data_cfg.get("generator") or {}
    return gen.get("normalisation", PRESETS.get(gen.get("preset", "brainid"), {}).get("normalisation", "max"))


def make_generator(data_cfg: dict, size, device: str = "cpu"):
    try:
        from BrainIDLib.synth import SubjectGenerator
    except ImportError as e:
        raise BrainIDError(f"the synthetic generator (BrainIDLib.synth) is not available: {e}") from None
    kwargs = dict(data_cfg.get("generator") or {})
    kwargs.setdefault("preset", "brainid")
    kwargs.update(n_mild=int(data_cfg["mild"]), n_severe=int(data_cfg["severe"]))
    return SubjectGenerator(size=tuple(size), device=device, **kwargs)


def step_loader(dataset, start: int, stop: int, num_workers: int = 0):
    """Iterate dataset[start], ..., dataset[stop-1], drawn ahead by worker processes if asked."""
    if num_workers <= 0:
        return (dataset[s] for s in range(start, stop))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop),
                                            num_workers=num_workers, prefetch_factor=2, persistent_workers=False,
                                            worker_init_fn=_ignore_stop_signals))


def _ignore_stop_signals(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave stopping to the main process, which
    checkpoints first and then shuts them down."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- real images ----------------------------------------------------------------------------

def read_manifest(spec) -> list[dict]:
    """data.subjects: a list of {image, labels?, t1?, mask?} or a JSON/CSV file holding one."""
    if isinstance(spec, (str, Path)):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise BrainIDError(f"data.subjects: manifest {p} not found")
        if p.suffix.lower() == ".json":
            rows = json.loads(p.read_text())
        else:
            with p.open(newline="") as fh:
                rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(fh)]
        base = p.parent
    elif isinstance(spec, list):
        rows, base = spec, Path(".")
    else:
        raise BrainIDError("data.subjects must be a list of {image, labels, t1, mask} or a JSON/CSV manifest path")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "image" not in r:
            raise BrainIDError(f"data.subjects entry {i} needs an 'image' (and labels / t1 for the tasks)")
        out.append({k: (base / v if not Path(v).is_absolute() else Path(v)) for k, v in r.items()
                    if k in ("image", "labels", "t1", "mask")})
    if not out:
        raise BrainIDError("data.subjects is empty")
    return out


def minmax(x: torch.Tensor, lo_pct: float = 0.0, hi_pct: float = 100.0) -> torch.Tensor:
    lo = torch.quantile(x.flatten()[:: max(1, x.numel() // 1_000_000)], lo_pct / 100) if lo_pct > 0 else x.min()
    hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 1_000_000)], hi_pct / 100) if hi_pct < 100 else x.max()
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def _crop_start(mask: np.ndarray | None, shape, size, rng: np.random.Generator) -> list[int]:
    starts = []
    for axis, (n, s) in enumerate(zip(shape, size)):
        if n <= s:
            starts.append(0)
            continue
        lo, hi = 0, n - s
        if mask is not None and mask.any():
            idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            centre = (idx[0] + idx[-1]) // 2
            lo, hi = max(0, min(hi, centre - s // 2 - s // 8)), min(n - s, max(0, centre - s // 2 + s // 8))
            lo, hi = min(lo, hi), max(lo, hi)
        starts.append(int(rng.integers(lo, hi + 1)))
    return starts


def crop_or_pad(x: torch.Tensor, starts, size) -> torch.Tensor:
    """Crop a (..., D, H, W) tensor at `starts` to `size`, zero-padding axes that are too short."""
    sl = tuple(slice(s, s + n) for s, n in zip(starts, size))
    x = x[(...,) + sl]
    pad = []
    for got, want in reversed(list(zip(x.shape[-3:], size))):
        pad += [0, want - got]
    return F.pad(x, pad) if any(pad) else x


def _smooth_field(size, grid: int, std: float, gen: torch.Generator) -> torch.Tensor:
    coarse = torch.randn((1, 1, grid, grid, grid), generator=gen) * std
    return F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=True)[0, 0]


def _gaussian_blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    if sigma <= 0.1:
        return x
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).view([1, 1] + [k.numel() if a == axis else 1 for a in range(3)])
    pad = [0] * 6
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    return F.conv3d(F.pad(x, pad, mode="replicate"), k)


def degrade_resolution(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
    """One of the four resolution regimes of the spec: blur by the slice thickness, downsample and
    upsample back (x: (1, 1, D, H, W) at 1 mm)."""
    regime = ["1mm", "thick_slice", "low_field", "low_iso"][int(rng.integers(4))]
    return degrade_to(x, regime, rng), regime


def degrade_to(x: torch.Tensor, regime: str, rng: np.random.Generator) -> torch.Tensor:
    if regime == "1mm":
        return x
    if regime == "thick_slice":
        spacing = np.ones(3)
        axis = int(rng.integers(3))
        spacing[axis] = rng.uniform(2.5, 8.5)
        thickness = spacing.copy()
        thickness[axis] = min(spacing[axis], rng.uniform(4, 6))
    elif regime == "low_field":
        spacing = np.array([1.3, 1.3, 5.0]) + rng.uniform(0, 0.4, 3)
        thickness = spacing.copy()
    elif regime == "low_iso":
        spacing = rng.uniform(2, 5, 3)
        thickness = spacing.copy()
    else:
        raise ValueError(f"unknown resolution regime {regime!r}")
    size = x.shape[2:]
    for axis in range(3):
        if thickness[axis] > 1:
            x = _gaussian_blur_axis(x, rng.uniform(0.85, 1.15) * math.log(5) / math.pi * thickness[axis], axis)
    low = [max(2, int(round(n / s))) for n, s in zip(size, spacing)]
    x = F.interpolate(x, size=low, mode="trilinear", align_corners=True)
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


CORRUPTION = {  # the spec's mild / severe settings, intensities on a [0, 1] scale (spec: 25-225 scale / 255)
    "mild": {"gamma": 0.01, "bias": (0.0, 0.02), "noise": (0.0, 0.02 / 255)},
    "severe": {"gamma": 0.1, "bias": (0.1, 0.6), "noise": (5 / 255, 15 / 255)},
}


def corrupt(x: torch.Tensor, level: str, rng: np.random.Generator, gen: torch.Generator,
            regime: str | None = None) -> dict:
    """Gamma, bias field, resolution (random regime unless given) and noise on a (1,1,D,H,W) image
    in [0, 1].

    Returns the corrupted input, the image before the resolution step (the super-resolution
    target) and the multiplicative bias field applied."""
    size = x.shape[2:]
    if level == "none":
        low = x if regime is None else degrade_to(x, regime, rng)
        return {"inputs": low, "clean": x, "bias_field": torch.ones_like(x), "regime": regime or "1mm"}
    p = CORRUPTION[level]
    x = x.clamp_min(0) ** float(np.exp(rng.normal(0, p["gamma"])))
    grid = int(rng.integers(3, 6))
    bias = torch.exp(_smooth_field(size, grid, float(rng.uniform(*p["bias"])), gen))[None, None]
    clean = (x * bias).clamp(0, None)
    if regime is None:
        low, regime = degrade_resolution(clean, rng)
    else:
        low = degrade_to(clean, regime, rng)
    noisy = (low + torch.randn(low.shape, generator=gen) * float(rng.uniform(*p["noise"]))).clamp_min(0)
    scale = noisy.max().clamp_min(1e-6)
    return {"inputs": noisy / scale, "clean": clean / scale, "bias_field": bias, "regime": regime}


class NiftiSteps(torch.utils.data.Dataset):
    """Item `step` = real subjects for rank `rank` at that step, cropped and corrupted, in the same
    dictionary layout as a generator draw (inputs, clean, target_t1, segmentation, bias_field, mask)."""

    def __init__(self, data_cfg: dict, seed: int, rank: int = 0, world: int = 1, corruption: str = "mild"):
        self.cfg = dict(data_cfg)
        self.subjects = read_manifest(self.cfg["subjects"])
        self.seed, self.rank, self.world = int(seed), rank, world
        self.size = size3(self.cfg["size"])
        self.per_step = int(self.cfg["subjects_per_step"])
        self.samples = max(1, int(self.cfg.get("mild", 1)))
        self.corruption = corruption
        self._cache = _LRU(int(self.cfg.get("cache_label_maps", 16)))

    def __len__(self) -> int:
        return 2**62

    def _load(self, index: int) -> dict:
        def load():
            s = self.subjects[index]
            out = {"image": _load_array(s["image"], np.float32)}
            for key, dtype in (("labels", np.int32), ("t1", np.float32), ("mask", np.uint8)):
                if key in s:
                    out[key] = _load_array(s[key], dtype)
                    if out[key].shape != out["image"].shape:
                        raise BrainIDError(f"{s[key]} has shape {out[key].shape}, its image {out['image'].shape}")
            return out

        return self._cache.get(index, load)

    def draw(self, index: int, seed: int, regime: str | None = None) -> dict:
        s = self._load(index)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        mask = s["mask"] > 0 if "mask" in s else (s["labels"] > 0 if "labels" in s else None)
        starts = _crop_start(mask, s["image"].shape, self.size, rng)
        image = crop_or_pad(minmax(torch.from_numpy(s["image"]), 0.5, 99.5), starts, self.size)[None, None]
        out = {}
        samples = [corrupt(image, self.corruption, rng, gen, regime) for _ in range(self.samples)]
        for key in ("inputs", "clean", "bias_field"):
            out[key] = torch.cat([smp[key] for smp in samples])
        if "t1" in s:
            out["target_t1"] = crop_or_pad(minmax(torch.from_numpy(s["t1"]), 0.5, 99.5), starts, self.size)[None]
        if "labels" in s:
            lab = crop_or_pad(torch.from_numpy(s["labels"].astype(np.int64)), starts, self.size)
            out["labels"] = lab
            out["segmentation"] = torch.from_numpy(labels_to_indices(lab.numpy()))
        if mask is not None:
            out["mask"] = crop_or_pad(torch.from_numpy(mask.astype(np.uint8)), starts, self.size).bool()
        return out

    def __getitem__(self, step: int) -> dict:
        draws = []
        for b in range(self.per_step):
            slot = (int(step) * self.world + self.rank) * self.per_step + b
            draws.append(self.draw(subject_slot(self.seed, slot, len(self.subjects)), seed_for(self.seed, slot) % 2**32))
        batch = collate_draws(draws)
        batch["step"] = int(step)
        return batch
