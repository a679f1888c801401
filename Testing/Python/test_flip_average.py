"""Left/right flip averaging in predict(): a mirrored scan gets the mirrored segmentation (labels
swapped) exactly, which a single pass of a network does not guarantee."""

import nibabel as nib
import numpy as np
import torch

import BrainIDLib as bid
from BrainIDLib.labels import LEFT_RIGHT_PAIRS

from test_inference import random_model


def _scan(seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 30, (24, 20, 16)).astype(np.float32)
    data[:, :, :2] = 0
    return data


def _swap(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for a, b in LEFT_RIGHT_PAIRS:
        out[labels == a], out[labels == b] = b, a
    return out


def test_flip_average_makes_the_segmentation_mirror_equivariant():
    torch.manual_seed(3)
    model = random_model({"segmentation": 33, "anatomy": 1})
    with torch.no_grad():  # make the random network favour left/right labels so the swap matters
        model.heads["segmentation"].conv.weight.mul_(8.0)
    data = _scan()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # axis 0 is left-right (RAS)
    img, mirrored = nib.Nifti1Image(data, affine), nib.Nifti1Image(data[::-1].copy(), affine)

    def seg(image, flip):
        pred = bid.predict(image, tasks=["segmentation", "anatomy"], model=model, device="cpu", flip_average=flip)
        return np.asarray(pred.outputs["segmentation"].dataobj), np.asarray(pred.outputs["anatomy"].dataobj)

    a, anat_a = seg(img, True)
    b, anat_b = seg(mirrored, True)
    assert np.isin(a, [x for p in LEFT_RIGHT_PAIRS for x in p]).mean() > 0.2  # the test exercises the swap
    assert (_swap(b[::-1]) == a).mean() > 0.999
    np.testing.assert_allclose(anat_b[::-1], anat_a, atol=1e-4)
    a1, _ = seg(img, False)
    b1, _ = seg(mirrored, False)
    assert (_swap(b1[::-1]) == a1).mean() < 0.9  # one pass of this network is not symmetric


def test_flip_average_follows_the_models_metadata():
    model = random_model({"segmentation": 33})
    img = nib.Nifti1Image(_scan(1), np.eye(4))
    default = np.asarray(bid.predict(img, model=model, device="cpu").outputs["segmentation"].dataobj)
    single = np.asarray(bid.predict(img, model=model, device="cpu", flip_average=False).outputs["segmentation"].dataobj)
    np.testing.assert_array_equal(default, single)  # no metadata flag: one pass
    model.metadata["input"]["flip_average"] = True
    flagged = np.asarray(bid.predict(img, model=model, device="cpu").outputs["segmentation"].dataobj)
    both = np.asarray(bid.predict(img, model=model, device="cpu", flip_average=True).outputs["segmentation"].dataobj)
    np.testing.assert_array_equal(flagged, both)
    assert (flagged != single).any()
