"""The sample volume shipped in Resources/SampleData (see samples.json and make_sample.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import BrainIDError
from .files import sha256_of
from .resources import resource_path


@lru_cache(maxsize=None)
def sample_manifest() -> tuple[dict, ...]:
    """The entries of Resources/SampleData/samples.json (name, title, filename, sha256, ...)."""
    try:
        data = json.loads(resource_path("SampleData", "samples.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BrainIDError(f"BrainID's sample data manifest is missing or damaged ({e}); reinstall BrainID") from None
    return tuple(data["samples"])


def sample_path(name: str | None = None, verify: bool = True) -> Path:
    """Path of a shipped sample (the first one by default), SHA-256 checked."""
    samples = sample_manifest()
    entry = samples[0] if name is None else next((s for s in samples if s["name"].lower() == name.lower()), None)
    if entry is None:
        raise BrainIDError(f"no sample named {name!r}; available: {', '.join(s['name'] for s in samples)}")
    path = resource_path("SampleData", entry["filename"])
    if not path.is_file():
        raise BrainIDError(f"the sample volume {path} is missing; reinstall BrainID")
    if verify and sha256_of(path) != entry["sha256"]:
        raise BrainIDError(f"the sample volume {path} is damaged (SHA-256 mismatch); reinstall BrainID")
    return path
