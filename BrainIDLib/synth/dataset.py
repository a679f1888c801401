"""A torch Dataset over a folder of label maps (+ optional T1s with the same file names).

    ds = LabelMapDataset("labels/", t1_dir="t1/", size=(128, 128, 128), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, shuffle=True)
    for draw in loader: ...          # one subject draw per item (its N samples are the batch)

Files load lazily (nibabel) in the worker that needs them, are reoriented to RAS (so axis 0 is
left/right, the flip axis) and cropped to the head's bounding box plus a margin. Item i of epoch e
is a function of (seed, e, i) only: the same on every run, whatever worker computes it.
With generate=False an item is the loaded {"labels", "t1", "seed", "name"} so that the generator can
run on a GPU in the main process instead.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import BrainIDError
from ..files import NIFTI_SUFFIXES
from .generator import SubjectGenerator


def _is_volume(p: Path) -> bool:
    return p.is_file() and any(p.name.endswith(s) for s in NIFTI_SUFFIXES)


def list_label_maps(source) -> list[Path]:
    """A file, a folder (its NIfTI/MGZ files, sorted) or a list of files."""
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    else:
        p = Path(source)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if _is_volume(q))
        elif _is_volume(p):
            files = [p]
        else:
            raise BrainIDError(f"no label map at {p}: give a NIfTI/MGZ file or a folder of them")
    if not files:
        raise BrainIDError(f"no .nii/.nii.gz/.mgz label maps found in {source}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BrainIDError(f"label map(s) not found: {', '.join(missing[:3])}")
    return files


def _crop_box(labels: np.ndarray, margin: int) -> tuple[slice, ...]:
    nz = [np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(len(v) == 0 for v in nz):
        return tuple(slice(None) for _ in range(3))
    return tuple(slice(max(0, int(v[0]) - margin), min(labels.shape[ax], int(v[-1]) + 1 + margin))
                 for ax, v in enumerate(nz))


def _not_1mm(zooms) -> tuple[float, ...] | None:
    """The voxel size (mm, rounded) when it is not ~1 mm, else None."""
    return tuple(round(float(z), 2) for z in zooms) if any(abs(float(z) - 1.0) > 0.1 for z in zooms) else None


def _warn_not_1mm(sizes: dict[str, tuple]) -> None:
    if sizes:
        listed = ", ".join(f"{name} ({' x '.join(map(str, mm))} mm)" for name, mm in list(sizes.items())[:3])
        more = f" and {len(sizes) - 3} more" if len(sizes) > 3 else ""
        warnings.warn(f"voxels are not 1 mm in {listed}{more}; the generator treats voxels as 1 mm "
                      "(resample label maps to 1 mm for faithful ranges)", stacklevel=3)


def warn_unless_1mm(files) -> None:
    """One warning for every label map of a training set whose voxels are not ~1 mm (headers only),
    so that worker processes, which load the maps with check_spacing=False, do not repeat it."""
    import nibabel as nib

    sizes = {}
    for f in files:
        try:
            odd = _not_1mm(nib.load(str(f)).header.get_zooms()[:3])
        except Exception:  # noqa: BLE001 - an unreadable map fails with its own message when loaded
            continue
        if odd:
            sizes[Path(f).name] = odd
    _warn_not_1mm(sizes)


def load_label_map(path, t1_path=None, margin: int = 8, canonical: bool = True, check_spacing: bool = True):
    """(labels int32 tensor, t1 float32 tensor or None, affine of the crop) from files; RAS and
    cropped to the non-zero box + margin. check_spacing: warn when its voxels are not ~1 mm (sets of
    maps check once with warn_unless_1mm instead)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is a user-fixable file problem
        raise BrainIDError(f"cannot read label map {path}: {e}") from e
    if canonical:
        img = nib.as_closest_canonical(img)
    arr = np.asarray(img.dataobj)
    arr = arr.reshape(arr.shape[:3]) if arr.ndim == 4 and arr.shape[3] == 1 else arr
    if arr.ndim != 3:
        raise BrainIDError(f"label map {path} is not a 3D volume (shape {arr.shape})")
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    arr = arr.astype(np.int32, copy=False)
    odd = _not_1mm(img.header.get_zooms()[:3]) if check_spacing else None
    if odd:
        _warn_not_1mm({Path(path).name: odd})
    box = _crop_box(arr, margin)
    lab = torch.from_numpy(np.ascontiguousarray(arr[box]))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([s.start or 0 for s in box]) + img.affine[:3, 3]
    t1 = None
    if t1_path is not None:
        try:
            timg = nib.load(str(t1_path))
        except Exception as e:  # noqa: BLE001
            raise BrainIDError(f"cannot read T1 {t1_path}: {e}") from e
        if canonical:
            timg = nib.as_closest_canonical(timg)
        if timg.shape[:3] != img.shape[:3] or not np.allclose(timg.affine, img.affine, atol=1e-3):
            raise BrainIDError(f"T1 {t1_path} is not on the grid of its label map {path}; resample it first")
        tarr = np.asarray(timg.dataobj, dtype=np.float32).reshape(timg.shape[:3])
        t1 = torch.from_numpy(np.nan_to_num(np.ascontiguousarray(tarr[box])))
    return lab, t1, affine


