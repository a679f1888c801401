"""Reading and writing model weights: the official torch files and our own safetensors files.

Official files are unpickled with `weights_only=True` and an explicit allowlist (the released
checkpoint stores an argparse.Namespace); nothing else is ever unpickled. Keys and shapes are
checked strictly and every mismatch is named. Our own format is safetensors with the model's
description (architecture, heads, label table, expected input) as JSON in the header.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BrainIDError
from .files import atomic_write
from .labels import SEGMENTATION_LABELS
from .model import CONTRAST_DEPENDENT, HEAD_KEYS, Architecture, BrainIDModel, UNet3D
from .tasks import HEAD_TASKS
from .validate import ARCH_BOUNDS, Checker, brainid_metadata, clean, declared_shapes, finite_tensors

FORMAT_VERSION = 1
METADATA_KEY = "brainid"
DEFAULT_INPUT = {"spacing_mm": [1.0, 1.0, 1.0], "normalisation": {"method": "minmax", "percentiles": [0.0, 100.0]}}

# The only non-tensor objects an official checkpoint may hold: its argparse arguments and numpy
# scalars in its validation statistics. Anything else makes the load fail with a clear message.
def _allowlist() -> list:
    import numpy as np

    allowed = [argparse.Namespace, np.dtype, type(np.dtype("float64")), type(np.dtype("float32"))]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return allowed + [scalar]


@dataclass
class Checkpoint:
    """Everything needed to build a model: where it came from, its shape and its tensors."""

    source: str  # "official" or "brainid"
    arch: Architecture
    backbone: dict[str, torch.Tensor]  # keys relative to the backbone
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> TaskHead state
    metadata: dict = field(default_factory=dict)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_strict(found: dict[str, tuple], expected: dict[str, tuple], what: str) -> None:
    """Raise a BrainIDError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or misshaped):
        return

    def listing(keys, fmt=str, limit=8):
        shown = ", ".join(fmt(k) for k in keys[:limit])
        return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if misshaped:
        problems.append(
            "mis-shaped keys: "
            + listing(misshaped, lambda k: f"{k} {list(found[k])} (expected {list(expected[k])})")
        )
    raise BrainIDError(f"{what} does not match the Brain-ID architecture; " + "; ".join(problems))


