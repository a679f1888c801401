"""Choosing where to compute, with a clear message when the asked-for device is missing."""

from __future__ import annotations

import torch

from .errors import BrainIDError


def select_device(preference: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    pref = str(preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref in ("gpu", "cuda") or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BrainIDError("a GPU was requested but torch sees no CUDA GPU; use --device cpu (or auto), "
                               "or install a CUDA build of PyTorch")
        return torch.device("cuda" if pref == "gpu" else pref)
    if pref == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise BrainIDError("Apple MPS was requested but is not available here; use --device cpu")
        return torch.device("mps")
    if pref == "cpu":
        return torch.device("cpu")
    raise BrainIDError(f"unknown device {preference!r}; use auto, cpu, cuda (gpu) or mps")


def release_memory(device: torch.device) -> None:
    """Hand cached GPU memory back after a run so other programs (and Slicer) can use it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
