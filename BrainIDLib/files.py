"""Files on disk: written atomically (a crash or Ctrl-C never leaves half a result) and hashed."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


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