def backbone_shapes(arch: Architecture) -> dict[str, tuple]:
    """Keys and shapes of the backbone's state dict, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet3D(arch).state_dict().items()}


def official_shapes(arch: Architecture = Architecture()) -> dict[str, tuple]:
    """Keys and shapes of an official pretrained file (`model` entry) for this architecture."""
    shapes = {f"backbone.{k}": s for k, s in backbone_shapes(arch).items()}
    shapes["head.final_conv_image.weight"] = (1, arch.f_maps, 1, 1, 1)
    shapes["head.final_conv_image.bias"] = (1,)
    return shapes


def infer_architecture(backbone_state: dict[str, torch.Tensor], num_groups: int = 8) -> Architecture:
    """Width and depth from tensor shapes, so narrower official-style checkpoints load too."""
    try:
        first = backbone_state["encoders.0.basic_module.SingleConv2.conv.weight"]
        in_channels = backbone_state["encoders.0.basic_module.SingleConv1.conv.weight"].shape[1]
    except KeyError:
        raise BrainIDError(
            "the checkpoint has no Brain-ID backbone (no 'encoders.0...' weights); "
            "is this a Brain-ID pretrained file?"
        ) from None
    levels = 1 + max(int(k.split(".")[1]) if k.split(".")[1].isdigit() else -1
                     for k in backbone_state if k.startswith("encoders."))
    values = {"f_maps": int(first.shape[0]), "levels": levels, "num_groups": num_groups, "in_channels": int(in_channels)}
    check = Checker("the checkpoint", fix="is this a Brain-ID pretrained file?")
    for key, value in values.items():
        check.integer(value, f"inferred {key}", *ARCH_BOUNDS[key])
    return Architecture(**values)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    # safetensors before the legacy-pickle test: its 8-byte header length may start with 0x80
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # legacy (non-zip) torch pickle
        return "torch"
    return "unknown"


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BrainIDError(
            f"{path.name} holds Python objects that BrainID will not unpickle for safety "
            f"({clean(str(e).splitlines()[0])}). Only tensors and argparse arguments are allowed; "
            "get the file from a trusted source or convert it to safetensors where you trust it."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise BrainIDError(
            f"{path.name} is not a readable torch checkpoint (corrupt or truncated download?): "
            f"{clean((str(e).splitlines() or [type(e).__name__])[0])}. Download it again."
        ) from None


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _tensor_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official file: the `model` entry, or the file itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BrainIDError(f"{path.name} holds no state dict of tensors; is it a Brain-ID checkpoint?")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = _strip_prefix(obj, "module.")
    return obj


def _official_args(obj) -> dict:
    args = obj.get("args") if isinstance(obj, dict) else None
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))} if args else {}


def _read_official(path: Path) -> Checkpoint:
    obj = _torch_load(path)
    state = _tensor_dict(obj, path)
    if not any(k.startswith("backbone.") for k in state):
        raise BrainIDError(
            f"{path.name} has no 'backbone.*' weights: it looks like a task-head file; "
            "pass it as a head (heads={task: file}, or --head TASK=FILE), not as the model."
        )
    args = _official_args(obj)
    backbone = _strip_prefix(state, "backbone.")
    groups = Checker(path.name).integer(args.get("num_groups", 8), "args.num_groups", *ARCH_BOUNDS["num_groups"])
    arch = infer_architecture(backbone, num_groups=groups)
    check_strict(_shapes(state), official_shapes(arch), f"official checkpoint {path.name}")
    finite_tensors(state, path.name)
    heads = {"anatomy": {"final_conv_image.weight": state["head.final_conv_image.weight"],
                         "final_conv_image.bias": state["head.final_conv_image.bias"]}}
    meta = {"name": path.stem, "source": "official Brain-ID release", "input": DEFAULT_INPUT,
            "heads": {"anatomy": {"out_channels": 1}}, "official_args": args}
    return Checkpoint("official", arch, backbone, heads, meta)


def _read_safetensors(path: Path, kind: str, task: str | None = None) -> tuple[dict[str, tuple], dict]:
    """({tensor: shape}, checked metadata) from a BrainID safetensors file's header; no tensor is read."""
    from safetensors import SafetensorError

    try:
        shapes, header = declared_shapes(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BrainIDError(f"{path.name} is not a readable safetensors file (corrupt or truncated?): {clean(e)}") from None
    if METADATA_KEY not in header:
        raise BrainIDError(f"{path.name} is a safetensors file without BrainID metadata; it was not written by BrainID.")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise BrainIDError(f"{path.name} has unreadable BrainID metadata: {e}") from None
    return shapes, brainid_metadata(meta, path.name, FORMAT_VERSION, kind, task)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header was checked, refused if not finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BrainIDError(f"{path.name} is not a readable safetensors file (corrupt or truncated?): {clean(e)}") from None
    finite_tensors(tensors, path.name)
    return tensors


def _head_shapes(task: str, features: int, out_channels: int) -> dict[str, tuple]:
    key = HEAD_KEYS[task]
    extra = 1 if task in CONTRAST_DEPENDENT else 0
    return {f"{key}.weight": (out_channels, features + extra, 1, 1, 1), f"{key}.bias": (out_channels,)}


def _read_ours(path: Path) -> Checkpoint:
    shapes, meta = _read_safetensors(path, "model")
    arch = Architecture.from_dict(meta["architecture"])
    expected = {f"backbone.{k}": s for k, s in backbone_shapes(arch).items()}
    for task, info in meta["heads"].items():
        expected.update({f"heads.{task}.{k}": s for k, s in _head_shapes(task, arch.f_maps, info["out_channels"]).items()})
    check_strict(shapes, expected, f"BrainID model {path.name}")
    tensors = _load_tensors(path)
    heads = {task: _strip_prefix(tensors, f"heads.{task}.") for task in meta["heads"]}
    return Checkpoint("brainid", arch, _strip_prefix(tensors, "backbone."), heads, meta)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an official `.pth` or a BrainID `.safetensors` model file, strictly checked."""
    path = Path(path)
    if not path.is_file():
        raise BrainIDError(f"weights file not found: {path}")
    kind = _sniff(path)
    if kind == "torch":
        return _read_official(path)
    if kind == "safetensors":
        return _read_ours(path)
    raise BrainIDError(f"{path.name} is neither a torch checkpoint nor a safetensors file (corrupt download?)")


def read_head(path: str | os.PathLike, task: str, features: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One task head: an official `final_conv_<name>.*` file or a BrainID head file."""
    path = Path(path)
    if task not in HEAD_TASKS:
        raise BrainIDError(f"unknown task {task!r}; choose from {', '.join(HEAD_TASKS)}")
    if not path.is_file():
        raise BrainIDError(f"head file not found: {path}")
    kind = _sniff(path)
    if kind == "safetensors":
        shapes, meta = _read_safetensors(path, "head", task)
        out = meta["heads"].get(task, {}).get("out_channels")
        found = {k: s for k, s in shapes.items() if k.startswith(f"heads.{task}.")}
        if out is not None:  # the declared shapes must fit before the tensors are read
            check_strict(_strip_prefix(found, f"heads.{task}."), _head_shapes(task, features, out), f"{task} head {path.name}")
        state = _strip_prefix(_load_tensors(path), f"heads.{task}.")
    elif kind == "torch":
        state = _tensor_dict(_torch_load(path), path)
        state = _strip_prefix(state, "head.") if all(k.startswith("head.") for k in state) else state
        finite_tensors(state, path.name)
        meta = {"heads": {task: {}}}
    else:
        raise BrainIDError(f"{path.name} is neither a torch checkpoint nor a safetensors file")
    key = HEAD_KEYS[task]
    weight = state.get(f"{key}.weight")
    if weight is None:
        raise BrainIDError(
            f"{path.name} has no '{key}.weight', so it is not a {task} head "
            f"(it has: {', '.join(sorted(state)[:6])})"
        )
    check_strict(_shapes(state), _head_shapes(task, features, weight.shape[0]), f"{task} head {path.name}")
    return state, meta


def _install_head(model: BrainIDModel, task: str, state: dict[str, torch.Tensor], info: dict) -> None:
    """Add one strictly loaded head and record its description (labels default to the 33 classes)."""
    out_channels = state[f"{HEAD_KEYS[task]}.bias"].shape[0]
    model.add_head(task, out_channels).load_state_dict(state, strict=True)
    info = {**info, "out_channels": int(out_channels)}
    if task == "segmentation" and "labels" not in info:
        info["labels"] = list(SEGMENTATION_LABELS) if out_channels == len(SEGMENTATION_LABELS) else list(range(out_channels))
    model.metadata.setdefault("heads", {})[task] = info


def add_head_file(model: BrainIDModel, task: str, path: str | os.PathLike) -> None:
    """Attach a head file (official `final_conv_<name>.*` or BrainID safetensors) to a model."""
    state, head_meta = read_head(path, task, model.arch.f_maps)
    _install_head(model, task, state, dict(head_meta.get("heads", {}).get(task, {})))


def build_model(ckpt: Checkpoint, heads: dict[str, str | os.PathLike] | None = None) -> BrainIDModel:
    """A model on the CPU with the checkpoint's heads plus any extra head files, all strict."""
    model = BrainIDModel(ckpt.arch)
    model.backbone.load_state_dict(ckpt.backbone, strict=True)
    model.metadata = json.loads(json.dumps(ckpt.metadata))  # private copy
    model.metadata.setdefault("input", DEFAULT_INPUT)
    described = model.metadata.get("heads", {})
    for task, state in ckpt.heads.items():
        _install_head(model, task, state, dict(described.get(task, {})))
    for task, file in (heads or {}).items():
        add_head_file(model, task, file)
    return model.eval()


def _metadata_for(model: BrainIDModel, kind: str, extra: dict | None) -> dict:
    from . import __version__

    # a file written here is not the file the model was loaded from: its origin ("source") is not
    # inherited (a head trained on the official backbone is no official release); callers state it
    meta = {k: v for k, v in model.metadata.items() if k not in ("official_args", "source")}
    meta.update(extra or {})
    meta.update({"format": "brainid", "format_version": FORMAT_VERSION, "brainid_version": __version__,
                 "kind": kind, "architecture": model.arch.to_dict()})
    meta.setdefault("input", DEFAULT_INPUT)
    return meta


def save_model(model: BrainIDModel, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Backbone and all heads as one safetensors file with the model's description."""
    from safetensors.torch import save_file

    meta = _metadata_for(model, "model", metadata)
    meta["heads"] = {t: {**meta.get("heads", {}).get(t, {}), "out_channels": model.heads[t].out_channels} for t in model.tasks}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))
    return Path(path)