class LabelMapDataset(Dataset):
    """Subject draws from a folder (or file, or list) of label maps; see the module docstring.

    t1_dir: folder with T1s named like the label maps (optional; missing T1 -> canonical render).
    length: items per epoch (default: the number of maps; items cycle over the maps).
    cache: keep up to this many loaded maps per worker (0: reload each time; gz reads ~0.5 s each).
    Other keyword arguments go to SubjectGenerator (preset, schedule, label_table, overrides...).
    """

    def __init__(self, labels, t1_dir=None, size=(128, 128, 128), seed: int = 0, length: int | None = None,
                 generate: bool = True, margin: int = 8, cache: int = 0, preset: str = "brainid",
                 generator: SubjectGenerator | None = None, **generator_kwargs):
        self.files = list_label_maps(labels)
        self.t1_dir = Path(t1_dir) if t1_dir else None
        if self.t1_dir is not None and not self.t1_dir.is_dir():
            raise BrainIDError(f"T1 folder {self.t1_dir} does not exist")
        self.seed = int(seed)
        self.length = int(length) if length else len(self.files)
        self.generate = generate
        self.margin = margin
        self.cache_size = int(cache)
        self._cache: OrderedDict = OrderedDict()
        self.epoch = 0
        self.step = None
        if generator is None:
            generator = SubjectGenerator(preset=preset, size=size, device="cpu", **generator_kwargs)
        self.generator = generator
        warn_unless_1mm(self.files)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Different draws each epoch (call before iterating; with persistent workers it only
        reaches the workers if they are restarted)."""
        self.epoch = int(epoch)

    def set_step(self, step: int | None) -> None:
        """Training step for the curriculum schedule. Without it, item i of epoch e counts as step
        e * len(dataset) + i (one draw per step), which also works inside DataLoader workers as long
        as set_epoch() is called before each epoch's iterator is made."""
        self.step = step

    def t1_path(self, label_path: Path) -> Path | None:
        if self.t1_dir is None:
            return None
        p = self.t1_dir / label_path.name
        return p if p.is_file() else None

    def item_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7_919 * max(1, self.length) + int(index)) % (2**62)

    def load(self, index: int):
        path = self.files[index % len(self.files)]
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        out = load_label_map(path, self.t1_path(path), self.margin, check_spacing=False)
        if self.cache_size > 0:
            self._cache[path] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def __getitem__(self, index: int) -> dict:
        if index < 0 or index >= self.length:
            raise IndexError(index)
        labels, t1, _ = self.load(index)
        seed = self.item_seed(index)
        name = os.path.basename(str(self.files[index % len(self.files)]))
        if not self.generate:
            step = self.step if self.step is not None else self.epoch * self.length + int(index)
            return {"labels": labels, "t1": t1 if t1 is not None else torch.empty(0), "seed": seed, "name": name,
                    "step": step}
        step = self.step if self.step is not None else self.epoch * self.length + int(index)
        draw = self.generator(labels, t1=t1, seed=seed, step=step)
        draw["seed"] = torch.tensor(seed)
        draw["name"] = name
        return draw
