"""Running Brain-ID on a scan: features and task outputs mapped back onto the input's grid.

    pred = predict("t1.nii.gz", tasks=["segmentation"], model="weights.safetensors")
    pred.outputs["segmentation"]            # int16 FreeSurfer ids, same shape/affine as the input

Whole-volume or tiled, chosen from a memory budget, with the same numbers either way: tiled runs
keep the network's whole-volume activations in CPU RAM (GPU runs) or in files on disk (CPU runs) and
stream depth slabs through the device, so GroupNorm still sees whole-volume statistics (see
`BrainIDLib.storage`). Half precision on CUDA, bfloat16 on the CPU when asked (`precision=`, see
`cpu_precision`); CUDA out-of-memory falls back to tiling, smaller slabs, then the CPU, with a
warning instead of a traceback. Task heads (1x1x1 convolutions) run a depth slab at a time.
"""

from __future__ import annotations


import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .bf16_probe import bf16_faster, cpu_has_native_bf16
from .cleanup import keep_largest_components_
from .devices import release_memory, select_device
from .errors import BrainIDError
from .loader import resolve
from .model import CONTRAST_DEPENDENT, SLAB_ELEMENTS, BrainIDModel, activation_peak_bytes, widest_slab_row
from .progress import Progress, Span
from .storage import Storage
from .tasks import OUTPUT_TASKS, heads_for, outputs_of
from .tasks import parse as parse_tasks
from .volume import Prepared, Volume, grid_shape, load_volume, make_nifti, prepare

log = logging.getLogger("BrainIDLib")

# Device bytes per slab element of a convolution step (input slab with halo, output slab, oneDNN's
# reordered copies, the upsampled rows), in values of the compute precision. benchmarks/tiling.py:
# disk-backed full-size runs at 96^3 and 128^3 with 32M-value slabs peak at 0.92 GB RssAnon, 0.42 GB
# (3.1 float32 values per slab element) above the idle process; rounded down, the halo term covers it.
SLAB_BUFFERS = 3
RUNTIME_BYTES = 400 << 20  # torch itself, the input volume and the small tensors around a run
# Largest model grid a run accepts (a 320 mm cube at 1 mm; a head scan is ~256 mm across): bounds the
# work before resampling, e.g. a 35x43x38 scan whose header says 19.9 mm voxels. BRAINID_MAX_VOXELS or
# max_voxels= (CLI --max-voxels) raise it.
MAX_GRID_VOXELS = 320**3


@dataclass
class Prediction:
    """Outputs on the input's exact grid (same shape and affine), plus optional extras."""

    outputs: dict = field(default_factory=dict)  # task -> nibabel.Nifti1Image
    probabilities: object | None = None  # 4D Nifti1Image (X,Y,Z,classes) when asked
    qc: object | None = None  # BrainIDLib.qc.QCReport when asked (qc=True)
    uncertainty: object | None = None  # per-voxel QC uncertainty in [0, 1] on the input grid (qc=True)
    outputs_1mm: dict = field(default_factory=dict)  # task -> image on the model grid (on_1mm=True)
    features_1mm: object | None = None  # 4D image on the model grid when keep_features=True
    labels: tuple = ()  # FreeSurfer id of each segmentation class
    device: str = "cpu"
    mode: str = "whole"
    messages: list = field(default_factory=list)
    precision: str = "fp32"  # of the CPU passes: fp32 or bf16


