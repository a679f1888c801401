"""Training recipe faithful to Brain-ID: real-image adaptation data (deformation, flip with label
swap, mild corruption on the generator's code), one anatomy-target convention, official-format
export, head provenance, MS-SSIM."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib.synth import SubjectGenerator
from BrainIDLib.synth.targets import anatomy_target
from test_training import phantom
from training.data import NiftiSteps

# T1-like intensities with different left and right cortex, so that a flip shows in the image
T1_MEANS = {0: 0, 24: 30, 3: 80, 42: 60, 2: 120, 41: 120, 4: 30, 43: 30, 10: 100, 49: 100}


def _render(lab: np.ndarray, means=T1_MEANS) -> np.ndarray:
    lut = np.zeros(max(means) + 1, np.float32)
    for k, v in means.items():
        lut[k] = v
    return lut[lab]


@pytest.fixture(scope="module")
def real_subject(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("real")
    lab = phantom((40, 44, 36), 3).astype(np.int32)
    t1 = _render(lab) * 3.7 + 2.0  # arbitrary scanner scale and offset
    paths = {}
    for key, arr in (("image", t1), ("labels", lab), ("t1", t1)):
        paths[key] = str(d / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), paths[key])
    return {"paths": paths, "labels": lab}


def _steps(paths: dict, corruption="mild", **data) -> NiftiSteps:
    cfg = {"subjects": [paths], "size": [32, 32, 32], "subjects_per_step": 1, "mild": 2, **data}
    return NiftiSteps(cfg, seed=0, corruption=corruption)


def _best_crop_agreement(drawn: np.ndarray, original: np.ndarray) -> float:
    """Largest fraction of equal voxels between `drawn` and any axis-aligned crop of `original` or of
    its left/right mirror with labels swapped (what a crop-and-flip without deformation gives)."""
    swap = np.arange(original.max() + 1)
    for a, b in ((3, 42), (2, 41), (4, 43), (10, 49)):
        swap[a], swap[b] = b, a
    best = 0.0
    for src in (original, swap[original[::-1]]):
        pad = np.pad(src, 4)  # a crop may reach a little outside the volume
        windows = np.lib.stride_tricks.sliding_window_view(pad, drawn.shape)
        for i in range(windows.shape[0]):
            best = max(best, float((windows[i] == drawn).mean(axis=(-3, -2, -1)).max()))
    return best


def test_real_adaptation_draws_are_deformed_not_cropped(real_subject):
    steps = _steps(real_subject["paths"])
    agreements = []
    for seed in range(3):
        draw = steps.draw(0, seed)
        labels = draw["labels"].numpy()
        assert labels.shape == (32, 32, 32) and draw["inputs"].shape == (2, 1, 32, 32, 32)
        agreements.append(_best_crop_agreement(labels, real_subject["labels"]))
    # a plain (flipped) crop would agree exactly somewhere; rotation/scale/nonlinear warps do not
    assert max(agreements) < 0.9, agreements


def test_real_draws_flip_swaps_labels_and_keep_everything_aligned(real_subject):
    steps = _steps(real_subject["paths"], corruption="none")
    flipped_seen = unflipped_seen = False
    for seed in range(8):
        d = steps.draw(0, seed)
        lab, img = d["labels"], d["clean"][0, 0]
        # every output of a draw is on one grid: the image is the labels' render (up to edges)
        core = torch.from_numpy(_render(lab.numpy())) / T1_MEANS[2]
        inside = lab == 2
        assert (img[inside] / img[inside].median() - core[inside]).abs().median() < 0.02
        assert torch.equal(d["mask"], lab > 0) and torch.equal(d["inputs"][0, 0], d["clean"][0, 0])
        # left labels stay on the low side of axis 0 (RAS) after a flip, because ids are swapped
        x = torch.arange(32.0)[:, None, None].expand(32, 32, 32)
        assert x[lab == 3].mean() < x[lab == 42].mean()
        # the flip moved the right hemisphere's intensity (60) under the left cortex label (3)
        ratio = float(img[lab == 3].median() / img[lab == 2].median())
        if bool(d["flipped"]):
            flipped_seen = True
            assert ratio == pytest.approx(60 / 120, abs=0.05)
        else:
            unflipped_seen = True
            assert ratio == pytest.approx(80 / 120, abs=0.05)
    assert flipped_seen and unflipped_seen


def test_real_draws_use_the_generators_mild_corruption(real_subject):
    d = _steps(real_subject["paths"]).draw(0, 5)
    assert set(d) >= {"inputs", "clean", "bias_field", "target_t1", "segmentation", "labels", "mask"}
    assert float(d["inputs"].max()) == pytest.approx(1.0) and float(d["inputs"].min()) >= 0
    # mild bias field: exp(N(0, <=0.02)) on a coarse grid; not flat, not strong
    assert 0 < float((d["bias_field"] - 1).abs().max()) < 0.15
    # forcing a regime (evaluation) is deterministic and changes only the resolution
    steps = _steps(real_subject["paths"])
    a, b = steps.draw(0, 7, regime=0), steps.draw(0, 7, regime=3)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["target_t1"], b["target_t1"])
    assert torch.equal(steps.draw(0, 7, regime=3)["inputs"], b["inputs"])
    assert not torch.allclose(a["inputs"], b["inputs"], atol=0.05)


def test_one_anatomy_target_convention_on_both_paths(real_subject):
    lab = torch.from_numpy(real_subject["labels"])
    t1 = torch.from_numpy(_render(real_subject["labels"]) * 3.7 + 2.0)
    # synthetic path: the generator's deformed T1, divided by its WM median
    gen = SubjectGenerator(size=(32, 32, 32))
    draw = gen(lab, t1=t1, seed=1)
    wm = (draw["labels"] == 2) | (draw["labels"] == 41)
    assert float(draw["target_t1"][0][wm].median()) == pytest.approx(1.0, abs=1e-4)
    # real path: the same convention (the old min-max put WM at ~0.27 of a 0.5-99.5% range here)
    real = _steps(real_subject["paths"]).draw(0, 1)
    wm = (real["labels"] == 2) | (real["labels"] == 41)
    assert float(real["target_t1"][0][wm].median()) == pytest.approx(1.0, abs=1e-4)
    # the helper itself; without labels it divides by the 99.5th percentile of the positive voxels,
    # so a few hot voxels do not move the scale (WM is the brightest tissue of this phantom)
    assert float(anatomy_target(t1, lab)[lab == 41].median()) == pytest.approx(1.0)
    hot = t1.clone()
    hot[:2, :2, :2] = 1e4
    assert float(anatomy_target(hot)[lab == 2].median()) == pytest.approx(1.0)
    assert float(anatomy_target(hot).max()) > 10