def save_head(model: BrainIDModel, task: str, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """One task head as a small file that `load_model(..., heads={task: path})` accepts."""
    from safetensors.torch import save_file

    meta = _metadata_for(model, "head", metadata)
    meta["task"] = task
    meta["heads"] = {task: {**model.metadata.get("heads", {}).get(task, {}), "out_channels": model.heads[task].out_channels}}
    tensors = {f"heads.{task}.{k}": v.detach().cpu().contiguous() for k, v in model.heads[task].state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))
    return Path(path)


# --- writing the official layout (the inverse of _read_official / read_head) -----------------

def official_state(model: BrainIDModel) -> dict[str, torch.Tensor]:
    """The `model` entry of an official pretrained file: `backbone.*` and the anatomy head as
    `head.final_conv_image.*`, checked strictly against official_shapes."""
    if "anatomy" not in model.heads:
        raise BrainIDError("the official pretrained layout holds the anatomy head (head.final_conv_image) and this "
                           "model has none; export its task heads only, or attach an anatomy head")
    if model.arch.num_groups != Architecture().num_groups:
        raise BrainIDError(f"this model normalises with {model.arch.num_groups} groups; the official layout has no "
                           f"place for that and always means {Architecture().num_groups}, so the file would load "
                           "as a different network: keep BrainID's safetensors file for it")
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.heads["anatomy"].state_dict().items()})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    check_strict(_shapes(state), official_shapes(model.arch), "exported model")
    return state


def official_head_state(model: BrainIDModel, task: str) -> dict[str, torch.Tensor]:
    """A downstream head in the official layout: `final_conv_<name>.*` (no `head.` prefix)."""
    if task not in model.heads:
        raise BrainIDError(f"the model has no {task} head (it has: {', '.join(model.tasks) or 'none'})")
    state = {k: v.detach().cpu().contiguous() for k, v in model.heads[task].state_dict().items()}
    check_strict(_shapes(state), _head_shapes(task, model.arch.f_maps, model.heads[task].out_channels),
                 f"exported {task} head")
    return state


def save_official(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """{"model": state} as a torch file holding tensors only (loads with weights_only=True), atomically."""
    return atomic_write(Path(path), lambda tmp: torch.save({"model": state}, tmp))
