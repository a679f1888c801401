"""Training data: synthetic subjects from the generator, or real NIfTI images deformed and corrupted.

Every optimizer step's data is a pure function of (seed, step, rank): subject choice follows an
epoch-wise permutation over the global sample slot (what a DistributedSampler does) and every draw
gets its own seed. The data position of a run is therefore its step, a resumed run sees exactly
the data the uninterrupted run would have seen, and DataLoader workers can draw ahead freely.
"""

from __future__ import annotations

import csv
import glob
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from BrainIDLib.errors import BrainIDError
from BrainIDLib.files import NIFTI_SUFFIXES

from .config import crop_sizes, size3
from .real_data import RealDraws, check_subject, load_subject


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
        from BrainIDLib.synth.dataset import warn_unless_1mm

        warn_unless_1mm(self.label_files)
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
        return self._cache.get(index, lambda: load_label_map(self.label_files[index], t1_path, check_spacing=False)[:2])

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


class NiftiSteps(torch.utils.data.Dataset):
    """Item `step` = real subjects for rank `rank` at that step, deformed, flipped and corrupted by
    training.real_data (the paper's adaptation data), in the dictionary layout of a generator draw
    (inputs, clean, target_t1, labels, segmentation, bias_field, mask)."""

    def __init__(self, data_cfg: dict, seed: int, rank: int = 0, world: int = 1, corruption: str = "mild",
                 normalisation: dict | None = None):
        self.cfg = dict(data_cfg)
        self.normalisation = normalisation  # the model's (its metadata's input.normalisation)
        self.subjects = read_manifest(self.cfg["subjects"])
        for row in self.subjects:
            check_subject(row)
        self.seed, self.rank, self.world = int(seed), rank, world
        self.size = size3(self.cfg["size"])
        self.per_step = int(self.cfg["subjects_per_step"])
        self.samples = max(1, int(self.cfg.get("mild", 1)))
        self.draws = RealDraws(self.size, corruption, self.cfg.get("generator"))
        self._cache = _LRU(int(self.cfg.get("cache_label_maps", 16)))

    def __len__(self) -> int:
        return 2**62

    def draw(self, index: int, seed: int, regime: int | None = None) -> dict:
        """One draw of subject `index`; regime: force that index of BrainIDLib.synth.corruption.REGIMES."""
        subject = self._cache.get(index, lambda: load_subject(self.subjects[index], self.normalisation))
        return self.draws(subject, seed, self.samples, regime)

    def __getitem__(self, step: int) -> dict:
        draws = []
        for b in range(self.per_step):
            slot = (int(step) * self.world + self.rank) * self.per_step + b
            draws.append(self.draw(subject_slot(self.seed, slot, len(self.subjects)), seed_for(self.seed, slot) % 2**32))
        batch = collate_draws(draws)
        batch["step"] = int(step)
        return batch