def _check_tasks(model: BrainIDModel, tasks: list[str]) -> list[str]:
    """The heads `tasks` (canonical names) need, each one present in the model."""
    if not tasks:
        raise BrainIDError(f"no task given; choose one or more of {', '.join(OUTPUT_TASKS)}")
    heads = heads_for(tasks)
    missing = [t for t in heads if t not in model.heads]
    if missing:
        have = ", ".join(model.tasks) or "none"
        raise BrainIDError(
            f"the model has no {', '.join(missing)} head (it has: {have}); add one with "
            f"heads={{'{missing[0]}': FILE}} (CLI: --head {missing[0]}=FILE) or pick a model that has it"
        )
    return heads


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_precision(precision: str, model: BrainIDModel | None, device: torch.device,
                  progress: Callable[[float, str], None] | None = None) -> str:
    """'fp32' or 'bf16' for CPU passes. 'auto' is bf16 only for a model whose metadata says bf16 was
    measured equivalent to float32 (input.bf16: true, written by whoever measured it, e.g. with
    benchmarks/precision.py), on a CPU with native bfloat16 where a timed probe of this model found
    bf16 clearly faster (BrainIDLib.bf16_probe, run once per CPU and cached); float32 otherwise. GPU passes keep
    float16 autocast on CUDA (and float32 on MPS) whatever this returns. With model None it only
    checks the value (auto then reads fp32), for front ends that check before loading a model. `progress`
    (fraction, message) is told when the probe runs, so the first run's pause has a reason on screen."""
    precision = str(precision or "auto").lower()
    if precision not in PRECISIONS:
        raise BrainIDError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    if precision != "auto" and device.type != "cpu":
        raise BrainIDError(f"precision {precision} applies to CPU runs (GPU runs use float16); use precision "
                           "auto (--precision auto) or the CPU (--device cpu)")
    if precision == "auto":
        measured = model is not None and (model.metadata or {}).get("input", {}).get("bf16") is True
        if not (measured and device.type == "cpu" and cpu_has_native_bf16()):
            return "fp32"  # (a GPU run's CPU fallback after out-of-memory is rare: float32, no probe)
        return "bf16" if bf16_faster(model, model_input(model)[0], _autocast, progress) else "fp32"
    return precision


def _autocast(device: torch.device, precision: str = "fp32"):
    """float16 on CUDA; on the CPU bfloat16 convolutions (float32 accumulation inside oneDNN) when
    precision is bf16. GroupNorm statistics stay float32/float64 in the low-memory forward."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and precision == "bf16":  # no cache of bf16 weight copies: they would add to the peak
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast("cpu", enabled=False)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def available_memory_bytes(device: torch.device) -> int:
    """Memory the run may use: free GPU memory, or available RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available)
    except Exception:
        return 8 << 30


def _value_bytes(device) -> int:
    return 2 if torch.device(device).type == "cuda" else 4


def _slab_bytes(model: BrainIDModel, shape, device, slab_elements: int) -> int:
    """Device bytes of the slab buffers: `slab_elements`, or one row of the widest layer plus halos."""
    row = widest_slab_row(model.arch, shape)
    return SLAB_BUFFERS * _value_bytes(device) * (max(slab_elements, row) + 2 * row)


def storage_bytes(model: BrainIDModel, shape, device, out_channels: int = 0) -> int:
    """Peak bytes a run keeps in its storage: the whole-volume activations, or afterwards the features
    next to the float32 outputs."""
    v, voxels = _value_bytes(device), math.prod(shape)
    return max(activation_peak_bytes(model.arch, shape, v), (v * model.arch.f_maps + 4 * out_channels) * voxels)


def estimate_forward_bytes(model: BrainIDModel, shape, device: torch.device | str = "cpu", out_channels: int = 0,
                           slab_elements: int | None = None) -> int:
    """Peak device bytes of one forward of a volume of `shape` (weights and runtime not included):
    whole (slab_elements None) holds the activations there too (and on the CPU the outputs); tiled
    holds only the slab buffers."""
    slabs = _slab_bytes(model, shape, device, slab_elements or SLAB_ELEMENTS)
    if slab_elements is not None:
        return slabs
    v, voxels = _value_bytes(device), math.prod(shape)
    outputs = 4 * out_channels * voxels if torch.device(device).type == "cpu" else 0
    return max(activation_peak_bytes(model.arch, shape, v) + slabs, v * model.arch.f_maps * voxels + outputs)


