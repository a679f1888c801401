"""Evaluation metrics on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from BrainIDLib import metrics as M


def _labels():
    lab = np.zeros((20, 20, 20), np.int16)
    lab[4:16, 4:16, 4:16] = 3          # Left-Cerebral-Cortex
    lab[6:14, 6:14, 6:10] = 2          # Left-Cerebral-White-Matter
    lab[6:14, 6:14, 10:14] = 41        # Right-Cerebral-White-Matter
    lab[9:11, 9:11, 9:11] = 4          # Left-Lateral-Ventricle
    return lab


def test_dice_perfect_and_shifted():
    lab = _labels()
    per = M.dice_per_label(lab, lab)
    assert per[2] == per[3] == per[41] == per[4] == 1.0
    assert math.isnan(per[17])  # absent from both: undefined, not counted
    assert 0 not in per  # background skipped by default
    assert M.mean_dice(per) == 1.0
    shifted = np.roll(lab, 2, axis=0)
    per_s = M.dice_per_label(shifted, lab)
    assert 0 < M.mean_dice(per_s) < 1
    assert per_s[4] == 0.0  # the 2-voxel ventricle moved off itself entirely
    table = M.dice_table(lab, lab)
    assert table["per_structure"]["Left-Cerebral-White-Matter"] == 1.0 and table["mean"] == 1.0


def test_dice_present_in_one_only_is_zero():
    a = np.zeros((4, 4, 4), int)
    b = a.copy()
    b[0, 0, 0] = 17
    assert M.dice_per_label(a, b, labels=[17])[17] == 0.0


def test_psnr_capped_and_lower_when_shifted():
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 16)).astype(np.float32)
    assert M.psnr(img, img) == M.PSNR_CAP_DB == 100.0
    noisy = img + 0.01 * rng.standard_normal(img.shape)
    shifted = np.roll(img, 3, axis=1)
    p_noisy, p_shift = M.psnr(noisy, img), M.psnr(shifted, img)
    assert 30 < p_noisy < 100
    assert p_shift < p_noisy
    # known value: mse 0.01 on a unit range -> 20 dB
    ref = np.zeros((8, 8, 8))
    ref[0, 0, 0] = 1.0
    assert M.psnr(ref + 0.1, ref) == pytest.approx(20.0)


def test_ssim_identical_is_one_and_drops():
    x = torch.linspace(0, 1, 24**3).reshape(24, 24, 24) ** 2
    x = x + 0.2 * torch.sin(torch.arange(24.0))[None, None]
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert M.ssim(noisy, x) < 0.95
    assert M.ssim(torch.roll(x, 4, 0), x) < 1.0
    small = torch.rand(5, 6, 7)  # smaller than the 11-voxel window: shrinks to fit
    assert M.ssim(small, small) == pytest.approx(1.0)


def test_l1_and_normalised_l2():
    a = torch.ones(4, 4, 4)
    assert M.l1(a, a) == 0.0
    assert M.l1(a * 1.5, a) == pytest.approx(0.5)
    assert M.normalised_l2(a, a) == 0.0
    assert M.normalised_l2(a * 1.1, a) == pytest.approx(0.1)
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[0] = True
    b = a.clone()
    b[1:] = 5  # errors outside the mask do not count
    assert M.normalised_l2(b, a, mask) == 0.0
    assert M.image_metrics(a, a + torch.rand(4, 4, 4))["l1"] > 0


def test_feature_consistency_and_distinctiveness():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 8, 6, 6, 6, generator=g)
    same = f.repeat(3, 1, 1, 1, 1)
    assert M.feature_consistency(same) == pytest.approx(1.0)
    scaled = same * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1, 1)  # cosine ignores length
    assert M.feature_consistency(scaled) == pytest.approx(1.0)
    unrelated = torch.randn(3, 8, 6, 6, 6, generator=g)
    assert abs(M.feature_consistency(unrelated)) < 0.15
    other = torch.randn(3, 8, 6, 6, 6, generator=g)
    assert M.feature_distinctiveness([same, same]) == pytest.approx(0.0, abs=1e-9)
    assert M.feature_distinctiveness([same, other]) == pytest.approx(1.0, abs=0.15)
    mask = torch.zeros(6, 6, 6, dtype=torch.bool)
    mask[:3] = True
    mixed = torch.cat([f, f.clone()])
    mixed[1, :, 3:] = torch.randn(8, 3, 6, 6, generator=g)  # differ only outside the mask
    assert M.feature_consistency(mixed, mask) == pytest.approx(1.0)
    assert M.feature_consistency(mixed) < 1.0
    with pytest.raises(ValueError):
        M.feature_consistency(f)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
