"""Shared set-up for the test_slicer_* tests: slicer-core (real MRML, no Qt) or a clean skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "BrainID"


def require_slicer():
    """The `slicer` package (slicer-core wheel or Slicer itself), or skip the whole test module."""
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018 - the wheel is really there
    except (ImportError, AttributeError) as e:
        pytest.skip(f"slicer-core is not installed ({e}); `pip install slicer-core` to run the Slicer tests",
                    allow_module_level=True)
    if str(MODULE_DIR) not in sys.path:  # Slicer puts the module folder on sys.path
        sys.path.insert(0, str(MODULE_DIR))
    return slicer
