"""Where the extension-level assets (Resources/) live, in a checkout, a wheel or a Slicer install."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """`BrainIDLib/resources` when installed as a wheel, else the repository's `Resources/`."""
    for candidate in (_HERE / "resources", _HERE.parent / "Resources"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("BrainID's Resources folder is missing from this installation; reinstall BrainID.")


def resource_path(*parts: str) -> Path:
    return resources_dir().joinpath(*parts)
