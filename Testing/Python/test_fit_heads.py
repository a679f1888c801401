"""training.fit_heads: the segmentation and anatomy heads refitted on frozen features of whole-head
renders, end to end (renders, predict's preparation, fits, head files) on a small head label map, and
their use by training.export_brainid_lite only with the backbone they were fitted on."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.weights import save_model
from test_export_lite import REPO, make_run
from test_head_eval import META, tiny_head
from training import export_brainid_lite, fit_heads


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
    out = tmp / "heads"
    assert fit_heads.main(["--model", str(exported), "--labels", str(lab), "--out", str(out),
                              "--renders", str(tmp / "renders"), "--families", "t1", "ct_hu", "--per-image", "3000",
                              "--iters", "300", "--threads", "1"]) == 0
    return tmp, run, out, before


def test_the_fits_improve_the_heads_and_change_nothing_else(fitted):
    tmp, run, out, before = fitted  # fitted on the exported file, checked against the run's: same backbone
    summary = json.loads((out / "summary.json").read_text())
    # t1 and the CT-like render the HU one is made from, each at 1 mm and 5 mm; the 1 mm ones not in HU
    # skull-stripped too
    assert summary["families"] == ["t1", "ct_hu", "ct"] and summary["images"] == 8
    assert summary["input"]["spacing_mm"] == [2.0, 2.0, 2.0]
    seg, anat = summary["fits"]["segmentation"], summary["fits"]["anatomy"]
    assert seg["dice_on_fit_voxels"]["after"] > seg["dice_on_fit_voxels"]["before"] + 0.03  # 0.03 -> 0.08 on random features
    assert seg["losses"][-1][1] < seg["losses"][0][1]
    r = anat["r_in_brain_on_fit_voxels"]
    assert r["after"] > r["before"] + 0.04  # least squares beats the random head: 0.02 -> 0.08 on random features
    assert anat["region"] == "brain" and anat["brain_fade"] == fit_heads.BRAIN_FADE
    heads = {t: out / f"{t}_head.safetensors" for t in ("segmentation", "anatomy")}
    refit = BrainIDLib.load_model(run / "model.safetensors", heads=heads)
    for task in heads:
        assert not torch.equal(before.heads[task].conv.weight, refit.heads[task].conv.weight)
    for k, v in before.backbone.state_dict().items():  # the backbone is frozen
        assert torch.equal(v, refit.backbone.state_dict()[k])
    assert torch.equal(before.heads["super_resolution"].conv.weight, refit.heads["super_resolution"].conv.weight)


def test_refitting_one_head_keeps_the_others_record(fitted):
    tmp, _, out, _ = fitted
    again = tmp / "again"
    shutil.copytree(out, again)
    seg = (again / "segmentation_head.safetensors").read_bytes()
    exported = tmp / "exported.safetensors"
    assert fit_heads.main(["--model", str(exported), "--labels", str(tmp / "head.nii.gz"), "--out", str(again),
                           "--renders", str(tmp / "renders"), "--families", "t1", "--per-image", "2000", "--tasks", "anatomy",
                           "--anatomy-region", "head", "--threads", "1"]) == 0
    first, summary = (json.loads((d / "summary.json").read_text()) for d in (out, again))
    assert summary["tasks"] == ["segmentation", "anatomy"] and summary["fits"]["segmentation"] == first["fits"]["segmentation"]
    assert summary["fits"]["anatomy"]["region"] == "head" and "brain_fade" not in summary["fits"]["anatomy"]
    assert (again / "segmentation_head.safetensors").read_bytes() == seg
    assert (again / "anatomy_head.safetensors").read_bytes() != (out / "anatomy_head.safetensors").read_bytes()


def test_mirror_averaged_features_give_predicts_anatomy_exactly(fitted):
    """With flip averaging, the anatomy head on samples()'s averaged features is predict's anatomy output on
    the model grid: the same values at every voxel (all voxels sampled here)."""
    tmp = fitted[0]
    model = BrainIDLib.load_model(tmp / "exported.safetensors")
    model.metadata["input"]["flip_average"] = True
    labels = tiny_head()
    rng = np.random.default_rng(0)
    image = nib.Nifti1Image((labels % 7 + rng.normal(0, 0.3, labels.shape)).astype(np.float32), np.eye(4))
    truth, t1 = nib.Nifti1Image(labels.astype(np.int16), np.eye(4)), nib.Nifti1Image(np.zeros(labels.shape, np.float32), np.eye(4))
    class_of = np.zeros(int(labels.max()) + 1, np.int64)
    class_of[[2, 3, 4, 24, 41, 42, 43]] = 1
    x, xm, y, _ = fit_heads.samples(model, image, truth, t1, class_of, rng, per_image=10**7, mirrored=True)
    conv = model.heads["anatomy"].conv
    ours = np.sort((xm @ conv.weight.reshape(1, -1).T + conv.bias)[:, 0].detach().numpy())
    pred = BrainIDLib.predict(image, tasks=["anatomy"], model=model, device="cpu", on_1mm=True)
    theirs = np.sort(np.asarray(pred.outputs_1mm["anatomy"].dataobj).reshape(-1))
    assert len(ours) == len(theirs) == len(y) and not torch.equal(x, xm)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_anatomy_fit_is_least_squares():
    """On features that hold the target linearly (plus noise), the fit recovers the map; the bias is not shrunk."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0])
    w_true = torch.tensor([[0.5, -0.2, 1.0, 0.1, 0.0, 0.3]])
    t = (x @ w_true.T)[:, 0] + 7.0 + 0.01 * torch.randn(5000, generator=gen)
    w, b = fit_heads.fit_anatomy(x, t, ridge=1e-6)
    assert torch.allclose(w, w_true, atol=2e-3) and abs(float(b[0]) - 7.0) < 2e-3
    assert fit_heads.correlation(w, b, x, t) > 0.999


