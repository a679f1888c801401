"""The one model resolver: "which model" (a model, a registry name, a weights file, or None for
the registry's default) to a ready BrainIDModel with its extra heads.

Every front end (the Python API, CLI, cohorts, correspondence, few-shot, Slicer's worker) resolves
models here, so they all refuse the same mistakes with the same messages and never run untrained
weights. `BrainIDLib.registry` only finds and verifies files; this module builds the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import registry
from .devices import select_device
from .errors import BrainIDError
from .model import BrainIDModel


@dataclass(frozen=True)
class ResolvedModel:
    model: BrainIDModel
    label: str  # what to call it in messages: the registry name, else the weights file's name
    owned: bool  # loaded here (not the caller's object): the caller may move it off the GPU after a run


def resolve(model=None, heads: dict | None = None, progress: Callable | None = None) -> ResolvedModel:
    """`model` as a BrainIDModel, plus {task: head file}; `progress(done, total, name)` for downloads."""
    from .weights import add_head_file, build_model, read_checkpoint

    if isinstance(model, BrainIDModel):
        for task, path in (heads or {}).items():
            add_head_file(model, task, path)
        return ResolvedModel(model, str((model.metadata or {}).get("name") or "model"), False)
    if model is None:
        entry = registry.default_model()
        if entry is None:
            raise BrainIDError(registry.how_to_get_weights())
        model = entry.name
    if not isinstance(model, (str, os.PathLike)):
        raise BrainIDError(f"model must be a BrainIDModel, a weights file or a registry name, not {type(model).__name__}")
    path, registry_heads, entry = registry.resolve_model(model, progress=progress)
    built = build_model(read_checkpoint(path), {**registry_heads, **(heads or {})})
    return ResolvedModel(built, entry.name if entry else path.name, True)


def load_model(weights=None, heads: dict | None = None, device: str = "cpu") -> BrainIDModel:
    """A ready model from a registry name or a weights file (None: the registry's default), plus
    optional {task: head file}, on `device`."""
    return resolve(weights, heads).model.to(select_device(device))