def _weights_bytes(model: BrainIDModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plan_mode(model: BrainIDModel, padded_shape, device: torch.device, budget_bytes: int,
              out_channels: int) -> tuple[str, int | None]:
    """('whole', None) when the whole volume fits the budget, else ('tiled', slab elements)."""
    fixed = _weights_bytes(model) + RUNTIME_BYTES
    if estimate_forward_bytes(model, padded_shape, device, out_channels) + fixed <= budget_bytes:
        return "whole", None
    return "tiled", tile_plan(model, padded_shape, device, budget_bytes)


def tile_plan(model: BrainIDModel, padded_shape, device, budget_bytes: int) -> int:
    """Slab elements of a tiled run: the largest (up to SLAB_ELEMENTS) whose buffers fit the budget,
    and never under one row of the widest layer (the run then needs that much, whatever the budget)."""
    room = budget_bytes - _weights_bytes(model) - RUNTIME_BYTES
    row = widest_slab_row(model.arch, padded_shape)
    fits = room // (SLAB_BUFFERS * _value_bytes(device)) - 2 * row
    return int(max(row, min(SLAB_ELEMENTS, fits)))


def _tiled_storage(model: BrainIDModel, shape, device: torch.device, slab_elements: int, out_channels: int) -> Storage:
    """CPU RAM for a GPU run when the activations fit there (pinned), disk otherwise."""
    need = storage_bytes(model, shape, device, out_channels)
    ram = device.type != "cpu" and need <= 0.8 * available_memory_bytes(torch.device("cpu"))
    return Storage(device, "ram" if ram else "disk", slab_elements)


# ------------------------------------------------------------------------------- forward passes
def _raw_heads(model: BrainIDModel, feats: torch.Tensor, image: torch.Tensor, heads: list[str]) -> list[torch.Tensor]:
    if feats.dtype == torch.bfloat16:  # bf16 features: heads in float32, a depth slab at a time
        return [_head_float32(model, t, feats, image) for t in heads]
    outs = []
    for t in heads:
        outs.append(model.apply_head(t, feats, image if t in CONTRAST_DEPENDENT else None))
    return outs


def _head_float32(model: BrainIDModel, task: str, feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A head on bfloat16 features in float32 (logits rounded to bf16 would flip close argmaxes),
    without a full float32 copy of the features."""
    out = torch.empty((feats.shape[0], model.heads[task].out_channels) + tuple(feats.shape[2:]), dtype=torch.float32)
    slab = max(1, SLAB_ELEMENTS // max(1, feats.shape[1] * feats.shape[3] * feats.shape[4]))
    with torch.autocast("cpu", enabled=False):
        for d0 in range(0, feats.shape[2], slab):
            sl = (slice(None), slice(None), slice(d0, d0 + slab))
            img = image[sl].float() if task in CONTRAST_DEPENDENT else None
            out[sl] = model.apply_head(task, feats[sl].float(), img)
    return out


def _forward_volume(model, x, heads, want_features, device, progress_check, precision="fp32",
                    storage: Storage | None = None) -> torch.Tensor:
    """(channels, *shape) float32 on the CPU: raw head outputs, then features if asked. The network's
    activations live in `storage` (default: all on `device`); heads run a depth slab at a time."""
    storage = storage or Storage(device)
    shape = tuple(x.shape[2:])
    channels = sum(model.heads[t].out_channels for t in heads) + (model.arch.f_maps if want_features else 0)
    with torch.no_grad(), _autocast(device, precision):
        feats = model.features(x, progress_check, storage)
        progress_check()
        out = storage.output((channels,) + shape)
        rows = max(1, (storage.slab_elements or SLAB_ELEMENTS) // (model.arch.f_maps * shape[1] * shape[2]))
        for d0 in range(0, shape[0], rows):
            sl = (slice(None), slice(None), slice(d0, d0 + rows))
            f = storage.load(feats[sl])
            parts = _raw_heads(model, f, x[sl].to(device), heads) + ([f] if want_features else [])
            c = 0
            for p in parts:
                out[c : c + p.shape[1], d0 : d0 + rows].copy_(p[0])
                c += p.shape[1]
            del f, parts
    return out


def run_network(model, prep: Prepared, heads, want_features, device, mode, budget_bytes, progress, messages,
                slab_elements=None, precision="fp32"):
    """(raw outputs (channels, *padded) on the CPU, mode, slab elements of a tiled run, device used).

    Tiled runs hold the activations in CPU RAM or on disk and pass `slab_elements`-sized slabs through
    the device (None: sized from the budget). CUDA out-of-memory retries tiled, with smaller slabs,
    then on the CPU."""
    out_channels = sum(model.heads[t].out_channels for t in heads) + (model.arch.f_maps if want_features else 0)
    shape = tuple(prep.tensor.shape[2:])
    if mode not in ("auto", "whole", "tiled"):
        raise BrainIDError(f"unknown mode {mode!r}; use auto, whole or tiled")
    if budget_bytes is None:
        budget_bytes = int(0.8 * available_memory_bytes(device))
    if mode == "auto":
        mode, slab_elements = plan_mode(model, shape, device, budget_bytes, out_channels)
    elif mode == "tiled" and slab_elements is None:
        slab_elements = tile_plan(model, shape, device, budget_bytes)
    while True:
        try:
            model.to(device)
            if mode == "whole":
                progress(0.0, "running the network on the whole volume")
                storage = Storage(device)
            else:
                storage = _tiled_storage(model, shape, device, slab_elements, out_channels)
                where = "on disk" if storage.kind == "disk" else "in RAM"
                progress(0.0, f"running the network tiled (activations {where}, slabs of {slab_elements / 1e6:.1f}M values)")
            out = _forward_volume(model, prep.tensor, heads, want_features, device, progress.check, precision, storage)
            progress(1.0, "network done")
            return out, mode, slab_elements, device
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
            if not _is_oom(e) or device.type == "cpu":
                if _is_oom(e):
                    raise BrainIDError(
                        "out of memory on the CPU; close other programs, or pass a smaller memory budget "
                        "(memory_budget_gb / --memory-gb) so BrainID tiles the volume"
                    ) from None
                raise
            release_memory(device)
            smallest = widest_slab_row(model.arch, shape)
            if mode == "whole" or slab_elements > smallest:
                slab_elements = tile_plan(model, shape, device, budget_bytes) if mode == "whole" else max(smallest, slab_elements // 4)
                mode = "tiled"
                msg = f"GPU out of memory; retrying tiled with slabs of {slab_elements / 1e6:.1f}M values"
            else:
                msg = "GPU out of memory even when tiled; falling back to the CPU (slower)"
                model.to("cpu")
                device = torch.device("cpu")
                budget_bytes = int(0.8 * available_memory_bytes(device))
                mode, slab_elements = plan_mode(model, shape, device, budget_bytes, out_channels)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
            messages.append(msg)


# ------------------------------------------------------------------------------- public calls
def model_input(model: BrainIDModel) -> tuple[list, dict]:
    """(spacing in mm, normalisation) the model's metadata asks its input to be prepared with."""
    inp = (model.metadata or {}).get("input", {})
    return inp.get("spacing_mm", [1.0, 1.0, 1.0]), inp.get("normalisation", {"method": "minmax", "percentiles": [0.0, 100.0]})


def max_grid_voxels(max_voxels: int | None = None) -> int:
    """The grid-size limit: `max_voxels`, else $BRAINID_MAX_VOXELS, else MAX_GRID_VOXELS."""
    value = max_voxels if max_voxels is not None else os.environ.get("BRAINID_MAX_VOXELS") or MAX_GRID_VOXELS
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if limit <= 0:
        raise BrainIDError(f"the voxel limit must be a positive whole number (--max-voxels / BRAINID_MAX_VOXELS), got {value!r}")
    return limit


def check_grid(vol: Volume, spacing_mm, max_voxels: int | None = None) -> None:
    """Refuse, before any resampling, a scan whose model grid would exceed the voxel limit."""
    limit = max_grid_voxels(max_voxels)
    shape = grid_shape(vol, spacing_mm)
    n = int(np.prod(shape))
    if n > limit:
        fov = "x".join(f"{e:.0f}" for e in np.array(vol.shape) * vol.spacing)
        raise BrainIDError(
            f"{vol.name} covers {fov} mm, i.e. {'x'.join(map(str, shape))} = {n / 1e6:.1f}M voxels on the model grid, "
            f"more than the limit of {limit / 1e6:.1f}M; check its header's voxel size or crop it, or raise the "
            "limit with --max-voxels N (API: max_voxels=N; or BRAINID_MAX_VOXELS=N) if you have the memory and time")


@dataclass(frozen=True)
class PreparedScan:
    """A scan read, checked and resampled for one model's input (`prepare_scan`): predict() and
    features() take it in place of a path, so a cohort prepares the next scan while one computes."""

    volume: Volume
    prepared: Prepared
    model_input: str  # the model's input description it was prepared for


def _input_key(model: BrainIDModel) -> str:
    spacing, norm = model_input(model)
    return json.dumps([spacing, norm, 2 ** (model.arch.levels - 1)], sort_keys=True, default=str)


def prepare_scan(image, model: BrainIDModel, max_voxels: int | None = None,
                 progress: Progress | None = None) -> PreparedScan:
    """Read, check and resample `image` for `model` (everything predict() does before the network);
    an image already a PreparedScan is checked against the model and returned."""
    return PreparedScan(*_prepare(image, model, progress or Progress(), max_voxels), _input_key(model))


def _prepare(image, model, progress: Progress, max_voxels: int | None = None) -> tuple[Volume, Prepared]:
    progress(0.0, "reading the image")
    if isinstance(image, PreparedScan):
        if image.model_input != _input_key(model):
            raise BrainIDError("this scan was prepared for another model's input (spacing, normalisation); "
                               "prepare it again with prepare_scan(image, model)")
        progress(0.08, "image resampled to the model grid")
        return image.volume, image.prepared
    vol = load_volume(image)
    progress.check()
    spacing, norm = model_input(model)
    check_grid(vol, spacing, max_voxels)
    prep = prepare(vol, spacing, norm, multiple=2 ** (model.arch.levels - 1))
    progress(0.08, "image resampled to the model grid")
    return vol, prep


def segmentation_labels(model: BrainIDModel) -> list[int]:
    """The FreeSurfer id of each segmentation class: from the metadata, else the 33-class table, else
    the class indices."""
    info = model.metadata.get("heads", {}).get("segmentation", {})
    labels = info.get("labels")
    n = model.heads["segmentation"].out_channels
    if not labels or len(labels) != n:
        from .labels import SEGMENTATION_LABELS

        labels = list(SEGMENTATION_LABELS) if n == len(SEGMENTATION_LABELS) else list(range(n))
    return [int(v) for v in labels]


def predict(image, tasks=("segmentation",), model=None, device="auto", heads=None, on_1mm=False, mode="auto",
            memory_budget_gb=None, progress=None, cancel=None, probabilities=False, keep_features=False,
            max_voxels=None, flip_average=None, qc=False, precision="auto", cleanup=True) -> Prediction:
    """Run task heads on a scan; outputs land on the input's exact grid (see module docs).

    tasks: any of anatomy, segmentation, super_resolution, bias_field, bias_corrected, or their
    aliases (BrainIDLib.tasks); bias_field also writes bias_corrected.
    model: BrainIDModel, weights file or registry name (None: the registry's default model).
    progress(fraction, message) is called between steps; cancel() -> bool also between the network's
    convolution slabs.
    mode: whole, tiled or auto (whole when its estimate fits memory_budget_gb, default 80% of the free
    memory). Tiled gives the same numbers: it keeps the activations in CPU RAM (GPU) or on disk (CPU,
    in $TMPDIR) and streams depth slabs sized to the budget through the device.
    max_voxels: refuse scans whose model grid is larger (default MAX_GRID_VOXELS or $BRAINID_MAX_VOXELS).
    flip_average: also run the left/right mirrored scan and average the heads' outputs (segmentation
    channels of left/right structures swapped back): a symmetric result at twice the network time.
    None: as the model's metadata says (input.flip_average; on for brainid-lite).
    qc: also score the segmentation's quality (Prediction.qc, .uncertainty; see BrainIDLib.qc): True
        for the default perturbed passes, or a sequence of them (e.g. ("flip", "shift")). With
        flip_average the mirrored pass is shared: QC compares the two passes before averaging.
    image: a path, nibabel image, Volume, or a PreparedScan from prepare_scan(image, model).
    precision: auto, fp32 or bf16 for CPU passes (see cpu_precision; auto is float32 unless bf16
    was measured equivalent for this model and is native and timed faster on this CPU).
    cleanup: each structure keeps only its largest connected piece (BrainIDLib.cleanup); other
    islands take their next most probable class. QC then compares its passes with the cleaned result.
    """
    prog = Progress(progress, cancel)
    if qc:
        from .qc import check_perturbations

        qc = check_perturbations(qc)
    loaded = resolve(model, heads)
    model, owned = loaded.model, loaded.owned
    tasks = parse_tasks(tasks, OUTPUT_TASKS)
    head_tasks = _check_tasks(model, tasks)
    wanted = outputs_of(tasks)
    dev = select_device(device)
    precision = cpu_precision(precision, model, dev, prog)
    vol, prep = _prepare(image, model, prog, max_voxels)
    budget = None if memory_budget_gb is None else int(float(memory_budget_gb) * (1 << 30))
    result = Prediction(device=str(dev), precision=precision)
    try:
        if flip_average is None:
            flip_average = bool((model.metadata or {}).get("input", {}).get("flip_average", False))
        stop = 0.45 if flip_average else 0.85
        fade = brain_fade(model) if "anatomy" in head_tasks else None
        net_tasks = head_tasks + ["segmentation"] if fade and "segmentation" not in head_tasks else head_tasks
        raw, result.mode, slab, used = run_network(
            model, prep, net_tasks, keep_features, dev, mode, budget, Span(prog, 0.1, stop), result.messages, None,
            precision)
        shared = {}  # QC passes already run: {"flip": the mirrored pass's probabilities, unrestored}
        if flip_average:
            mirrored = replace(prep, tensor=prep.tensor.flip(2))
            other = run_network(model, mirrored, net_tasks, False, used, result.mode, budget,
                                Span(prog, stop, 0.85), result.messages, slab, precision)[0]
            if qc and "flip" in qc and "segmentation" in head_tasks:  # compared before they are averaged
                seg = _head_slice(model, net_tasks, "segmentation")
                shared = {"base": _softmax(raw[seg]), "flip": _softmax(other[seg])}
            _average_mirrored(raw, other.flip(1), _mirror_channels(model, net_tasks))
            del other
        if fade:
            _fade_outside_brain(model, raw, net_tasks, fade)
        result.device = str(used)
    finally:
        if owned:
            model.to("cpu")
        release_memory(dev)
    post = Span(prog, 0.85, 1.0)
    n_steps = len(head_tasks) + 1
    seg_probs = None
    for i, task in enumerate(head_tasks):
        post(i / n_steps, f"mapping {task} back to the input grid")
        chunk = raw[_head_slice(model, net_tasks, task)]
        if task != "segmentation":  # (its softmax runs in place, in the blending precision)
            chunk = chunk.float()
        _finish_task(task, chunk, model, vol, prep, wanted, on_1mm, probabilities, result, cleanup)
        if task == "segmentation":
            seg_probs = chunk  # softmaxed in place by _finish_task
    if qc and seg_probs is not None:
        try:
            _quality(model, vol, prep, shared.pop("base", seg_probs), qc, used, result.mode, budget, slab,
                     Span(post, len(head_tasks) / n_steps, 1.0), result, shared)
        finally:
            if owned:
                model.to("cpu")
            release_memory(used)
    if keep_features:
        offset = sum(model.heads[t].out_channels for t in net_tasks)
        result.features_1mm = make_nifti(np.moveaxis(prep.crop(raw[offset:]).numpy(), 0, -1), prep.grid_affine)
    del raw
    prog(1.0, "done")
    return result


def brain_fade(model: BrainIDModel) -> float | None:
    """The model's anatomy head was fitted on brain voxels only (its metadata's heads.anatomy.brain_fade,
    training/fit_heads.py): outside the brain it would paint a flat grey where the T1 it learnt is 0.
    Returns the brain probability below which its output fades to 0, if the model has the segmentation
    head that gives that probability."""
    fade = ((model.metadata or {}).get("heads", {}).get("anatomy") or {}).get("brain_fade")
    return float(fade) if fade and "segmentation" in model.heads and 0 in segmentation_labels(model) else None


def brain_weight(model: BrainIDModel, seg_logits: torch.Tensor, fade: float) -> torch.Tensor:
    """min(1, P(brain) / fade) from segmentation logits (classes first), P(brain) = 1 - the background
    probability: what a brain-fitted anatomy output is multiplied by. Full value wherever the segmentation
    gives the brain `fade` or more, so the brain's edge keeps the head's values; 0 where it is sure of
    background (air, skull, scalp)."""
    logits = seg_logits.float()
    background = segmentation_labels(model).index(0)
    p_brain = 1 - torch.exp(logits[background] - torch.logsumexp(logits, 0))
    return (p_brain / fade).clamp(max=1)


def _fade_outside_brain(model: BrainIDModel, raw: torch.Tensor, heads: list[str], fade: float) -> None:
    """The anatomy channel of the raw outputs times brain_weight, in place, on the model grid."""
    weight = brain_weight(model, raw[_head_slice(model, heads, "segmentation")], fade)
    raw[_head_slice(model, heads, "anatomy")] *= weight.to(raw.dtype)


def _mirror_channels(model: BrainIDModel, heads: list[str]) -> torch.Tensor:
    """For each head output channel, the channel that means the same after a left/right mirror: the
    partner structure for segmentation classes, itself for everything else."""
    from .labels import LEFT_RIGHT_PAIRS

    perm = []
    for task in heads:
        c = model.heads[task].out_channels
        if task != "segmentation":
            perm += list(range(len(perm), len(perm) + c))
            continue
        labels = segmentation_labels(model)
        partner = {a: b for a, b in LEFT_RIGHT_PAIRS} | {b: a for a, b in LEFT_RIGHT_PAIRS}
        index = {lab: i for i, lab in enumerate(labels)}
        base = len(perm)
        perm += [base + index.get(partner.get(lab, lab), i) for i, lab in enumerate(labels)]
    return torch.tensor(perm)


def _average_mirrored(raw: torch.Tensor, mirrored: torch.Tensor, perm: torch.Tensor) -> None:
    """raw[:n] = (raw[:n] + mirrored[perm]) / 2 in place, channel by channel (n head channels; any
    feature channels after them stay those of the unmirrored pass)."""
    for i, j in enumerate(perm.tolist()):
        raw[i].add_(mirrored[j].to(raw.dtype)).mul_(0.5)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=0)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (dim 0) in place, in the tensor's own precision: no full-size copy."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


def _head_slice(model: BrainIDModel, heads: list[str], task: str) -> slice:
    """Where `task`'s channels sit in the raw output of `heads`."""
    start = 0
    for t in heads:
        if t == task:
            return slice(start, start + model.heads[t].out_channels)
        start += model.heads[t].out_channels
    raise KeyError(task)


def _quality(model, vol, prep, probs, kinds, device, mode, budget, slab, progress, result, shared=None) -> None:
    """Prediction.qc and .uncertainty from perturbed passes of the network (BrainIDLib.qc); `shared`
    holds passes predict() already ran ({kind: probabilities on the perturbed grid})."""
    from . import qc

    labels = list(result.labels)
    keep = None  # the padding predict() sets to background stays background in every pass
    pad = padding_mask(vol.array) if 0 in labels else None
    if pad is not None:
        keep = prep.crop(prep.tensor[0])[0] > 1e-3
    passes = iter(range(len(kinds)))

    def run(x):
        k = next(passes)
        if kinds[k] in (shared or {}):
            return shared.pop(kinds[k])
        step = Span(progress, k / (len(kinds) + 1), (k + 1) / (len(kinds) + 1))
        raw = run_network(model, replace(prep, tensor=x), ["segmentation"], False, device, mode, budget, step,
                          result.messages, slab, result.precision)[0].float()
        return _softmax_(raw)

    voxel_ml = abs(float(np.linalg.det(prep.grid_affine[:3, :3]))) / 1000.0
    result.qc, unc = qc.assess(prep.tensor, probs, run, labels, voxel_ml, prep.crop, keep, kinds, qc.typical_dice_of(model))
    progress(0.9, "uncertainty map")
    unc = prep.unpadded().to_input_grid(unc[None])[0].clamp_(0, 1)
    if pad is not None:  # certain there, as the segmentation is
        unc[torch.from_numpy(pad)] = 0
    result.uncertainty = make_nifti(unc.numpy(), vol.affine)


def padding_mask(array: np.ndarray, min_fraction: float = 0.05) -> np.ndarray | None:
    """The empty padding around a skull-stripped or defaced scan: voxels at the image's minimum value,
    when they fill at least `min_fraction` of it (None otherwise, e.g. a whole-head scan with noisy
    air). Training crops hold little such emptiness, so labels the network puts there are noise:
    predict() sets them to background."""
    pad = array <= array.min()
    return pad if pad.mean() >= min_fraction else None


def _finish_task(task, chunk, model, vol, prep, wanted, on_1mm, want_probs, result, cleanup=False):
    affine = vol.affine
    if task == "segmentation":
        labels = segmentation_labels(model)
        result.labels = tuple(labels)
        probs = _softmax_(chunk)  # in place: the raw outputs are not needed afterwards
        if cleanup:
            keep_largest_components_(probs, labels.index(0) if 0 in labels else None)
        lut = torch.tensor(labels, dtype=torch.int16)
        idx = prep.argmax_on_input_grid(probs)
        pad = padding_mask(vol.array) if 0 in labels else None
        if pad is not None:
            idx[torch.from_numpy(pad)] = labels.index(0)
        result.outputs["segmentation"] = make_nifti(lut[idx].numpy(), affine, np.int16)
        if want_probs:
            p = prep.to_input_grid(probs)
            result.probabilities = make_nifti(np.moveaxis(p.numpy(), 0, -1), affine)
        if on_1mm:
            idx1 = prep.crop(probs).argmax(0)
            if pad is not None:  # the padding on the model grid (resampled: allow a sliver)
                idx1[prep.crop(prep.tensor[0])[0] <= 1e-3] = labels.index(0)
            result.outputs_1mm["segmentation"] = make_nifti(lut[idx1].numpy(), prep.grid_affine, np.int16)
        return
    if task == "bias_field":
        log_bias = prep.to_input_grid(chunk)[0]
        bias = torch.exp(log_bias.clamp(-20, 20))
        if "bias_field" in wanted:
            result.outputs["bias_field"] = make_nifti(bias.numpy(), affine)
        if "bias_corrected" in wanted:
            result.outputs["bias_corrected"] = make_nifti(vol.array / bias.numpy(), affine)
        if on_1mm:
            b1 = torch.exp(prep.crop(chunk)[0].clamp(-20, 20))
            if "bias_field" in wanted:
                result.outputs_1mm["bias_field"] = make_nifti(b1.numpy(), prep.grid_affine)
            if "bias_corrected" in wanted:
                # the input on the model grid, back in its own intensity units
                lo, hi = prep.intensity_range
                img = prep.crop(prep.tensor[0])[0] * (hi - lo) + lo
                result.outputs_1mm["bias_corrected"] = make_nifti((img / b1).numpy(), prep.grid_affine)
        return
    img = prep.to_input_grid(chunk)[0]
    result.outputs[task] = make_nifti(img.numpy(), affine)
    if on_1mm:
        result.outputs_1mm[task] = make_nifti(prep.crop(chunk)[0].numpy(), prep.grid_affine)
