"""Generation label tables: which labels share a contrast, left/right partners, segmentation mapping,
and the canonical T1-like rendering of a label map (fixed per-class intensities, WM = 1).

The default table is SynthSeg's full-head protocol (Resources/labels/synthseg_generation.json).
Labels that a table does not know still work: each gets its own generation class (shared with its
left/right partner), renders as 0 in the canonical T1 and maps to background in the 33-class
segmentation unless it is one of the 33 labels itself.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

from ..labels import LEFT_RIGHT_PAIRS, SEGMENTATION_LABELS
from ..resources import resource_path

WM_LABELS = (2, 41)
# relative T1 intensity (WM = 1) of labels that the SynthSeg table lacks but the 33-class set has
_EXTRA_T1 = {77: 0.75, 31: 0.5, 63: 0.5}


class LabelTable:
    """Facts about generation labels, turned into lookup tables (LUTs) indexed by label id.

    `classes`: {label: generation class}; labels of one class share a random intensity.
    `pairs`: left/right partners (for flips, and right labels take the class of their left partner).
    `t1`: {label: canonical T1 intensity, WM = 1}; labels not listed render as 0.
    `kind`: {label: "background"|"csf"|"wm"|"gm"|"vessel"|"extra"|"extra_dark"} for CT/FLAIR options.
    `seg_merge`: {label: label} applied before mapping to the 33-class segmentation.
    """

    def __init__(self, classes: dict[int, int], pairs=(), t1: dict[int, float] | None = None,
                 kind: dict[int, str] | None = None, seg_merge: dict[int, int] | None = None,
                 name: str = "custom", t1_prior: dict[int, tuple] | None = None):
        self.name = name
        # {label: (mean of the class mean, its spread, mean of the class std, its spread)}, 0-255 scale
        self.t1_prior = {int(k): tuple(float(x) for x in v) for k, v in (t1_prior or {}).items()}
        self.pairs = tuple(sorted({(int(a), int(b)) for a, b in list(pairs) + list(LEFT_RIGHT_PAIRS)}))
        left_of = {b: a for a, b in self.pairs}
        merged: dict[int, int] = {}
        for lab, c in classes.items():
            lab = int(lab)
            partner = left_of.get(lab)
            merged[lab] = int(classes[partner]) if partner in classes else int(c)
        if 0 not in merged:  # background always has a class of its own, class 0
            merged[0] = min(merged.values(), default=0) - 1
        # compact class ids 0..K-1, label 0's class first
        uniq = sorted(set(merged.values()), key=lambda c: (c != merged[0], c))
        remap = {c: i for i, c in enumerate(uniq)}
        self.classes = {lab: remap[c] for lab, c in merged.items()}
        self.n_classes = len(uniq)
        self.t1 = {int(k): float(v) for k, v in (t1 or {}).items()}
        self.kind = {int(k): str(v) for k, v in (kind or {}).items()}
        self.seg_merge = {int(k): int(v) for k, v in (seg_merge or {}).items()}
        self.max_known = max([0, *self.classes, *self.t1, *self.seg_merge, *(b for _, b in self.pairs)])
        self._cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LabelTable":
        """A JSON file with "labels", "generation_classes" and optionally "contrast_classes" +
        "t1_prior_means", "left_right_pairs", "kind", "segmentation_merge", or a simple
        {"classes": {label: class}} mapping."""
        d = json.loads(open(path).read())
        if "classes" in d:
            classes = {int(k): int(v) for k, v in d["classes"].items()}
            t1 = d.get("t1", {})
        else:
            labels = [int(v) for v in d["labels"]]
            classes = dict(zip(labels, [int(v) for v in d["generation_classes"]]))
            t1 = {}
            prior = {}
            if "contrast_classes" in d and "t1_prior_means" in d:
                means = d["t1_prior_means"][0]
                ccls = d["contrast_classes"]
                if "t1_prior_stds" in d:
                    pm, ps = d["t1_prior_means"], d["t1_prior_stds"]
                    prior = {lab: (pm[0][c], pm[1][c], ps[0][c], ps[1][c]) for lab, c in zip(labels, ccls)}
                wm = means[ccls[labels.index(2)]] if 2 in labels else max(means)
                kinds = d.get("kind", {})
                for lab, c in zip(labels, ccls):
                    if lab == 0 or str(kinds.get(str(lab), "")).startswith("extra"):
                        continue
                    t1[lab] = means[c] / wm
            for lab, v in _EXTRA_T1.items():
                t1.setdefault(lab, v)
            return cls(classes, d.get("left_right_pairs", ()), t1, d.get("kind"), d.get("segmentation_merge"),
                       name=os.path.basename(str(path)), t1_prior=prior)
        return cls(classes, d.get("left_right_pairs", ()), t1, d.get("kind"), d.get("segmentation_merge"),
                   name=os.path.basename(str(path)))

    @classmethod
    def from_mapping(cls, classes: dict[int, int], **kw) -> "LabelTable":
        return cls(classes, **kw)

    # ------------------------------------------------------------------ lookups
    def swap_lut(self, max_label: int, device) -> torch.Tensor:
        lut = torch.arange(max_label + 1, dtype=torch.long)
        for a, b in self.pairs:
            if a <= max_label and b <= max_label:
                lut[a], lut[b] = b, a
        return lut.to(device)

    def luts(self, max_label: int, device) -> dict[str, torch.Tensor]:
        """LUTs over ids 0..max_label: class (generation class; unknown labels get their own class,
        shared with their left partner), seg (index into SEGMENTATION_LABELS), t1 (canonical
        intensity), kind_code (see KIND_CODES)."""
        # one LUT size for every map of a protocol: no rebuild when a crop lacks the largest label
        max_label = max(int(max_label), self.max_known)
        key = (max_label, str(device))
        if key in self._cache:
            return self._cache[key]
        n = max_label + 1
        left_of = {b: a for a, b in self.pairs}
        seg_index = {lab: i for i, lab in enumerate(SEGMENTATION_LABELS)}
        cls_l, seg_l, t1_l, kind_l = [], [], [], []
        for lab in range(n):
            src = lab if lab in self.classes or left_of.get(lab) is None else left_of[lab]
            cls_l.append(self.classes[src] if src in self.classes else self.n_classes + src)
            seg_l.append(seg_index.get(self.seg_merge.get(lab, lab), 0))
            t1_l.append(self.t1.get(lab, 0.0))
            kind_l.append(KIND_CODES.get(self.kind.get(lab, _default_kind(lab)), KIND_CODES["gm"]))
        n_classes = max(cls_l) + 1
        kinds = [KIND_CODES["gm"]] * n_classes
        prior = [[float("nan")] * 4 for _ in range(n_classes)]
        for lab in range(n - 1, -1, -1):  # the smallest label of a class sets its kind and prior
            kinds[cls_l[lab]] = kind_l[lab]
            if lab in self.t1_prior:
                prior[cls_l[lab]] = list(self.t1_prior[lab])
        out = {
            "class": torch.tensor(cls_l, dtype=torch.long, device=device),
            "seg": torch.tensor(seg_l, dtype=torch.long, device=device),
            "t1": torch.tensor(t1_l, dtype=torch.float32, device=device),
            "kind": torch.tensor(kind_l, dtype=torch.long, device=device),
            "n_classes": n_classes,
            "class_kinds": torch.tensor(kinds, dtype=torch.long),
            "class_t1_prior": torch.tensor(prior, dtype=torch.float32),  # (K, 4), NaN = no prior
            "swap": self.swap_lut(max_label, device),
            # brain = one of the 33 classes except background and extra-cerebral CSF (crop centring)
            "brain": torch.tensor([i not in (0, SEGMENTATION_LABELS.index(24)) for i in seg_l], device=device),
        }
        self._cache[key] = out
        return out

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        return d


KIND_CODES = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "vessel": 4, "extra": 5, "extra_dark": 6}


def _default_kind(lab: int) -> str:
    if lab == 0:
        return "background"
    if lab in (4, 5, 14, 15, 24, 43, 44, 72, 31, 63):
        return "csf"
    if lab in (2, 7, 16, 28, 41, 46, 60, 77, 85):
        return "wm"
    return "gm"


@lru_cache(maxsize=None)
def default_table() -> LabelTable:
    """SynthSeg full-head protocol (54 generation labels), right merged onto left for contrast."""
    return LabelTable.from_json(resource_path("labels", "synthseg_generation.json"))


def get_table(table) -> LabelTable:
    if table is None or table == "synthseg":
        return default_table()
    if isinstance(table, LabelTable):
        return table
    if isinstance(table, dict):
        return LabelTable({int(k): int(v) for k, v in table.items()})
    return LabelTable.from_json(table)


def render_t1(labels: torch.Tensor, table: LabelTable | None = None) -> torch.Tensor:
    """Canonical T1-like image of a label map (fixed per-class intensities, WM = 1, non-brain 0)."""
    table = get_table(table)
    lab = labels.long().clamp_min(0)
    luts = table.luts(int(lab.max()), lab.device)
    return luts["t1"][lab]


def to_segmentation(labels: torch.Tensor, table: LabelTable | None = None) -> torch.Tensor:
    """FreeSurfer ids -> indices 0..32 into SEGMENTATION_LABELS (merges per the table, others 0)."""
    table = get_table(table)
    lab = labels.long().clamp_min(0)
    luts = table.luts(int(lab.max()), lab.device)
    return luts["seg"][lab]
