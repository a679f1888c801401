"""Files on disk: scans found and named, outputs written atomically (a crash or Ctrl-C never leaves
half a result), weights hashed. Pure Python, shared by the CLI, cohorts and training."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from .errors import BrainIDError

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz")


def nifti_stem(path: Path) -> str:
    """The file name without its image suffix (`scan.nii.gz` -> `scan`): what outputs are named after."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def scan_paths(values: list[str], what: str) -> list[Path]:
    """Files, and the NIfTI files of folders (sorted), in order; each must exist (`what` names them
    in the error)."""
    out: list[Path] = []
    for value in values:
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
                           and not p.name.startswith("."))
            if not found:
                raise BrainIDError(f"{what} folder {path} holds no NIfTI file (.nii/.nii.gz)")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise BrainIDError(f"{what} not found: {path}")
    return out


def safe_name(text: str) -> str:
    """`text` usable in a file name (a few-shot head's name in its segmentations' names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "fewshot"


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".part") -> Path:
    """Call `write(tmp)` on a temporary file in the same folder, then rename it onto `path`.

    `suffix` ends the temporary name, for writers that pick the format from it (`.part.nii.gz`).
    The file gets the permissions of a plainly created one (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    """The process umask, read once at import (os.umask can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def save_nifti(img, path: str | os.PathLike) -> Path:
    """A nibabel image written atomically (the temporary keeps the .nii / .nii.gz suffix)."""
    import nibabel as nib

    suffix = ".part.nii.gz" if str(path).lower().endswith(".nii.gz") else ".part.nii"
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
