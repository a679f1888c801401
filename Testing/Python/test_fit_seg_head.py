"""training.fit_seg_head: the segmentation head refitted on frozen features of whole-head renders,
end to end (renders, predict's preparation, fit, head file) on a small head label map, and its use
by training.export_brainid_lite only with the backbone it was fitted on."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib
from BrainIDLib.weights import save_model
from test_export_lite import REPO, make_run
from test_head_eval import META, tiny_head
from training import export_brainid_lite, fit_seg_head


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny random model refitted on the renders of one small head (T1-like and CT in HU)."""
    tmp = tmp_path_factory.mktemp("fit")
    lab = tmp / "head.nii.gz"
    nib.save(nib.Nifti1Image(tiny_head(), np.eye(4)), lab)
    run = make_run(tmp, 3)
    before = BrainIDLib.load_model(run / "model.safetensors")
    before.metadata["input"] = dict(META["input"])  # as an export describes it: a 2 mm grid
    exported = save_model(before, tmp / "exported.safetensors")
    out = tmp / "seghead"
    assert fit_seg_head.main(["--model", str(exported), "--labels", str(lab), "--out", str(out),
                              "--renders", str(tmp / "renders"), "--families", "t1", "ct_hu", "--per-image", "3000",
                              "--iters", "300", "--threads", "1"]) == 0
    return tmp, run, out, before


def test_the_fit_improves_the_head_and_changes_nothing_else(fitted):
    tmp, run, out, before = fitted  # fitted on the exported file, checked against the run's: same backbone
    summary = json.loads((out / "summary.json").read_text())
    # t1 and the CT-like render the HU one is made from, each at 1 mm and 5 mm; the 1 mm ones not in HU
    # skull-stripped too
    assert summary["families"] == ["t1", "ct_hu", "ct"] and summary["images"] == 8
    assert summary["input"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert summary["dice_on_fit_voxels"]["after"] > summary["dice_on_fit_voxels"]["before"] + 0.03  # 0.03 -> 0.08 on random features
    assert summary["losses"][-1][1] < summary["losses"][0][1]
    refit = BrainIDLib.load_model(run / "model.safetensors", heads={"segmentation": out / "segmentation_head.safetensors"})
    old, new = before.heads["segmentation"].conv, refit.heads["segmentation"].conv
    assert not torch.equal(old.weight, new.weight)
    for k, v in before.backbone.state_dict().items():  # the backbone is frozen
        assert torch.equal(v, refit.backbone.state_dict()[k])
    assert torch.equal(before.heads["anatomy"].conv.weight, refit.heads["anatomy"].conv.weight)


def test_the_skull_stripped_variant_keeps_only_the_brain():
    truth = nib.Nifti1Image((tiny_head() > 0).astype(np.int16) * (np.isin(tiny_head(), (2, 3, 4, 41, 42, 43))), np.eye(4))
    image = nib.Nifti1Image(np.full(tiny_head().shape, 5.0, np.float32), np.eye(4))
    stripped = np.asarray(fit_seg_head._skull_stripped(image, truth).dataobj)
    assert set(np.unique(stripped)) == {0.0, 5.0} and (stripped > 0).sum() == (np.asarray(truth.dataobj) > 0).sum()


def test_export_takes_the_head_only_with_its_backbone(fitted, capsys):
    tmp, run, out, _ = fitted
    registry = tmp / "models.json"
    shutil.copy(REPO / "Resources" / "models.json", registry)
    args = ["--pretrain", str(run), "--heads", str(out), "--out", str(tmp / "lite.safetensors"), "--registry", str(registry)]
    assert export_brainid_lite.main(args) == 0
    model = BrainIDLib.load_model(tmp / "lite.safetensors")
    assert "refitted" in model.metadata["heads"]["segmentation"]["description"]
    assert model.metadata["training"]["segmentation_head_fit"]["images"] == 8
    fitted_head = BrainIDLib.load_model(run / "model.safetensors", heads={"segmentation": out / "segmentation_head.safetensors"})
    assert torch.equal(model.heads["segmentation"].conv.weight, fitted_head.heads["segmentation"].conv.weight)
    (tmp / "other").mkdir()
    other = make_run(tmp / "other", 3)
    m = BrainIDLib.load_model(other / "model.safetensors")
    with torch.no_grad():
        next(m.backbone.parameters()).add_(0.1)
    save_model(m, other / "model.safetensors")
    with pytest.raises(SystemExit, match="another backbone"):
        export_brainid_lite.main(["--pretrain", str(other), *args[2:]])
