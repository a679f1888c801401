"""Model registry (Resources/models.json): names to files. Full download support comes next."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BrainIDError


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise BrainIDError(f"no weights file or registered model named {name_or_path!r}")
