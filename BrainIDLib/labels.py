"""FreeSurfer label ids, names and colours, and the official 33-class segmentation order."""

from __future__ import annotations

import json
from functools import lru_cache

from .resources import resource_path


@lru_cache(maxsize=None)
def _table() -> dict:
    return json.loads(resource_path("labels", "freesurfer.json").read_text())


SEGMENTATION_LABELS: tuple[int, ...] = tuple(_table()["segmentation_33"])
LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = tuple(tuple(p) for p in _table()["left_right_pairs"])


def label_name(label: int) -> str:
    entry = _table()["labels"].get(str(int(label)))
    return entry["name"] if entry else f"Label-{int(label)}"


def label_color(label: int) -> tuple[int, int, int]:
    """RGB 0-255; unknown labels get a stable colour derived from the id."""
    entry = _table()["labels"].get(str(int(label)))
    if entry:
        return tuple(entry["rgb"])
    v = int(label) * 2654435761 & 0xFFFFFF
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
