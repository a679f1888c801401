"""Where to compute: the one vocabulary of device names every front end offers, and choosing a
device with a clear message when the asked-for one is missing.

Names: `auto` (CUDA, then Apple's MPS, then the CPU), `cuda` (or `cuda:N`), `mps`, `cpu`, and `gpu`
for whichever GPU is present (CUDA, else MPS). The names are plain data, so a front end can list
them before torch is installed; torch is imported only to look at the hardware.
"""

from __future__ import annotations

from .errors import BrainIDError

DEVICES = ("auto", "cuda", "mps", "cpu")  # offered in this order
LABELS = {"auto": "auto", "cuda": "GPU (CUDA)", "mps": "Apple GPU (MPS)", "cpu": "CPU"}
GPUS = ("cuda", "mps")  # what `gpu` and `auto` try, in order
HELP = "auto (cuda, then mps, then cpu), cuda, mps, cpu, or gpu (cuda or mps)"


def _present(kind: str) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The device names worth offering on this machine: auto, the GPUs torch sees, cpu."""
    return [d for d in DEVICES if d not in GPUS or _present(d)]


def select_device(preference=None):
    """The torch.device a name means ('auto' when None); an explicitly asked-for GPU must exist."""
    import torch

    pref = str(preference or "auto").lower()
    if pref in ("auto", "gpu"):
        found = next((kind for kind in GPUS if _present(kind)), None)
        if found is not None:
            return torch.device(found)
        if pref == "gpu":
            raise BrainIDError("a GPU was requested but torch sees none (no CUDA GPU, no Apple MPS); use --device cpu "
                               "(or auto), or install the PyTorch build for your GPU")
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not _present("cuda"):
            raise BrainIDError("a GPU was requested but torch sees no CUDA GPU; use --device cpu (or auto), "
                               "or install a CUDA build of PyTorch")
        return torch.device(pref)
    if pref == "mps":
        if not _present("mps"):
            raise BrainIDError("Apple MPS was requested but is not available here; use --device cpu")
        return torch.device("mps")
    if pref == "cpu":
        return torch.device("cpu")
    raise BrainIDError(f"unknown device {preference!r}; use {HELP}")


def release_memory(device) -> None:
    """Hand cached GPU memory back after a run so other programs (and Slicer) can use it."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