def test_the_brain_fit_serves_the_brain_better_than_the_whole_head_fit():
    """Features linear in the target inside the brain but not outside (where the target is 0): fitted on
    the brain, the head recovers the brain's target exactly; fitted on everything, it gives some up."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 4, generator=gen)
    y = (torch.arange(6000) % 2).long()  # half the voxels brain
    x[y == 0, 1] *= 3
    x[y == 0, 0] = 2 * x[y == 0, 1]  # outside, the brain's direction is not 0: a linear head must compromise
    t = torch.where(y > 0, x[:, 0] + 0.5 * x[:, 1], torch.zeros(6000))
    model = BrainIDModel(Architecture(f_maps=4, levels=2), {"anatomy": 1})
    r = {region: fit_heads.refit(model, ["anatomy"], x, y, t, 0, 0, region)["anatomy"]["r_in_brain_on_fit_voxels"]["after"]
         for region in fit_heads.REGIONS}
    assert r["brain"] > 0.999 and r["head"] < r["brain"] - 0.01


def test_the_skull_stripped_variant_keeps_only_the_brain():
    truth = nib.Nifti1Image((tiny_head() > 0).astype(np.int16) * (np.isin(tiny_head(), (2, 3, 4, 41, 42, 43))), np.eye(4))
    image = nib.Nifti1Image(np.full(tiny_head().shape, 5.0, np.float32), np.eye(4))
    stripped = np.asarray(fit_heads._skull_stripped(image, truth).dataobj)
    assert set(np.unique(stripped)) == {0.0, 5.0} and (stripped > 0).sum() == (np.asarray(truth.dataobj) > 0).sum()


def test_export_takes_the_head_only_with_its_backbone(fitted, capsys):
    tmp, run, out, _ = fitted
    registry = tmp / "models.json"
    shutil.copy(REPO / "Resources" / "models.json", registry)
    args = ["--pretrain", str(run), "--heads", str(out), "--out", str(tmp / "lite.safetensors"), "--registry", str(registry)]
    assert export_brainid_lite.main(args) == 0
    model = BrainIDLib.load_model(tmp / "lite.safetensors")
    for task in ("segmentation", "anatomy"):
        assert "refitted" in model.metadata["heads"][task]["description"]
    assert "refitted" not in model.metadata["heads"]["super_resolution"]["description"]
    assert model.metadata["heads"]["anatomy"]["brain_fade"] == fit_heads.BRAIN_FADE  # predict fades it outside the brain
    fit = model.metadata["training"]["head_fit"]
    assert fit["images"] == 8 and fit["tasks"] == ["segmentation", "anatomy"] and "losses" not in fit["fits"]["segmentation"]
    fitted_heads = BrainIDLib.load_model(run / "model.safetensors", heads={t: out / f"{t}_head.safetensors" for t in fit["tasks"]})
    for task in fit["tasks"]:
        assert torch.equal(model.heads[task].conv.weight, fitted_heads.heads[task].conv.weight)
    (tmp / "other").mkdir()
    other = make_run(tmp / "other", 3)
    m = BrainIDLib.load_model(other / "model.safetensors")
    with torch.no_grad():
        next(m.backbone.parameters()).add_(0.1)
    save_model(m, other / "model.safetensors")
    with pytest.raises(SystemExit, match="another backbone"):
        export_brainid_lite.main(["--pretrain", str(other), *args[2:]])
