"""SubjectGenerator: one "subject draw" = N synthetic images of one anatomy sharing one spatial
transform, plus aligned targets (deformed T1 or canonical T1 render, 33-class segmentation, bias
fields, clean images).

    gen = SubjectGenerator(preset="brainid", size=(128, 128, 128), device="cpu")
    draw = gen(labels, t1=None, seed=0)

Severity s in [0, 1] interpolates every (mild, severe) range of the preset linearly: a range
(lo_m, hi_m) -> (lo_s, hi_s) becomes (lerp(lo_m, lo_s, s), lerp(hi_m, hi_s, s)), then a value is
drawn uniformly. The official mix is 2 samples at s=0 and 2 at s=1; schedule="curriculum" makes the
share and the strength of severe samples grow with the training step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..errors import BrainIDError
from ..normalize import ROBUST, apply_range, normalise_tensor
from . import contrast as C
from . import corruption as X
from . import spatial as S
from .filters import lookup
from .tables import KIND_CODES, LabelTable, get_table
from .targets import anatomy_target

# (mild, severe) pairs are interpolated by severity; scalars are shared.
PRESETS: dict[str, dict] = {
    "brainid": {
        # spatial (shared by all samples)
        "rotation": 15.0, "shear": 0.2, "scale": (0.8, 1.2),
        "nonlin_points": (4, 8), "nonlin_std_max": 4.0, "flip_prob": 0.5,
        # contrast
        "mean_range": (25.0, 225.0), "std_range": (5.0, 25.0), "bg_zero_prob": 0.5,
        "gamma_std": (0.01, 0.1),
        # corruption: (mild range, severe range)
        "bias_std": ((0.0, 0.02), (0.1, 0.6)),
        "bias_scale": ((0.01, 0.02), (0.02, 0.04)),
        "noise_std": ((0.0, 0.02), (5.0, 15.0)),
        "resolution_probs": ((0.25, 0.25, 0.25, 0.25), (0.25, 0.25, 0.25, 0.25)),
        "blur_factor": (0.85, 1.15),
        # options beyond the official generator (off here)
        "ct_prob": 0.0, "flair_prob": 0.0, "t1_prob": 0.0, "t2_prob": 0.0,
        "motion_prob": (0.0, 0.0), "motion_strength": ((0.0, 0.0), (0.0, 0.0)),
        "pv_prob": 0.0, "pv_sigma": (0.0, 0.0),
        # whole-head options (off here, as the official generator): crop centre uniform in the head's
        # box instead of near the brain's centre; extra-cerebral labels rendered as background
        # (a skull-stripped sample) with this probability per sample
        "head_centre_prob": 0.0, "skull_strip_prob": 0.0,
        # "max": divide each sample by its maximum (official); "robust": BrainIDLib.normalize, the
        # function inference applies to real scans
        "normalisation": "max",
        # sample mix
        "n_mild": 2, "n_severe": 2,
    },
}
PRESETS["brainid-extended"] = dict(
    PRESETS["brainid"], ct_prob=0.1, flair_prob=0.1, t1_prob=0.1, t2_prob=0.1, motion_prob=(0.0, 0.3),
    motion_strength=((0.0, 0.05), (0.05, 0.25)), pv_prob=0.5, pv_sigma=(0.3, 1.0))
# data for downstream heads: mild corruption only (the official adaptation recipe) with the full
# resolution mix
PRESETS["mild"] = dict(PRESETS["brainid"], n_mild=4, n_severe=0)


def _lerp(a: float, b: float, s: float) -> float:
    return a + (b - a) * s


def _range_at(pair, s: float) -> tuple[float, float]:
    (lo0, hi0), (lo1, hi1) = pair
    return _lerp(lo0, lo1, s), _lerp(hi0, hi1, s)


def _to_tensor(x, device, dtype=None) -> torch.Tensor:
    if hasattr(x, "dataobj"):  # nibabel image: RAS-like axis order, so that axis 0 is left/right
        import nibabel as nib

        x = np.asarray(nib.as_closest_canonical(x).dataobj)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise BrainIDError("labels/t1 must be a torch tensor, a numpy array or a nibabel image")
    x = x.to(device)
    if dtype is not None:
        x = x.to(dtype)
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise BrainIDError(f"expected a 3D volume, got shape {tuple(x.shape)}")
    return x


class SubjectGenerator:
    """Synthetic subject draws from a label map. See the module docstring.

    preset: "brainid" (official steps and ranges), "brainid-extended" (+ CT-like / FLAIR-like /
    T1-like (SynthSeg T1 priors) / T2-like contrast, motion/ghosting, partial-volume blur), "mild" (4 mild samples); keyword overrides
    replace single preset entries. schedule: "fixed" (n_mild at severity 0, n_severe at 1) or
    "curriculum" (pass step=... to each call). label_table: None/"synthseg", a LabelTable, a JSON
    path or a {label: class} dict. lr_axis: the left/right axis of the label maps (0 for RAS/LAS).
    """

    def __init__(self, preset: str = "brainid", size=(128, 128, 128), device="cpu", schedule: str = "fixed",
                 curriculum_steps: int = 100_000, curriculum_start: tuple[float, float] = (0.0, 0.25),
                 label_table=None, lr_axis: int = 0, **overrides):
        if preset not in PRESETS:
            raise BrainIDError(f"unknown generator preset {preset!r}; use one of {', '.join(PRESETS)}")
        unknown = set(overrides) - set(PRESETS[preset])
        if unknown:
            raise BrainIDError(f"unknown generator option(s) {sorted(unknown)}; known: {sorted(PRESETS[preset])}")
        if overrides.get("normalisation", "max") not in ("max", "robust"):
            raise BrainIDError("generator normalisation must be 'max' (official) or 'robust'")
        if schedule not in ("fixed", "curriculum"):
            raise BrainIDError("schedule must be 'fixed' or 'curriculum'")
        self.preset = preset
        self.cfg = copy.deepcopy(PRESETS[preset])
        self.cfg.update(overrides)
        if isinstance(size, int):
            size = (size,) * 3
        self.size = tuple(int(s) for s in size)
        self.device = torch.device(device)
        self.schedule = schedule
        self.curriculum_steps = int(curriculum_steps)
        self.curriculum_start = curriculum_start  # (severe share, severe strength) at step 0
        self.table: LabelTable = get_table(label_table)
        self.lr_axis = lr_axis
        self.n_samples = int(self.cfg["n_mild"]) + int(self.cfg["n_severe"])

    # ---------------------------------------------------------------- severities
    def severities(self, rng: torch.Generator, step: int | None = None) -> torch.Tensor:
        n_mild, n_severe = int(self.cfg["n_mild"]), int(self.cfg["n_severe"])
        n = n_mild + n_severe
        if self.schedule == "fixed" or step is None:
            return torch.tensor([0.0] * n_mild + [1.0] * n_severe)
        p = min(1.0, max(0.0, step / max(1, self.curriculum_steps)))
        share0, strength0 = self.curriculum_start
        share = _lerp(share0, n_severe / max(n, 1), p)
        strength = _lerp(strength0, 1.0, p)
        k = int(math.floor(share * n + float(torch.rand(1, generator=rng))))  # stochastic rounding
        k = min(n, max(0, k))
        sev = torch.zeros(n)
        if k:
            # a little spread early on; exactly the official severe ranges at the end
            sev[n - k:] = strength * (1 - 0.25 * (1 - p) * torch.rand(k, generator=rng))
        return sev

    # ---------------------------------------------------------------- main entry
    @torch.no_grad()
    def __call__(self, labels, t1=None, seed: int = 0, step: int | None = None,
                 severity=None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        dev = self.device
        size = self.size
        labels = _to_tensor(labels, dev)
        if labels.is_floating_point():
            labels = torch.nan_to_num(labels).round().to(torch.int32)
        if t1 is not None:
            t1 = torch.nan_to_num(_to_tensor(t1, dev, torch.float32))
            if t1.shape != labels.shape:
                raise BrainIDError(f"T1 shape {tuple(t1.shape)} differs from the label map's {tuple(labels.shape)}")
        rng = torch.Generator().manual_seed(int(seed))
        noise_gen = torch.Generator(device=dev).manual_seed(int(seed) * 2 + 1)

        if severity is None:
            sev = self.severities(rng, step)
        else:
            sev = torch.as_tensor(severity, dtype=torch.float32).flatten().clamp(0, 1)
        n = sev.numel()

        # ---- shared spatial transform: one grid, one resampling of labels (+ T1)
        aff = S.random_affine(rng, cfg["rotation"], cfg["shear"], cfg["scale"])
        disp = S.coarse_displacement(rng, cfg["nonlin_points"], cfg["nonlin_std_max"]) if cfg["nonlin_std_max"] > 0 else None
        head_centre = cfg["head_centre_prob"] > 0 and float(torch.rand(1, generator=rng)) < cfg["head_centre_prob"]
        centre = (S.uniform_centre(rng, labels) if head_centre
                  else S.random_centre(rng, labels, size, brain_lut=self.table.luts(0, dev)["brain"]))
        flip = bool(torch.rand(1, generator=rng) < cfg["flip_prob"])
        box = S.input_box(aff["A"], centre, disp, size, labels.shape)
        sub = labels[tuple(slice(lo, hi) for lo, hi in box)]
        grid = S.sampling_grid(aff["A"], [c - lo for c, (lo, _) in zip(centre, box)], disp, size, sub.shape, dev,
                               mirror_axis=self.lr_axis if flip else None)
        warped = S.warp_labels(sub, grid).clamp_min_(0)
        luts = self.table.luts(int(warped.max()), dev)  # covers every label and its partner
        if flip:
            warped = lookup(luts["swap"], warped)
        seg = lookup(luts["seg"], warped)
        cls_map = lookup(luts["class"], warped)

        if t1 is not None:
            target = anatomy_target(S.warp_image(t1[tuple(slice(lo, hi) for lo, hi in box)], grid), warped)
        else:
            target = lookup(luts["t1"], warped)
        del grid

        # ---- per-sample contrast
        n_classes = luts["n_classes"]
        kinds = luts["class_kinds"]
        means = torch.empty(n, n_classes)
        stds = torch.empty(n, n_classes)
        modes = []
        for i in range(n):
            u = float(torch.rand(1, generator=rng))
            mode, acc = "gmm", 0.0
            for name in ("ct", "flair", "t1", "t2"):
                acc += cfg[name + "_prob"]
                if u < acc:
                    mode = name
                    break
            modes.append(mode)
            m, s = C.draw_gmm_params(rng, 1, n_classes, cfg["mean_range"], cfg["std_range"], cfg["bg_zero_prob"],
                                     mode, kinds, luts["class_t1_prior"])
            means[i], stds[i] = m[0], s[0]
        pv = None
        if cfg["pv_prob"] > 0:
            pv = torch.tensor([uniform_or_zero(rng, cfg["pv_prob"], cfg["pv_sigma"]) for _ in range(n)])
        gstd = torch.tensor([_lerp(cfg["gamma_std"][0], cfg["gamma_std"][1], float(s)) for s in sev])
        log_gamma = torch.randn(n, generator=rng) * gstd
        # the 300^(1-g) factor of the gamma is a per-sample scale: instead of a pass over the
        # volume, the noise std is divided by it and the final divisor multiplied by it (outputs
        # are divided by their max, so they are the same)
        gfac = C.gamma_factor(log_gamma)
        b_std = torch.tensor([S.uniform(rng, *_range_at(cfg["bias_std"], float(s))) for s in sev])
        b_scale = torch.tensor([S.uniform(rng, *_range_at(cfg["bias_scale"], float(s))) for s in sev])
        noise = torch.tensor([S.uniform(rng, *_range_at(cfg["noise_std"], float(s))) for s in sev])

        # ---- per sample (one sample at a time keeps the working set in cache): contrast, gamma,
        # bias field, resolution + noise, artefacts, normalisation
        inputs = torch.empty((n, 1, *size), device=dev)
        clean = torch.empty((n, 1, *size), device=dev)
        bias = torch.empty((n, 1, *size), device=dev)
        spacing = torch.ones(n, 3)
        thickness = torch.ones(n, 3)
        regime = torch.zeros(n, dtype=torch.long)
        motion = torch.zeros(n)
        divisor = torch.ones(n)
        stripped = torch.zeros(n, dtype=torch.bool)
        if cfg["skull_strip_prob"] > 0:
            stripped = torch.rand(n, generator=rng) < cfg["skull_strip_prob"]
            kind = lookup(luts["kind"], warped)
            brain_cls = cls_map.masked_fill((kind == KIND_CODES["extra"]) | (kind == KIND_CODES["extra_dark"]), 0)
        robust = cfg["normalisation"] == "robust"
        for i in range(n):
            s = float(sev[i])
            img = clean[i]  # (1, *size): the clean image is built in place, divided at the end
            C.gmm_image(brain_cls if stripped[i] else cls_map, means[i:i + 1], stds[i:i + 1], noise_gen,
                        None if pv is None else pv[i:i + 1], out=img)
            C.apply_gamma(img, log_gamma[i:i + 1], rescale=False)
            X.bias_field(rng, size, [float(b_scale[i])], [float(b_std[i])], dev, out=bias[i:i + 1])
            img.mul_(bias[i])
            probs = [_lerp(a, b, s) for a, b in zip(*cfg["resolution_probs"])]
            res = X.draw_resolution(rng, probs, cfg["blur_factor"])
            spacing[i] = torch.tensor(res["spacing"])
            thickness[i] = torch.tensor(res["thickness"])
            regime[i] = res["regime"]
            x = X.degrade(img[0], res, float(noise[i]) / float(gfac[i]), noise_gen)
            mp = _lerp(cfg["motion_prob"][0], cfg["motion_prob"][1], s)
            if mp > 0 and float(torch.rand(1, generator=rng)) < mp:
                motion[i] = S.uniform(rng, *_range_at(cfg["motion_strength"], s))
                x = X.ghosting(x, rng, float(motion[i]))
            if robust:
                inputs[i, 0], info = normalise_tensor(x, ROBUST)
                img.copy_(apply_range(img, info))
                divisor[i] = (info["hi"] - info["lo"]) * float(gfac[i])
                continue
            top = float(x.max())
            top = top if top > 0 else 1.0
            divisor[i] = top * float(gfac[i])  # on the official (gamma-rescaled) intensity scale
            torch.div(x, top, out=inputs[i, 0])  # x >= 0 and x / max(x) <= 1 exactly
            img.div_(top)
        return {
            "inputs": inputs,
            "target_t1": target[None],
            "segmentation": seg,
            "labels": warped,
            "bias_field": bias,
            "clean": clean,
            "severity": sev.to(dev),
            "flipped": torch.tensor(flip),
            "params": {
                "scale": divisor,  # inputs and clean were divided by this (the input's max, or robust range)
                "skull_stripped": stripped,
                "gamma": torch.exp(log_gamma), "bias_std": b_std, "bias_scale": b_scale, "noise_std": noise,
                "spacing": spacing, "thickness": thickness, "regime": regime, "motion": motion,
                "ct": torch.tensor([m == "ct" for m in modes]), "flair": torch.tensor([m == "flair" for m in modes]),
                "t1": torch.tensor([m == "t1" for m in modes]), "t2": torch.tensor([m == "t2" for m in modes]),
                "scales": aff["scales"].float(), "angles": aff["angles"].float(),
            },
        }


def uniform_or_zero(rng: torch.Generator, p: float, rng_range) -> float:
    if float(torch.rand(1, generator=rng)) < p:
        return S.uniform(rng, rng_range[0], rng_range[1])
    return 0.0
