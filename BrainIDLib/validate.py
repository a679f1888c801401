"""Schema checks for what BrainID reads from files: model, head and few-shot head metadata, tensor shapes
declared in a safetensors header, and tensor values.

A model file's JSON header decides what BrainID allocates (the architecture sizes the network), so
every field is checked for type and range here, before anything is built, and every problem is one
BrainIDError naming the file, the field and the fix. weights.py and fewshot.py share these checks.
"""

from __future__ import annotations

import math
import re

from .errors import BrainIDError
from .tasks import HEAD_TASKS

# Bounds on what a file may ask for. The official model is f_maps 64, 5 levels, 8 groups, 1 channel;
# brainid-lite is 16 x 4. Anything far outside is a damaged or crafted file, not a model.
ARCH_BOUNDS = {"f_maps": (2, 512), "levels": (2, 7), "num_groups": (1, 512), "in_channels": (1, 8)}
MAX_PARAMETERS = 500_000_000  # ~2 GB of float32: 5x the official backbone
MAX_OUT_CHANNELS = 1024
MAX_LABELS = 1024
LABEL_RANGE = (-32768, 32767)  # segmentations are written as int16
SPACING_RANGE_MM = (0.1, 10.0)
MAX_TEXT = 10_000
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x1f\x7f]")


