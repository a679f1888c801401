"""Intensity normalisation shared by training and inference (BrainIDLib.normalize): outliers, the
amount of air, CT in Hounsfield units, and the inference path using it as the model asks."""

import numpy as np
import pytest
import torch

from BrainIDLib.normalize import MINMAX, ROBUST, looks_like_ct, normalise_tensor
from BrainIDLib.volume import Volume, prepare


def head(shape=(48, 56, 48), seed=0, scale=1.0):
    """MR-like head: air with Rician-ish noise, a bright scalp shell, a brain of WM/GM/CSF.
    Returns (image, brain mask)."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2)
    img = np.abs(rng.normal(0, 3, shape))  # air noise
    img[r < 1.0] = 140  # scalp / fat
    img[r < 0.9] = 20  # skull
    img[r < 0.82] = 30  # CSF
    img[r < 0.75] = 80  # GM
    img[r < 0.5] = 110  # WM
    img[r < 0.9] += rng.normal(0, 3, int((r < 0.9).sum()))
    return (img * scale).astype(np.float32), r < 0.75


def _brain(x, mask):
    return torch.as_tensor(x)[torch.from_numpy(mask)]


def test_robust_ignores_hot_voxel_and_air_noise():
    img, brain = head()
    base, _ = normalise_tensor(torch.from_numpy(img), ROBUST)
    hot = img.copy()
    hot[0, 0, 0] = 1e6  # one hot voxel
    hot[1:6, 1:6, 1:6] += 40  # a patch of strong air noise
    out, _ = normalise_tensor(torch.from_numpy(hot), ROBUST)
    assert float((_brain(out, brain) - _brain(base, brain)).abs().max()) < 0.02
    # min-max is thrown by the same voxel: the brain collapses towards 0
    mm, _ = normalise_tensor(torch.from_numpy(hot), MINMAX)
    assert float(_brain(mm, brain).max()) < 0.01


def test_robust_ignores_a_small_bright_fat_pad_and_the_field_of_view():
    img, brain = head()
    base, _ = normalise_tensor(torch.from_numpy(img), ROBUST)
    fat = img.copy()
    fat[22:26, 50:53, 22:25] = 400  # ~0.3% of the head, brighter than anything else
    out, _ = normalise_tensor(torch.from_numpy(fat), ROBUST)
    assert float((_brain(out, brain) - _brain(base, brain)).abs().mean()) < 0.03
    # twice the field of view of air around the same head
    wide = np.abs(np.random.default_rng(1).normal(0, 3, (96, 112, 96))).astype(np.float32)
    wide[24:72, 28:84, 24:72] = img
    out, _ = normalise_tensor(torch.from_numpy(wide), ROBUST)
    inner = out[24:72, 28:84, 24:72]
    assert float((_brain(inner, brain) - _brain(base, brain)).abs().mean()) < 0.03
    # and the scale of the scanner's numbers does not matter at all
    scaled, _ = normalise_tensor(torch.from_numpy(img * 37.0), ROBUST)
    assert torch.allclose(scaled, base, atol=1e-5)


def hu_head(shape=(48, 56, 48)):
    """CT-like head in Hounsfield units: air -1000, fat -100, bone +1000, CSF 8, WM 25, GM 38."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2)
    ct = np.full(shape, -1000.0, np.float32)
    ct[r < 1.0] = -100
    ct[r < 0.9] = 1000
    ct[r < 0.82] = 8
    ct[r < 0.75] = 38
    ct[r < 0.5] = 25
    return ct, r


def test_ct_in_hounsfield_units_is_windowed_to_the_brain():
    ct, r = hu_head()
    t = torch.from_numpy(ct)
    assert looks_like_ct(t)
    out, info = normalise_tensor(t, ROBUST)
    assert info["ct"]
    wm, gm, csf = (float(out[m].mean()) for m in (r < 0.5, (r > 0.55) & (r < 0.75), (r > 0.76) & (r < 0.82)))
    assert csf < wm < gm and gm - csf > 0.3  # the brain spans a real part of [0, 1]
    mm, _ = normalise_tensor(t, MINMAX)  # what whole-volume min-max does: brain squeezed into ~2%
    assert float(mm[r < 0.75].max() - mm[r < 0.75].min()) < 0.02
    # the same scan already windowed to the brain window gives the same result
    windowed, _ = normalise_tensor(t.clamp(0, 80), ROBUST)
    assert torch.allclose(windowed, out, atol=1e-5)


def test_mr_with_negative_values_is_not_ct():
    img, _ = head()
    z = (img - img.mean()) / img.std()  # a z-scored MR scan
    assert not looks_like_ct(torch.from_numpy(z))
    assert not looks_like_ct(torch.from_numpy(img))


def test_inference_applies_the_models_normalisation():
    ct, _ = hu_head()
    vol = Volume(ct, np.eye(4))
    prep = prepare(vol, [1, 1, 1], ROBUST, multiple=8)
    expect, _ = normalise_tensor(torch.from_numpy(ct), ROBUST)
    core = prep.tensor[0, 0][tuple(slice(b, b + n) for b, n in zip(prep.pad_before, ct.shape))]
    assert torch.allclose(core, expect, atol=1e-5)


def test_unknown_method_is_a_clear_error():
    from BrainIDLib.errors import BrainIDError

    with pytest.raises(BrainIDError, match="upgrade BrainID"):
        prepare(Volume(np.ones((8, 8, 8), np.float32), np.eye(4)), [1, 1, 1], {"method": "zscore-v9"}, multiple=8)
