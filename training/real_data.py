"""Real-image draws for downstream heads: the paper's adaptation data, built from the generator's code.

One draw of a subject (image + optional labels / T1 / mask) is
1. the generator's shared spatial transform: random affine (rotation, shear, scale) and a smooth
   nonlinear displacement about a random crop centre, plus a left/right flip (label ids swapped
   through the label table's left/right pairs), composed into one sampling grid
   (BrainIDLib.synth.spatial): labels and mask resampled nearest, image and T1 linearly, so every
   output of a draw lies on the same grid;
2. per sample, the generator's corruption steps (gamma, BrainIDLib.synth.corruption.bias_field,
   draw_resolution, degrade), each sample divided by its max as the generator does.

Intensity scale: the image is min-max normalised to [0, 1] after clipping at its 0.5 / 99.5
percentiles, and the corruption works on that scale, as the official ContrastSpecificDataset does.
Gamma and bias-field ranges are the generator preset's mild (or severe) ones. Noise is given on the
[0, 1] scale (REAL_NOISE): mild is the official real-data range U(0, 0.02); severe is the generator's
severe U(5, 15) on its 0-255 scale, i.e. U(0.02, 0.06) here (the official code never uses severe
real data for training).

The T1 target follows BrainIDLib.synth.targets.anatomy_target (WM median = 1), like synthetic data.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from BrainIDLib.errors import BrainIDError
from BrainIDLib.synth import PRESETS
from BrainIDLib.synth import contrast as C
from BrainIDLib.synth import corruption as X
from BrainIDLib.synth import spatial as S
from BrainIDLib.synth.filters import lookup
from BrainIDLib.synth.tables import get_table
from BrainIDLib.synth.targets import anatomy_target
from BrainIDLib.normalize import normalise_array

LEVELS = ("mild", "severe", "none")
REAL_NOISE = {"mild": (0.0, 0.02), "severe": (0.02, 0.06)}  # noise std on the [0, 1] image scale
IMAGE_PERCENTILES = {"method": "minmax", "percentiles": [0.5, 99.5]}
FOREGROUND_LEVEL = 0.1  # without labels or mask, the crop is centred on voxels above this (of [0, 1])


KINDS = (("image", np.float32), ("labels", np.int32), ("t1", np.float32), ("mask", np.uint8))


def _open(path: Path):
    try:
        return nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is a fixable file problem
        raise BrainIDError(f"cannot read {path}: {e}") from None


def check_subject(row: dict) -> None:
    """Headers only: every volume of a manifest row is a 3D volume on the image's grid (so a bad
    subject fails at start-up, not at the step that first draws it)."""
    ref = None
    for key, _ in KINDS:
        if key not in row:
            continue
        img = _open(Path(row[key]))
        shape = tuple(int(n) for n in img.shape)
        if len(shape) < 3 or any(n > 1 for n in shape[3:]):
            raise BrainIDError(f"{row[key]} is not a 3D volume (shape {shape})")
        if ref is None:
            ref = (shape[:3], img.affine)
        elif shape[:3] != ref[0] or not np.allclose(img.affine, ref[1], atol=1e-3):
            raise BrainIDError(f"{row[key]} is not on the grid of its image {row['image']} "
                               f"(shape {shape[:3]} vs {ref[0]}); resample it onto the image first")


def load_subject(row: dict, normalisation: dict | None = None) -> dict[str, np.ndarray]:
    """The image (in [0, 1], see IMAGE_PERCENTILES) and its optional labels / t1 / mask (paths),
    reoriented to RAS so that axis 0 is left/right (the flip axis); see check_subject."""
    check_subject(row)
    out = {}
    for key, dtype in KINDS:
        if key not in row:
            continue
        img = _open(Path(row[key]))
        img = nib.as_closest_canonical(img.slicer[..., 0] if len(img.shape) > 3 else img)
        data = np.asanyarray(img.dataobj)
        if np.issubdtype(dtype, np.integer) and data.dtype.kind == "f":
            data = np.rint(np.nan_to_num(data))
        out[key] = np.ascontiguousarray(np.nan_to_num(data).astype(dtype))
    # as inference prepares a scan for the model being adapted (its metadata's normalisation)
    out["image"] = normalise_array(out["image"], normalisation or IMAGE_PERCENTILES)[0]  # once per load
    return out


class RealDraws:
    """Draws of real subjects (see the module docstring). generator: data.generator options
    (preset and overrides of its spatial / gamma / bias / resolution ranges, label_table, lr_axis)."""

    def __init__(self, size, corruption: str = "mild", generator: dict | None = None):
        if corruption not in LEVELS:
            raise BrainIDError(f"adapt.corruption must be one of {', '.join(LEVELS)}, not {corruption!r}")
        options = dict(generator or {})
        preset = options.pop("preset", "brainid")
        if preset not in PRESETS:
            raise BrainIDError(f"unknown generator preset {preset!r}; use one of {', '.join(PRESETS)}")
        self.table = get_table(options.pop("label_table", None))
        self.lr_axis = int(options.pop("lr_axis", 0))
        for key in ("schedule", "curriculum_steps", "curriculum_start"):
            options.pop(key, None)  # the step schedule is for synthetic pretraining only
        unknown = set(options) - set(PRESETS[preset])
        if unknown:
            raise BrainIDError(f"unknown generator option(s) {sorted(unknown)}; known: {sorted(PRESETS[preset])}")
        self.cfg = {**copy.deepcopy(PRESETS[preset]), **options}
        self.size = tuple(int(s) for s in size)
        self.level = corruption

    def __call__(self, subject: dict[str, np.ndarray], seed: int, samples: int = 1, regime: int | None = None) -> dict:
        """One draw of a load_subject() result: {inputs, clean, bias_field: (samples, 1, *size); target_t1 (1, *size) if t1; labels,
        segmentation (*size) if labels; mask (*size) if labels or mask; flipped}. regime: force this
        index into BrainIDLib.synth.corruption.REGIMES (evaluation), else drawn per sample."""
        cfg, size = self.cfg, self.size
        rng = torch.Generator().manual_seed(int(seed))
        noise_gen = torch.Generator().manual_seed(int(seed) * 2 + 1)
        image = torch.from_numpy(subject["image"])
        labels = torch.from_numpy(subject["labels"]) if "labels" in subject else None

        # ---- shared spatial transform, as the generator draws it
        aff = S.random_affine(rng, cfg["rotation"], cfg["shear"], cfg["scale"])
        disp = S.coarse_displacement(rng, cfg["nonlin_points"], cfg["nonlin_std_max"]) if cfg["nonlin_std_max"] > 0 else None
        if labels is not None:
            centre = S.random_centre(rng, labels, size, brain_lut=self.table.luts(0, "cpu")["brain"])
        else:
            fg = torch.from_numpy(subject["mask"] > 0) if "mask" in subject else image > FOREGROUND_LEVEL
            centre = S.random_centre(rng, fg.to(torch.int32), size)
        flip = bool(torch.rand(1, generator=rng) < cfg["flip_prob"])
        box = S.input_box(aff["A"], centre, disp, size, image.shape)
        crop = tuple(slice(lo, hi) for lo, hi in box)
        grid = S.sampling_grid(aff["A"], [c - lo for c, (lo, _) in zip(centre, box)], disp, size,
                               image[crop].shape, "cpu", mirror_axis=self.lr_axis if flip else None)
        warped = S.warp_image(image[crop], grid).clamp_(0, 1)
        out = {"flipped": torch.tensor(flip)}
        lab = None
        if labels is not None:
            lab = S.warp_labels(labels[crop], grid).clamp_min_(0)
            luts = self.table.luts(int(lab.max()), "cpu")
            if flip:
                lab = lookup(luts["swap"], lab)
            out["labels"] = lab
            out["segmentation"] = lookup(luts["seg"], lab)
        if "t1" in subject:
            out["target_t1"] = anatomy_target(S.warp_image(torch.from_numpy(subject["t1"])[crop], grid), lab)[None]
        if "mask" in subject:
            out["mask"] = S.warp_labels(torch.from_numpy(subject["mask"])[crop], grid) > 0
        elif lab is not None:
            out["mask"] = lab > 0

        # ---- per-sample corruption, the generator's steps
        inputs = torch.empty((samples, 1, *size))
        clean = torch.empty((samples, 1, *size))
        bias = torch.ones((samples, 1, *size))
        lvl = 1 if self.level == "severe" else 0
        probs = cfg["resolution_probs"][lvl] if regime is None else [float(k == regime) for k in range(len(X.REGIMES))]
        for i in range(samples):
            img = warped.clone()[None]
            if self.level == "none":  # no corruption; a forced regime still degrades the resolution
                res, noise = (X.draw_resolution(rng, probs, cfg["blur_factor"]) if regime is not None else None), 0.0
            else:
                C.apply_gamma(img, torch.randn(1, generator=rng) * cfg["gamma_std"][lvl])
                X.bias_field(rng, size, [S.uniform(rng, *cfg["bias_scale"][lvl])],
                             [S.uniform(rng, *cfg["bias_std"][lvl])], "cpu", out=bias[i:i + 1])
                img.mul_(bias[i])
                res = X.draw_resolution(rng, probs, cfg["blur_factor"])
                noise = S.uniform(rng, *REAL_NOISE[self.level])
            x = img[0] if res is None else X.degrade(img[0], res, noise, noise_gen)
            top = float(x.max())
            top = top if top > 0 else 1.0
            inputs[i, 0] = x / top
            clean[i] = img / top
        out.update(inputs=inputs, clean=clean, bias_field=bias)
        return out
