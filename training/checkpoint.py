"""Training checkpoints that never leave a half-written file and load with `weights_only=True`.

A checkpoint holds the trainable module, optimizer, scheduler, grad scaler and EMA states, every
random-number generator (torch, CUDA, numpy, Python) and the step, stored only as tensors, numbers,
strings, lists and dicts, so torch's safe loader reads it without any allowlist.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from BrainIDLib.errors import BrainIDError
from BrainIDLib.weights import atomic_write

CHECKPOINT_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal),
                   "gauss_next": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, payload: dict) -> Path:
    payload = {"version": CHECKPOINT_VERSION, **payload, "rng": rng_state()}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
    return Path(path)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BrainIDError(f"no checkpoint at {path}; nothing to resume (start the run without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise BrainIDError(f"checkpoint {path} cannot be read ({str(e).splitlines()[0][:160]}); "
                           "resume from an earlier copy or start again") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise BrainIDError(f"{path} is not a BrainID training checkpoint (version {CHECKPOINT_VERSION})")
    return ckpt
