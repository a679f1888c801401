"""Whether bfloat16 runs a model faster than float32 on this CPU: a short timed probe, kept in a cache.

Native bf16 instructions are not enough to decide. Measured with benchmarks/precision.py: on an Intel
Xeon with avx512_bf16 and no AMX, brainid-lite's bf16 network took 1.07-1.27x the float32 time, and
the ratio grows with the grid (0.6x at 32^3, 1.2x at 96^3 on that CPU), so the probe times the model's
own forward on a head-sized grid at the model's spacing, both precisions interleaved, best of two after
a warm-up. bf16 is chosen only when clearly faster (below BF16_MARGIN of the float32 time). The answer
is kept per CPU, torch version, thread count and architecture in `<cache>/bf16-probe.json` (and in
the process), so a machine pays the probe (about 7 s for brainid-lite on 2 cores) once.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from .files import atomic_write
from .model import BrainIDModel

log = logging.getLogger(__name__)

BF16_MARGIN = 0.9  # bf16 must take under this fraction of the float32 time
HEAD_MM = 192.0  # the probe grid spans a head this wide at the model's spacing
SIDE_RANGE = (48, 112)  # voxels per side, whatever the spacing (bounds the probe's cost)
_answers: dict[str, bool] = {}  # probe key -> bf16 faster, for this process


def cache_file() -> Path:
    from .registry import cache_dir

    return cache_dir() / "bf16-probe.json"


@functools.cache
def _cpuinfo() -> tuple[str, frozenset]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo, read once per process (every
    CPU run asks); empty where there is none (not Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (x86 avx512_bf16 / amx_bf16, Arm bf16). Elsewhere
    oneDNN emulates it, slower than float32."""
    return bool(_cpuinfo()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_name() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def probe_side(model: BrainIDModel, spacing_mm) -> int:
    """Voxels per side of the probe grid: a head at the model's spacing (mm, per axis), a multiple of
    the U-Net's downsampling factor."""
    spacing = min(float(s) for s in spacing_mm)
    side = min(max(round(HEAD_MM / spacing), SIDE_RANGE[0]), SIDE_RANGE[1])
    step = 2 ** (model.arch.levels - 1)
    return -(-side // step) * step


def probe_key(model: BrainIDModel, side: int) -> str:
    a = model.arch
    return (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"f_maps {a.f_maps} levels {a.levels} groups {a.num_groups} in {a.in_channels} | {side}^3")


def time_forward(model: BrainIDModel, side: int, autocast: Callable, reps: int = 2) -> dict[str, float]:
    """Best wall time of the model's no-grad forward on a side^3 grid, per precision (under
    `autocast(device, precision)`, the context inference runs the network in), interleaved so that
    other load on the machine hits both alike; one untimed warm-up each."""
    cpu = torch.device("cpu")
    x = torch.randn(1, model.arch.in_channels, side, side, side)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.no_grad():
        for rep in range(reps + 1):
            for precision in best:
                start = time.perf_counter()
                with autocast(cpu, precision):
                    model.features(x)
                if rep:
                    best[precision] = min(best[precision], time.perf_counter() - start)
    return best


def bf16_wins(seconds: dict[str, float]) -> bool:
    """The probe's rule on {"fp32": s, "bf16": s}: bf16 only when clearly faster."""
    return seconds["bf16"] < BF16_MARGIN * seconds["fp32"]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, unreadable or corrupt: probe again and rewrite it


def bf16_faster(model: BrainIDModel, spacing_mm, autocast: Callable,
                progress: Callable[[float, str], None] | None = None) -> bool:
    """True when this CPU runs `model` (prepared at `spacing_mm`) clearly faster in bf16 under
    `autocast`: from the cache, else probed now (saying so to `progress(fraction, message)`)."""
    side = probe_side(model, spacing_mm)
    key = probe_key(model, side)
    if key in _answers:
        return _answers[key]
    path = cache_file()
    entries = _read_cache(path)
    entry = entries.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("bf16_faster"), bool)):
        note = f"timing bfloat16 against float32 on a {side}^3 grid (once for this CPU and model size)"
        log.info(note)
        if progress is not None:
            progress(0.0, note)
        t = {p: round(s, 4) for p, s in time_forward(model, side, autocast).items()}
        entry = {"fp32_s": t["fp32"], "bf16_s": t["bf16"], "bf16_faster": bf16_wins(t),
                 "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        entries[key] = entry
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(entries, indent=1)))
        except OSError as e:  # a read-only home: the answer still holds for this call
            log.warning("could not keep the bf16 probe's result in %s (%s); it will be timed again", path, e)
    _answers[key] = entry["bf16_faster"]
    return _answers[key]
