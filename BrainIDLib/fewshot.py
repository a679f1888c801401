"""Few-shot segmentation: a 1x1x1 head (one linear layer) on frozen Brain-ID features, trained in
seconds on a few painted voxels, that segments the same structures on scans of any contrast.

    from BrainIDLib.fewshot import train_head, segment, FewShotHead
    head = train_head(["t1.nii.gz"], ["t1_painted.nii.gz"], names={1: "Hippocampus"}, model="brainid-lite")
    head.save("hippocampus.safetensors")
    seg = segment("flair.nii.gz", FewShotHead.load("hippocampus.safetensors"), model="brainid-lite")

Annotations (paintings): an integer label image, on the annotated scan's grid (any grid that
overlaps the scan works: every painted voxel's centre is looked up in the features by its RAS
position). 0 = not painted; k > 0 = segment k.

Negatives (what the head learns as "none of these"):
- a label named "background" (case-insensitive; `names={5: "background"}`), when there is one:
  exactly the voxels painted with it, nothing else. Most precise; use it when you paint sparsely.
- otherwise, the voxels left unpainted in the *annotated slices*: along the axis in which the
  paint touches the fewest slices (the plane you painted in), every slice holding paint counts as
  annotated, and its unpainted voxels are negatives. So paint each structure completely in each
  slice you touch (the usual convention of slice-wise painting tools); a structure painted in all
  its slices (a full 3D label) yields every other voxel of its slab as negatives. Unpainted
  voxels of other slices are never used: they are unknown, not background.
Classes are balanced (cross-entropy weighted by inverse voxel counts), at most
`max_voxels_per_class` voxels per class are used (a random, seeded subset); the head's weights
carry an L2 penalty (`WEIGHT_DECAY`), which makes it generalise across contrasts.

Applying a head labels the scan's empty padding (voxels at its minimum value filling >= 5% of
it, as around a skull-stripped scan) "none", as predict() does: features there say nothing about
anatomy, and a head trained on a T1 readily labels the dark padding of a T2 as a dark structure.

The head file is a small safetensors file (weights + bias, a few hundred numbers) with JSON
metadata: name, description, labels, names, colours, training figures and the backbone's name,
architecture and SHA-256 fingerprint (of its tensors, see `feature_maps.model_fingerprint`); a
head is refused, with a clear message, on a backbone with another fingerprint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .feature_maps import FeatureCache, FeatureMap, backbone_sha256, compute_feature_map, sample_grid
from .errors import BrainIDError
from .loader import resolve
from .progress import Progress, Span
from .volume import Volume, argmax_of_resampled, make_nifti

HEAD_FORMAT = "brainid-fewshot-head"
HEAD_FORMAT_VERSION = 1
DEFAULT_STEPS = 300
MAX_VOXELS_PER_CLASS = 20000
# L2 penalty of the head (Adam weight_decay). A head fitted with little penalty (1e-4 before) leans on
# feature directions that separate the painted scan's classes but shift with the contrast; 3e-3 keeps
# it on the broad, contrast-agnostic ones. WM Dice across contrast (benchmarks/fewshot.py --quality,
# brainid-lite, 6 paint choices): mean 0.741 -> 0.808 (worst 0.709 -> 0.778); on two further pairs
# (another T2-like gamma and move, a same-polarity gamma) 0.733 -> 0.819 and 0.786 -> 0.814, while
# the painted scan's own Dice drops ~0.01. 1e-3..1e-2 do about as well; 3e-2 and up underfit.
WEIGHT_DECAY = 3e-3
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]


@dataclass
class FewShotHead:
    """Linear classifier on unit Brain-ID features: class 0 is "none", class i (1..K) is labels[i-1]."""

    weight: torch.Tensor  # (K + 1, C) float32
    bias: torch.Tensor  # (K + 1,)
    labels: list[int]
    names: list[str]
    colors: list[tuple[int, int, int]]
    name: str = "fewshot"
    description: str = ""
    backbone: dict = field(default_factory=dict)  # {"name", "sha256", "architecture", "channels"}
    training: dict = field(default_factory=dict)  # voxels per class, steps, seconds, accuracy, images

    def __post_init__(self):
        k = len(self.labels)
        if self.weight.dim() != 2 or self.weight.shape[0] != k + 1 or tuple(self.bias.shape) != (k + 1,):
            raise BrainIDError(f"few-shot head {self.name}: weights of shape {tuple(self.weight.shape)} do not fit "
                               f"{k} labels (+ none)")
        if len(self.names) != k or len(self.colors) != k:
            raise BrainIDError(f"few-shot head {self.name}: {k} labels but {len(self.names)} names and "
                               f"{len(self.colors)} colours")
        self.labels = [int(v) for v in self.labels]
        self.colors = [tuple(int(c) for c in rgb) for rgb in self.colors]

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def metadata(self) -> dict:
        from . import __version__

        return {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "brainid_version": __version__,
                "name": self.name, "description": self.description, "labels": self.labels, "names": self.names,
                "colors": [list(c) for c in self.colors], "backbone": self.backbone, "training": self.training}

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(K+1, *spatial) logits of (C, *spatial) features."""
        c = feats.shape[0]
        flat = feats.reshape(c, -1)
        out = torch.empty(self.weight.shape[0], flat.shape[1], dtype=torch.float32)
        step = 1 << 20
        for s in range(0, flat.shape[1], step):
            out[:, s : s + step] = self.weight @ flat[:, s : s + step].float() + self.bias[:, None]
        return out.reshape((-1,) + tuple(feats.shape[1:]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head as safetensors (weight, bias) + JSON metadata, atomically."""
        from safetensors.torch import save_file

        from .files import atomic_write

        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()}
        meta = {"brainid": json.dumps(self.metadata)}
        return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FewShotHead":
        """A head file, its metadata schema-checked and its tensors' declared shapes checked before they
        are read (see `validate`), and their values checked finite."""
        from safetensors.torch import load_file

        from .validate import clean, declared_shapes, fewshot_metadata, finite_tensors

        path = Path(path).expanduser()
        if not path.is_file():
            raise BrainIDError(f"few-shot head file not found: {path}")
        try:
            shapes, header = declared_shapes(path)
            meta = json.loads(header["brainid"])
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
            raise BrainIDError(f"{path.name} is not a BrainID few-shot head file ({type(e).__name__}); "
                               "train one with `brainid fewshot train`") from None
        if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
            kind = meta.get("kind", meta.get("format", "unknown")) if isinstance(meta, dict) else "unknown"
            raise BrainIDError(f"{path.name} is a BrainID {clean(kind, 40)} file, not a few-shot head; task heads go "
                               "to `brainid predict --head TASK=FILE`")
        meta = fewshot_metadata(meta, path.name, HEAD_FORMAT_VERSION)
        k = len(meta["labels"]) + 1
        weight, bias = shapes.get("weight"), shapes.get("bias")
        if weight is None or bias is None or len(weight) != 2 or weight[0] != k or not 1 <= weight[1] <= 4096 \
                or bias != (k,):
            raise BrainIDError(f"{path.name}: tensors weight {weight} and bias {bias} do not fit {k - 1} labels "
                               f"(+ none); train the head again with `brainid fewshot train`")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise BrainIDError(f"{path.name} is a damaged few-shot head file ({type(e).__name__}); train it again") from None
        finite_tensors(tensors, path.name)
        return cls(tensors["weight"].float(), tensors["bias"].float(), meta["labels"], meta["names"], meta["colors"],
                   meta.get("name") or path.stem, meta.get("description") or "", meta["backbone"], meta["training"])

    def check_backbone(self, model) -> None:
        """Refuse a backbone other than the one the head was trained on."""
        want = self.backbone.get("sha256")
        if model.arch.f_maps != self.channels:
            raise BrainIDError(
                f"few-shot head {self.name!r} was trained on {self.backbone.get('name', 'another model')} "
                f"({self.channels} feature channels); this model has {model.arch.f_maps}: use "
                f"--model {self.backbone.get('name', 'NAME')} or train the head again on this model")
        if want and want != backbone_sha256(model):
            name = (getattr(model, "metadata", None) or {}).get("name", "this model")
            raise BrainIDError(
                f"few-shot head {self.name!r} was trained on backbone {self.backbone.get('name', '?')} "
                f"(sha256 {want[:12]}...), not on {name} (sha256 {backbone_sha256(model)[:12]}...); its features "
                "differ, so the head would be wrong: use the same model, or train the head again on this one")

    def summary(self) -> str:
        parts = [f"{v}={n}" for v, n in zip(self.labels, self.names)]
        return f"{self.name}: {', '.join(parts)} (backbone {self.backbone.get('name', '?')})"


# ---------------------------------------------------------------------------------- annotations
def _load_labels(source) -> tuple[np.ndarray, np.ndarray, str]:
    """(int32 array, affine, name) of a label image: path, nibabel image or Volume."""
    import nibabel as nib

    if isinstance(source, Volume):
        return np.rint(source.array).astype(np.int32), source.affine, source.name
    name = "annotation"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise BrainIDError(f"annotation not found: {path}")
        name = path.name
        try:
            source = nib.load(str(path))
        except Exception as e:  # noqa: BLE001
            raise BrainIDError(f"{name} is not a readable NIfTI label image ({type(e).__name__})") from None
    if not hasattr(source, "dataobj"):
        raise BrainIDError(f"cannot read an annotation from a {type(source).__name__}; give a NIfTI label image")
    data = np.asarray(source.dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != 3:
        raise BrainIDError(f"{name}: an annotation must be a 3D label image, got shape {data.shape}")
    return np.rint(np.nan_to_num(data)).astype(np.int32), np.asarray(source.affine, dtype=np.float64), name


def _parse_names(names, labels: list[int]) -> dict[int, str]:
    if names is None:
        return {}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    names = list(names)
    if len(names) != len(labels):
        raise BrainIDError(f"{len(names)} names for {len(labels)} painted labels ({labels}); give one name per label "
                           "or a {label: name} mapping")
    return {v: str(n) for v, n in zip(labels, names)}


def negative_mask(lab: np.ndarray) -> np.ndarray:
    """Unpainted voxels in the annotated slices (see the module docs)."""
    painted = lab > 0
    counts = [int(painted.any(axis=tuple(a for a in range(3) if a != ax)).sum()) for ax in range(3)]
    axis = int(np.argmin(counts))
    slices = painted.any(axis=tuple(a for a in range(3) if a != axis))
    shape = [1, 1, 1]
    shape[axis] = -1
    return slices.reshape(shape) & ~painted


def _voxel_ras(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _training_voxels(fm: FeatureMap, lab: np.ndarray, lab_affine: np.ndarray, classes: list[int],
                     background: int | None, cap: int, rng: np.random.Generator, what: str):
    """(features (N, C), class index (N,)) for one annotated scan; class 0 = negatives."""
    xs, ys, counts = [], [], {}
    neg = (lab == background) if background is not None else negative_mask(lab)
    groups = [(0, neg)] + [(i + 1, lab == v) for i, v in enumerate(classes)]
    inv = np.linalg.inv(fm.source_affine)
    for cls, mask in groups:
        ijk = np.argwhere(mask)
        if len(ijk) > cap:
            ijk = ijk[rng.choice(len(ijk), cap, replace=False)]
        if len(ijk) == 0:
            counts[cls] = 0
            continue
        ras = _voxel_ras(ijk.astype(np.float64), lab_affine)
        # keep voxels inside the scan (an annotation may be on a larger grid)
        src = ras @ inv[:3, :3].T + inv[:3, 3]
        inside = np.all((src >= -0.5) & (src <= np.array(fm.source_shape) - 0.5), axis=1)
        ras = ras[inside]
        counts[cls] = len(ras)
        if len(ras):
            f = sample_grid(fm.features, fm.affine, ras).T
            xs.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-8))
            ys.append(torch.full((len(ras),), cls, dtype=torch.long))
    if not xs:
        raise BrainIDError(f"{what}: no painted voxel lies inside its scan; is the annotation on this scan's grid?")
    return torch.cat(xs), torch.cat(ys), counts


def train_head(images, annotations, names=None, colors=None, model=None, device="auto",
               cache: FeatureCache | None = None, steps: int = DEFAULT_STEPS, progress: Callable | None = None,
               cancel: Callable | None = None, name: str | None = None, description: str = "",
               max_voxels_per_class: int = MAX_VOXELS_PER_CLASS, weight_decay: float = WEIGHT_DECAY, lr: float = 0.05,
               seed: int = 0) -> FewShotHead:
    """Train a few-shot head on painted voxels of one or more scans (see the module docs).

    images / annotations: equal-length lists (or single items) of paths, nibabel images or Volumes
    (images may also be FeatureMaps). names: {label: name} or a list in label order; a label named
    "background" gives explicit negatives. colors: {label: (r, g, b)} or a list. Returns the head.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    annotations = list(annotations) if isinstance(annotations, (list, tuple)) else [annotations]
    if not images:
        raise BrainIDError("no image given: train a head on at least one painted scan")
    if len(images) != len(annotations):
        raise BrainIDError(f"{len(images)} images but {len(annotations)} annotations; give one annotation per image")
    if steps < 1:
        raise BrainIDError("steps must be at least 1")
    prog = Progress(progress, cancel)
    t0 = time.perf_counter()
    model = resolve(model).model if not all(isinstance(i, FeatureMap) for i in images) or model is not None else None
    labs = [_load_labels(a) for a in annotations]
    painted = sorted({int(v) for lab, _, _ in labs for v in np.unique(lab) if v > 0})
    if not painted:
        raise BrainIDError("the annotations hold no painted voxel (every value is 0); paint at least one structure")
    name_map = _parse_names(names, painted)
    background = [v for v in painted if name_map.get(v, "").strip().lower() == "background"]
    classes = [v for v in painted if v not in background]
    if not classes:
        raise BrainIDError("only 'background' is painted; paint at least one structure to segment")
    bg = background[0] if background else None
    if bg is not None:  # several background values: merge into the first
        labs = [(np.where(np.isin(lab, background), bg, lab), aff, nm) for lab, aff, nm in labs]
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    totals: dict[int, int] = {}
    n = len(images)
    feature_seconds = 0.0
    channels = None
    for i, (img, (lab, aff, nm)) in enumerate(zip(images, labs)):
        ts = time.perf_counter()
        fm = img if isinstance(img, FeatureMap) else compute_feature_map(
            img, model=model, device=device, cache=cache, progress=Span(prog, i / n * 0.8, (i + 0.9) / n * 0.8), cancel=cancel)
        feature_seconds += time.perf_counter() - ts
        if channels is not None and fm.channels != channels:
            raise BrainIDError("the images' features come from different models; use one model for all")
        channels = fm.channels
        x, y, counts = _training_voxels(fm, lab, aff, classes, bg, max_voxels_per_class, rng, nm)
        xs.append(x)
        ys.append(y)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    x, y = torch.cat(xs), torch.cat(ys)
    missing = [classes[k - 1] for k in range(1, len(classes) + 1) if totals.get(k, 0) == 0]
    if missing:
        raise BrainIDError(f"label(s) {missing} have no painted voxel inside their scans")
    if totals.get(0, 0) == 0:
        raise BrainIDError("no negative voxels: paint a 'background' label, or paint in slices that also hold "
                           "unpainted voxels")
    prog(0.8, f"fitting the head on {len(y)} voxels")
    tf = time.perf_counter()
    weight, bias, acc = _fit_linear(x, y, len(classes) + 1, steps, lr, weight_decay, seed, prog)
    fit_seconds = time.perf_counter() - tf
    names_out = [name_map.get(v, f"Segment_{v}") for v in classes]
    cmap = colors if isinstance(colors, dict) else ({v: c for v, c in zip(classes, colors)} if colors else {})
    colors_out = [tuple(cmap.get(v, PALETTE[i % len(PALETTE)])) for i, v in enumerate(classes)]
    backbone = {}
    if model is not None:
        backbone = {"name": str(model.metadata.get("name") or "unnamed"), "sha256": backbone_sha256(model),
                    "architecture": model.arch.to_dict(), "channels": int(model.arch.f_maps),
                    "input": model.metadata.get("input")}
    else:
        fm0 = images[0]
        backbone = {"name": fm0.model_name, "sha256": None, "channels": fm0.channels}
    training = {"images": len(images), "voxels": {("none" if k == 0 else str(classes[k - 1])): int(v) for k, v in sorted(totals.items())},
                "negatives": "background label" if bg is not None else "unpainted voxels in annotated slices",
                "steps": int(steps), "train_accuracy": round(acc, 4), "fit_seconds": round(fit_seconds, 3),
                "feature_seconds": round(feature_seconds, 3), "total_seconds": round(time.perf_counter() - t0, 3),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head = FewShotHead(weight, bias, classes, names_out, colors_out, name or "_".join(names_out)[:60] or "fewshot",
                       description, backbone, training)
    prog(1.0, "head trained")
    return head


def _fit_linear(x: torch.Tensor, y: torch.Tensor, k: int, steps: int, lr: float, weight_decay: float, seed: int,
                prog) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Class-balanced multinomial logistic regression, full batch (Adam)."""
    g = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    lin = torch.nn.Linear(c, k)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    counts = torch.bincount(y, minlength=k).float()
    cw = (counts.sum() / (k * counts.clamp_min(1)))
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: one thread is ~5x faster than two on a busy machine
    try:
        with torch.enable_grad():
            for step in range(steps):
                opt.zero_grad()
                loss = F.cross_entropy(lin(x), y, weight=cw)
                loss.backward()
                opt.step()
                if step % 50 == 0:
                    prog(0.8 + 0.2 * step / steps, f"head step {step}/{steps} loss {float(loss.detach()):.3f}")
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        pred = lin(x).argmax(1)
        acc = float(((pred == y).float() * cw[y]).sum() / cw[y].sum())  # balanced accuracy
    return lin.weight.detach().clone(), lin.bias.detach().clone(), acc


# ---------------------------------------------------------------------------------- applying
def _model_for_head(model, head: FewShotHead):
    if model is None and head.backbone.get("name"):
        try:
            return resolve(head.backbone["name"]).model
        except BrainIDError:
            pass
    return resolve(model).model


def segment(image, head: FewShotHead | str | os.PathLike, model=None, device="auto", cache: FeatureCache | None = None,
            progress: Callable | None = None, cancel: Callable | None = None, probabilities: bool = False):
    """Segment a scan with a few-shot head: an int16 label image on the input's exact grid (values
    head.labels, 0 = none). With probabilities=True, returns (labels, probabilities) where the
    second is a float32 4D image (X, Y, Z, K+1), channel 0 = none. model=None: the head's backbone
    by its registry name.

    The input's empty padding (`inference.padding_mask`: voxels at the image's minimum when they
    fill >= 5% of it, e.g. around a skull-stripped scan) is "none" (probability 1 for channel 0),
    as in predict(): the features there are not anatomy. A FeatureMap carries that mask from
    `compute_feature_map` (FeatureMap.padding); one made by hand without it gets no such rule."""
    if not isinstance(head, FewShotHead):
        head = FewShotHead.load(head)
    prog = Progress(progress, cancel)
    if isinstance(image, FeatureMap):
        fm = image
        if model is not None:
            head.check_backbone(resolve(model).model)
    else:
        model = _model_for_head(model, head)
        head.check_backbone(model)
        fm = compute_feature_map(image, model=model, device=device, cache=cache, progress=Span(prog, 0, 0.8), cancel=cancel)
    if fm.channels != head.channels:
        raise BrainIDError(f"few-shot head {head.name!r} expects {head.channels} feature channels, the features have "
                           f"{fm.channels}; use the backbone the head was trained on ({head.backbone.get('name', '?')})")
    prog(0.85, "applying the head")
    probs = torch.softmax(head.logits(fm.features), dim=0)
    prog(0.9, "mapping labels back to the input grid")
    idx = argmax_of_resampled(probs, fm.to_source_grid)
    pad = fm.source_padding()
    if pad is not None:  # the empty padding around a skull-stripped scan is "none", as in predict()
        pad = torch.from_numpy(pad)
        idx[pad] = 0
    lut = torch.tensor([0] + head.labels, dtype=torch.int16)
    seg = make_nifti(lut[idx].numpy(), fm.source_affine, np.int16)
    prog(1.0, "done")
    if probabilities:
        p = fm.to_source_grid(probs)
        if pad is not None:
            p[:, pad] = 0.0
            p[0, pad] = 1.0
        return seg, make_nifti(np.moveaxis(p.numpy(), 0, -1), fm.source_affine)
    return seg


__all__ = ["FewShotHead", "train_head", "segment", "negative_mask"]
