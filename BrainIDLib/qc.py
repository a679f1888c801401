"""Quality control without a reference: how far each segmented structure, and the whole result, can
be trusted.

A trustworthy segmentation stays the same when the scan is changed in ways that do not change the
anatomy, and has a plausible size. QC runs the network again on perturbed copies of the prepared
input: by default the left/right mirror (mapped back, left and right labels swapped); a one-voxel
shift can be added (`predict(..., qc=("flip", "shift"))`). On the first 6 held-out calibration draws
the shift pass moved Spearman(QC, Dice) from 0.73 to 0.75 for one more network pass (QC on by
default must cost under 2x the prediction), and a gamma change of the intensities, tried first, was
the weakest signal (0.28 alone). Per structure, on the model grid:

- agreement: mean Dice between the base segmentation and each perturbed one;
- confidence: mean top class probability (all passes averaged) inside the structure;
- expected Dice: the soft Dice between the averaged class probabilities and the hard structure,
  2 sum_{v in S} p(v) / (|S| + sum_v p(v)): unlike confidence it also falls when the model puts
  probability on the structure outside the voxels it labelled (an uncertain boundary or a rival
  blob elsewhere);
- volume plausibility: 1 inside the normal range of the structure's volume in training label maps
  (Resources/labels/structure_volumes.json, `benchmarks/qc_norms.py`), falling to 0 far outside it
  (scalp labelled as cortex, a structure nearly missing);
- typical Dice: how well this model segments the structure on label maps it was trained on (the
  model file's `heads.segmentation.typical_dice`, measured by `training/qc_prior.py`). Which
  structure it is explains most of how good its result is (a ventricle is easy, a vessel is not):
  on the held-out calibration draws of the step 1176 model, each structure's mean Dice on the other
  maps ranks the results with Spearman 0.81, the scan's own signals only 0.59;
- score = sqrt(typical Dice x mean(agreement, expected Dice)) x volume plausibility, in [0, 1]: the
  geometric mean of the model's record on the structure and this scan's two estimates of its Dice
  (between passes, and from the probabilities), discounted by an implausible size. Without a typical
  Dice in the model file (other models) the score is mean(agreement, expected Dice) x plausibility.
  Within one structure only the scan's signals rank the results, and they rank them weakly
  (calibration figures in the README and model card).

The whole-scan score compares scans, not structures, so it leaves the prior out (a constant of the
model that only narrows its range: on the step 1600 calibration draws it ranked the draws by mean
Dice with Spearman 0.30 with the prior, 0.44 without): the median of the structures' own scores,
mean(agreement, expected Dice) x plausibility, over the structures normally present, times the
plausibility of the total labelled volume. The uncertainty map is the per-voxel entropy of the
class probabilities averaged over all passes, divided by log(classes): 0 where every pass is sure of
the same class, 1 for a uniform guess. How these scores rank results by their true Dice, and the
flag threshold, are measured by `benchmarks/qc_calibration.py` (README, model card).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .errors import BrainIDError
from .files import atomic_write
from .labels import LEFT_RIGHT_PAIRS, label_name
from .resources import resource_path

PERTURBATIONS = ("flip",)  # the default passes (one network pass each)
KNOWN_PERTURBATIONS = ("flip", "shift")
FLAG_BELOW = 0.65  # flag structures below this: best Youden J for Dice < 0.5 in benchmarks/qc_calibration.py (brainid-lite steps 1600-3200; for steps 7013-9670 the best was 0.675, for steps 11816 and 13754 0.70, for steps 15409 and 16975 0.725, for step 23518 0.75; at 0.65 step 23518 flags with precision 0.45, recall 0.45, step 16975 0.50 / 0.52, step 15409 0.44 / 0.48)
GOOD_FROM = 0.7  # shown green from here (95% of such structures had Dice >= 0.5 there), amber down to the flag threshold, red below
VOLUME_TOLERANCE = 0.5  # |log(volume / normal range edge)| tolerated before plausibility falls
VOLUME_WIDTH = 0.5  # how fast plausibility falls beyond the tolerance (Gaussian width in log units)


@dataclass
class StructureQC:
    label: int
    name: str
    score: float  # in [0, 1]
    agreement: float  # mean Dice with the perturbed segmentations
    volume_plausibility: float
    confidence: float  # mean top class probability (all passes averaged) inside the structure
    expected_dice: float  # Dice the averaged probabilities expect against the hard labels (soft Dice)
    volume_ml: float  # on the model grid
    flagged: bool
    by_perturbation: dict = field(default_factory=dict)  # perturbation -> Dice with the base
    typical_dice: float | None = None  # the model's mean Dice for this structure on its training maps
    # nothing labelled and not flagged (training maps may lack it too, e.g. WM hypointensities): front
    # ends say "absent" rather than show its high score, as there is no segmentation to trust
    absent: bool = False


@dataclass
class QCReport:
    """Per-structure scores (FreeSurfer ids, background excluded) and the whole-scan score."""

    structures: list[StructureQC]
    scan_score: float
    total_volume_ml: float
    threshold: float = FLAG_BELOW
    perturbations: tuple = PERTURBATIONS
    notes: list = field(default_factory=list)

    def by_label(self) -> dict[int, StructureQC]:
        return {s.label: s for s in self.structures}

    def flagged(self) -> list[StructureQC]:
        return [s for s in self.structures if s.flagged]

    def to_dict(self) -> dict:
        return {"scan_score": round(self.scan_score, 4), "threshold": self.threshold, "good_from": GOOD_FROM,
                "total_volume_ml": round(self.total_volume_ml, 2), "perturbations": list(self.perturbations),
                "flagged": [s.name for s in self.flagged()], "notes": list(self.notes),
                "structures": [_rounded(asdict(s)) for s in self.structures]}


def _rounded(value):
    """Floats to 4 decimals, through nested dicts (JSON stays short and diff-friendly)."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def write_json(report: QCReport, path: str | os.PathLike) -> Path:
    """The report as JSON (`QCReport.to_dict`), written atomically."""
    text = json.dumps(report.to_dict(), indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------ perturbations
def mirror_index(labels) -> torch.Tensor:
    """Class index -> the index of its left/right partner (itself when it has none)."""
    labels = [int(v) for v in labels]
    where = {lab: i for i, lab in enumerate(labels)}
    out = list(range(len(labels)))
    for a, b in LEFT_RIGHT_PAIRS:
        if a in where and b in where:
            out[where[a]], out[where[b]] = where[b], where[a]
    return torch.tensor(out)


def check_perturbations(kinds) -> tuple:
    """`kinds` as a tuple of known perturbations (True: the default ones); BrainIDError otherwise."""
    kinds = PERTURBATIONS if kinds is True else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KNOWN_PERTURBATIONS]
    if unknown or not kinds:
        raise BrainIDError(f"unknown QC perturbation {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"choose from {', '.join(KNOWN_PERTURBATIONS)}")
    return kinds


def perturb(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A perturbed copy of the (1, 1, X, Y, Z) network input (RAS axes, values in [0, 1])."""
    if kind == "flip":
        return x.flip(2)
    if kind == "shift":
        return x.roll((1, 1, 1), dims=(2, 3, 4))
    check_perturbations([kind])


def restore(probs: torch.Tensor, kind: str, mirror: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) probabilities of a perturbed input back on the base input's voxels and classes."""
    if kind == "flip":
        return probs.flip(1)[mirror]
    return probs.roll((-1, -1, -1), dims=(1, 2, 3))  # shift


# ------------------------------------------------------------------------------ scoring
@lru_cache(maxsize=1)
def volume_norms() -> dict:
    return json.loads(resource_path("labels", "structure_volumes.json").read_text(encoding="utf-8"))


def plausibility(volume_ml: float, low_ml: float, high_ml: float) -> float:
    """1 inside [low, high] widened by VOLUME_TOLERANCE (log units), a Gaussian fall-off beyond."""
    if high_ml <= 0:  # never present in the training maps: nothing to compare with
        return 1.0
    v = max(volume_ml, 1e-3)
    excess = max(0.0, math.log(max(low_ml, 1e-3) / v), math.log(v / high_ml)) - VOLUME_TOLERANCE
    return math.exp(-0.5 * (max(0.0, excess) / VOLUME_WIDTH) ** 2)


def _dice_per_class(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Dice of every class between two index maps, from one confusion count (NaN where absent in both)."""
    conf = torch.bincount((a.reshape(-1) * n + b.reshape(-1)), minlength=n * n).reshape(n, n).double()
    both = conf.sum(1) + conf.sum(0)
    return torch.where(both > 0, 2 * conf.diagonal() / both.clamp_min(1), torch.full_like(both, float("nan")))


def assess(x: torch.Tensor, probs: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], labels,
           voxel_ml: float, crop: Callable = lambda t: t, keep: torch.Tensor | None = None,
           kinds=PERTURBATIONS, typical_dice: dict | None = None) -> tuple[QCReport, torch.Tensor]:
    """(QC report, uncertainty map on the cropped grid) for one segmentation.

    x: (1, 1, *padded) network input; probs: (C, *padded) its class probabilities; run(x') -> (C,
    *padded) probabilities of another input; crop: padded -> model grid; keep: voxels of the model
    grid that may hold a structure (None: all; elsewhere background, as predict() sets the padding);
    typical_dice: label -> the model's typical Dice (`typical_dice_of(model)`), None when unknown.
    """
    labels = [int(v) for v in labels]
    n = len(labels)
    bg = labels.index(0) if 0 in labels else None
    mirror = mirror_index(labels)

    def indices(p):
        idx = p.argmax(0)
        if keep is not None and bg is not None:
            idx[~keep] = bg
        return idx

    mean = crop(probs).float().clone()
    base = indices(mean)
    agreements = []
    for kind in kinds:
        p = crop(restore(run(perturb(x, kind)), kind, mirror)).float()
        mean.add_(p)
        agreements.append(_dice_per_class(base, indices(p), n))
        del p
    mean.div_(len(kinds) + 1)
    top = mean.amax(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(0) / math.log(n)
    if keep is not None:
        entropy[~keep] = 0
    counts = torch.bincount(base.reshape(-1), minlength=n).double()
    conf = torch.bincount(base.reshape(-1), weights=top.reshape(-1).double(), minlength=n) / counts.clamp_min(1)
    inside = torch.bincount(base.reshape(-1), weights=mean.gather(0, base[None]).reshape(-1).double(), minlength=n)
    mass = mean.reshape(n, -1).double().sum(1)
    expected = 2 * inside / (counts + mass).clamp_min(1e-12)
    conf[counts == 0] = 1.0  # no voxels to doubt: the volume decides whether absence is right
    expected[counts == 0] = 1.0
    by_kind = {k: a.tolist() for k, a in zip(kinds, agreements)}
    report = score(labels, by_kind, (counts * voxel_ml).tolist(), conf.tolist(), expected.tolist(), typical_dice)
    return report, entropy.clamp_(0, 1)


def typical_dice_of(model) -> dict[int, float] | None:
    """label -> typical Dice from the model file's metadata (`training/qc_prior.py`), None if absent."""
    seg = (getattr(model, "metadata", None) or {}).get("heads", {}).get("segmentation", {})
    table = seg.get("typical_dice")
    if not isinstance(table, dict) or not table:
        return None
    try:
        return {int(k): min(1.0, max(0.0, float(v))) for k, v in table.items()}
    except (TypeError, ValueError):
        raise BrainIDError("the model file's heads.segmentation.typical_dice is not a table of label -> Dice; "
                           "re-export the model (training/export_brainid_lite.py)") from None


def structure_score(agreement: float, expected_dice: float, plausibility: float, typical: float | None) -> float:
    """One structure's QC score (see the module's docstring)."""
    own = 0.5 * (agreement + expected_dice)
    return (own if typical is None else math.sqrt(typical * own)) * plausibility


def score(labels, by_kind: dict, volume_ml, confidence, expected_dice, typical_dice: dict | None = None) -> QCReport:
    """Combine per-class measures (class order; by_kind: perturbation -> per-class Dice with the base)
    into structure and whole-scan scores."""
    norms = volume_norms()["structures"]
    typical_dice = typical_dice or {}
    rows, usual = [], []
    for i, lab in enumerate(labels):
        if lab == 0:
            continue
        norm = norms.get(str(lab))
        vol = float(volume_ml[i])
        plaus = plausibility(vol, norm["min_ml"], norm["max_ml"]) if norm else 1.0
        # absent from a pass and the base: they agree (the volume decides whether absence is right)
        dice = {k: (1.0 if math.isnan(a[i]) else float(a[i])) for k, a in by_kind.items()}
        agree = sum(dice.values()) / len(dice) if dice else 1.0
        typical = typical_dice.get(lab)
        own = structure_score(agree, float(expected_dice[i]), plaus, None)  # the scan's part alone
        s = own if typical is None else structure_score(agree, float(expected_dice[i]), plaus, typical)
        rows.append(StructureQC(lab, label_name(lab), s, agree, plaus, float(confidence[i]),
                                float(expected_dice[i]), vol, s < FLAG_BELOW, dice, typical,
                                absent=vol == 0 and s >= FLAG_BELOW))
        if norm and norm["median_ml"] > 0:
            usual.append(own)  # the whole-scan score compares scans: no model constant in it
    total = float(sum(v for lab, v in zip(labels, volume_ml) if lab != 0))
    tn = volume_norms()["total"]
    scan = (statistics.median(usual) if usual else 0.0) * plausibility(total, tn["min_ml"], tn["max_ml"])
    return QCReport(rows, scan, total, perturbations=tuple(by_kind))