def clean(text: object, limit: int = 200) -> str:
    """`text` on one line, without terminal escapes or control characters, at most `limit` characters."""
    s = " ".join(_CONTROL.sub(" ", str(text)).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _shown(value: object) -> str:
    return clean(repr(value), 60)


class Checker:
    """Type and range checks that raise one BrainIDError naming the file, the field and the fix."""

    def __init__(self, source: str, fix: str = "the file is damaged or was not written by BrainID; get it again"):
        self.source, self.fix = source, fix

    def fail(self, field: str, wanted: str, value: object):
        raise BrainIDError(f"{self.source}: metadata field '{field}' must be {wanted}, got {_shown(value)}; {self.fix}")

    def mapping(self, value, field: str, optional: bool = False) -> dict:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def integer(self, value, field: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(field, f"an integer from {lo} to {hi}", value)
        return int(value)

    def number(self, value, field: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            self.fail(field, f"a number from {lo:g} to {hi:g}", value)
        return float(value)

    def text(self, value, field: str, optional: bool = True) -> str:
        if value is None and optional:
            return ""
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            self.fail(field, f"a string (at most {MAX_TEXT} characters)", value)
        return value

    def listing(self, value, field: str, max_len: int, length: int | None = None) -> list:
        if not isinstance(value, list) or len(value) > max_len or (length is not None and len(value) != length):
            wanted = f"a list of {length} items" if length is not None else f"a list of at most {max_len} items"
            self.fail(field, wanted, value)
        return value

    def int_list(self, value, field: str, lo: int, hi: int, max_len: int, length: int | None = None) -> list[int]:
        items = self.listing(value, field, max_len, length)
        return [self.integer(v, f"{field}[{i}]", lo, hi) for i, v in enumerate(items)]

    def format_version(self, meta: dict, newest: int) -> int:
        version = meta.get("format_version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > newest:
            raise BrainIDError(f"{self.source} was written by a newer BrainID (format {version}); upgrade BrainID")
        return self.integer(version, "format_version", 0, newest)


def architecture(d, check: Checker):
    """An Architecture from a metadata dict, every field bounded, and its parameter count bounded
    before the network is built."""
    from .model import Architecture

    d = check.mapping(d, "architecture")
    unknown = sorted(set(d) - set(ARCH_BOUNDS))
    if unknown:
        check.fail("architecture", f"an object with keys {', '.join(ARCH_BOUNDS)}", unknown)
    if "f_maps" not in d or "levels" not in d:
        check.fail("architecture", "an object with at least f_maps and levels", d)
    values = {k: check.integer(v, f"architecture.{k}", *ARCH_BOUNDS[k]) for k, v in d.items()}
    arch = Architecture(**values)
    if parameter_count(arch) > MAX_PARAMETERS:
        check.fail("architecture", f"a network of at most {MAX_PARAMETERS:,} parameters", values)
    return arch


def parameter_count(arch) -> int:
    """Parameters of the backbone, from the architecture alone (no allocation)."""
    w = arch.widths
    total = 0

    def double(cin, mid, cout):
        return 27 * (cin * mid + mid * cout) + 2 * (cin + mid)  # two convs (no bias) + GroupNorm affines

    total += double(arch.in_channels, max(w[0] // 2, arch.in_channels), w[0])
    total += sum(double(w[i - 1], w[i - 1], w[i]) for i in range(1, arch.levels))
    total += sum(double(w[i] + w[i + 1], w[i], w[i]) for i in range(arch.levels - 1))
    return total


def model_input(d, check: Checker) -> dict:
    """The `input` block: spacing in mm and the normalisation description (types only: its method is
    the engine's business)."""
    d = check.mapping(d, "input")
    out = dict(d)
    if "spacing_mm" in d:
        sp = d["spacing_mm"]
        items = [sp] if isinstance(sp, (int, float)) and not isinstance(sp, bool) else check.listing(sp, "input.spacing_mm", 3, 3)
        out["spacing_mm"] = [check.number(v, "input.spacing_mm", *SPACING_RANGE_MM) for v in items] * (3 // len(items))
    if "normalisation" in d:
        norm = check.mapping(d["normalisation"], "input.normalisation")
        if "method" in norm:
            check.text(norm["method"], "input.normalisation.method", optional=False)
        if "percentiles" in norm:
            pct = check.listing(norm["percentiles"], "input.normalisation.percentiles", 2, 2)
            for v in pct:
                check.number(v, "input.normalisation.percentiles", 0.0, 100.0)
        if "ct_window" in norm:
            for v in check.listing(norm["ct_window"], "input.normalisation.ct_window", 2, 2):
                check.number(v, "input.normalisation.ct_window", -2000.0, 4000.0)
    if "flip_average" in d and not isinstance(d["flip_average"], bool):
        check.fail("input.flip_average", "true or false", d["flip_average"])
    return out


def heads(d, check: Checker, tasks) -> dict:
    """The `heads` block: {task: {out_channels, labels?, ...}} with known tasks and bounded sizes."""
    d = check.mapping(d, "heads", optional=True)
    out = {}
    for task, info in d.items():
        if task not in tasks:
            check.fail("heads", f"keyed by {', '.join(tasks)}", task)
        info = dict(check.mapping(info, f"heads.{task}"))
        if "out_channels" in info:
            info["out_channels"] = check.integer(info["out_channels"], f"heads.{task}.out_channels", 1, MAX_OUT_CHANNELS)
        if info.get("labels") is not None:
            n = info.get("out_channels")
            info["labels"] = check.int_list(info["labels"], f"heads.{task}.labels", *LABEL_RANGE, MAX_LABELS, n)
        out[task] = info
    return out


def brainid_metadata(meta, source: str, newest: int, kind: str, task: str | None = None) -> dict:
    """A checked copy of a BrainID model ("model") or task-head ("head") file's metadata."""
    check = Checker(source)
    meta = dict(check.mapping(meta, "(top level)"))
    check.format_version(meta, newest)
    found = meta.get("kind")
    if found != kind:
        raise BrainIDError(f"{source} is a BrainID {clean(found, 40) or 'unknown'} file, not a {kind}"
                           + (f" (for a {task} head, pass a head file)" if kind == "head" else ""))
    for key in ("name", "description", "source", "brainid_version"):
        check.text(meta.get(key), key)
    if kind == "model":
        if "architecture" not in meta:
            check.fail("architecture", "present in a model file", None)
        architecture(meta["architecture"], check)
    else:
        if meta.get("task") != task:
            raise BrainIDError(f"{source} is not a {task} head (it says task={clean(meta.get('task'), 40)})")
    meta["heads"] = heads(meta.get("heads"), check, HEAD_TASKS)
    if kind == "model":
        missing = [t for t, info in meta["heads"].items() if "out_channels" not in info]
        if missing:
            check.fail(f"heads.{missing[0]}.out_channels", f"an integer from 1 to {MAX_OUT_CHANNELS}", None)
    if "input" in meta:
        meta["input"] = model_input(meta["input"], check)
    return meta


def fewshot_metadata(meta, source: str, newest: int) -> dict:
    """A checked copy of a few-shot head's metadata (labels, names and colours agree in length)."""
    check = Checker(source, fix="train the head again with `brainid fewshot train`")
    meta = dict(check.mapping(meta, "(top level)"))
    check.format_version(meta, newest)
    labels = check.int_list(meta.get("labels"), "labels", 1, LABEL_RANGE[1], MAX_LABELS)
    if not labels or len(set(labels)) != len(labels):
        check.fail("labels", "a non-empty list of distinct positive integers", labels)
    names = check.listing(meta.get("names"), "names", MAX_LABELS, len(labels))
    for i, n in enumerate(names):
        check.text(n, f"names[{i}]", optional=False)
    colors = check.listing(meta.get("colors"), "colors", MAX_LABELS, len(labels))
    colors = [tuple(check.int_list(c, f"colors[{i}]", 0, 255, 3, 3)) for i, c in enumerate(colors)]
    for key in ("name", "description"):
        check.text(meta.get(key), key)
    backbone = dict(check.mapping(meta.get("backbone"), "backbone", optional=True))
    for key in ("name", "sha256"):
        check.text(backbone.get(key), f"backbone.{key}")
    if "channels" in backbone:
        check.integer(backbone["channels"], "backbone.channels", 1, 4 * ARCH_BOUNDS["f_maps"][1])
    check.mapping(meta.get("training"), "training", optional=True)
    return {**meta, "labels": labels, "names": names, "colors": colors, "backbone": backbone,
            "training": meta.get("training") or {}}


def declared_shapes(path) -> tuple[dict[str, tuple], dict]:
    """({tensor name: shape}, header metadata) of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})


def finite_tensors(tensors: dict, source: str) -> None:
    """Refuse weights holding NaN or Inf: such a network silently outputs garbage (one class
    everywhere, zero volumes). One pass over the weights: 0.23 s for the official 66 M-parameter backbone
    on one busy CPU core (0.003 s for brainid-lite)."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BrainIDError(f"{source}: tensor {clean(name, 80)} holds NaN or Inf values; the weights are damaged "
                               "(corrupt download or a diverged training run): get the file again")
