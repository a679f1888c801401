"""training.head_eval: whole-head renders, Hounsfield mapping, the scoring helpers and the evaluation
end to end through BrainIDLib.predict, on a small head label map made here and a tiny random model."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import Architecture, BrainIDModel
from training import head_eval as H

META = {"name": "tiny-test", "input": {"spacing_mm": [2.0, 2.0, 2.0], "normalisation": {"method": "minmax", "percentiles": [0, 100]}},
        "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}}}


def tiny_head(shape=(40, 44, 44)) -> np.ndarray:
    """Nested ellipsoids: scalp (507), skull (515), extra-cerebral CSF (24), a two-hemisphere brain
    (cortex 3/42, WM 2/41, lateral ventricles 4/43), inside air; axis 0 is left -> right."""
    c = np.array(shape) / 2 - 0.5
    x, y, z = np.meshgrid(*[np.arange(n) - cc for n, cc in zip(shape, c)], indexing="ij")

    def inside(rx, ry, rz, dx=0.0):
        return ((x - dx) / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2 <= 1

    lab = np.zeros(shape, np.int32)
    lab[inside(18, 20, 19)] = 507
    lab[inside(16, 18, 17)] = 515
    lab[inside(14, 16, 15)] = 24
    brain = inside(13, 15, 14)
    left = x < 0
    lab[brain & left], lab[brain & ~left] = 3, 42
    wm = inside(9, 11, 10)
    lab[wm & left], lab[wm & ~left] = 2, 41
    lab[inside(2.5, 5, 3, -4)] = 4
    lab[inside(2.5, 5, 3, 4)] = 43
    return lab


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    lab = tiny_head()
    paths = []
    for name in ("a", "b"):  # the same anatomy twice: the centroid baseline must find it exactly
        p = d / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(lab, np.eye(4)), p)
        paths.append(p)
    return paths


def tiny_model(seed=0) -> BrainIDModel:
    torch.manual_seed(seed)
    m = BrainIDModel(Architecture(f_maps=8, levels=3), {"segmentation": 33, "anatomy": 1}).eval()
    m.metadata = {k: (dict(v) if isinstance(v, dict) else v) for k, v in META.items()}
    return m


# --------------------------------------------------------------------------------- rendering
def test_render_keeps_the_head_and_its_geometry():
    lab = tiny_head()
    r = H.render_head(lab, "t1", seed=3)
    assert r["image"].shape == r["truth"].shape == r["labels"].shape == r["t1"].shape
    assert r["image"].shape[2] % H.SLICE_MM == 0
    # no warp or flip: the rendered ids are the map's own, shifted, and every head voxel is in view
    lo, hi = H._box(r["labels"] > 0)
    glo, ghi = H._box(lab > 0)
    crop = r["labels"][lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    assert np.array_equal(crop, lab[glo[0]:ghi[0] + 1, glo[1]:ghi[1] + 1, glo[2]:ghi[2] + 1])
    assert set(np.unique(r["truth"])) == {0, 2, 3, 4, 24, 41, 42, 43}
    assert (r["image"][r["labels"] == 0] < r["image"][r["labels"] == 2].mean()).mean() > 0.99  # dark air
    again = H.render_head(lab, "t1", seed=3)
    assert np.array_equal(again["image"], r["image"])  # seeded, deterministic
    assert not np.array_equal(H.render_head(lab, "t1", seed=4)["image"], r["image"])


def test_head_crop_cuts_the_neck_and_keeps_slices_whole():
    lab = np.zeros((30, 30, 120), np.int32)
    lab[5:25, 5:25, 10:110] = 507  # a long "neck" below
    truth = np.zeros_like(lab, dtype=np.int16)
    truth[10:20, 10:20, 70:100] = 2
    box = H.head_crop(truth, lab, margin=2, neck_mm=25)
    assert box[2].start == 70 - 25
    assert (box[2].stop - box[2].start) % H.SLICE_MM == 0 and box[2].stop >= 110 + 2
    assert box[0] == slice(3, 27)


def test_thick_slices_sample_the_slice_centres():
    n = 40
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32), (6, 5, n)).copy()
    thick = H.thick_slices(ramp)
    centres = H.slice_centres(n)
    assert thick.shape == (6, 5, n // H.SLICE_MM)
    assert list(centres) == [2, 7, 12, 17, 22, 27, 32, 37]
    # a linear profile is kept by the symmetric slice profile away from the ends
    assert np.allclose(thick[..., 2:-2], centres[2:-2], atol=1e-3)
    with pytest.raises(ValueError, match="multiple"):
        H.slice_centres(41)
    # the 5 mm NIfTI puts slice k where the 1 mm voxel 5k+2 is
    a1, a5 = H._nifti(ramp, np.float32).affine, H._nifti(thick, np.float32, H.SLICE_MM).affine
    assert np.allclose(a5 @ [1, 2, 3, 1], a1 @ [1, 2, centres[3], 1])


def test_hounsfield_map_is_monotone_anchored_and_in_range():
    r = H.render_head(tiny_head(), "ct", seed=1)
    hu = H.to_hounsfield(r["image"], r["labels"])
    order = np.argsort(r["image"], axis=None)
    assert np.all(np.diff(hu.reshape(-1)[order]) >= 0)  # every intensity keeps its rank
    assert hu.min() >= H.HU_RANGE[0] and hu.max() <= H.HU_RANGE[1]
    # the median of each tissue kind (air, CSF, WM, GM; left and right together) lands on its anchor
    med = {k: float(np.median(hu[np.isin(r["labels"], labs)])) for k, labs in
           {"air": 0, "csf": (24, 4, 43), "wm": (2, 41), "gm": (3, 42), "bone": 515}.items()}
    assert med["air"] == pytest.approx(-1000, abs=1) and med["csf"] == pytest.approx(8, abs=1)
    assert med["wm"] == pytest.approx(25, abs=1) and med["gm"] == pytest.approx(38, abs=1)
    assert 700 <= med["bone"] <= 1500
    with pytest.raises(ValueError):
        H.to_hounsfield(np.ones((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.int32))


# --------------------------------------------------------------------------------- helpers
def test_brain_mask_dice_known_answers():
    a = np.zeros((4, 4, 4), np.int16)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :4] = [2, 3, 41, 42]  # four labelled voxels
    b[0, 0, 2:4] = b[0, 1, 0:2] = True  # four mask voxels, two shared
    assert H.brain_mask_dice(a, b) == pytest.approx(0.5)
    assert H.brain_mask_dice(a, a > 0) == 1.0
    assert H.brain_mask_dice(a, np.roll(a, 2, axis=0) > 0) == 0.0
    assert math.isnan(H.brain_mask_dice(np.zeros_like(a), np.zeros_like(b)))


def test_lr_agreement_of_mirrored_and_shifted_predictions():
    truth = np.where(np.isin(tiny_head(), SEGMENTATION_LABELS), tiny_head(), 0).astype(np.int16)
    perfect = H.lr_swap(np.flip(truth, 0))  # what an L/R-equivariant model gives on the mirrored image
    assert H.lr_agreement(truth, perfect, 0) == 1.0
    shifted = np.roll(perfect, 3, axis=1)
    assert H.lr_agreement(truth, shifted, 0) < 0.9
    # a model that calls both hemispheres 'left' gives the same labels on this symmetric head and on
    # its mirror image: mirrored back and swapped, they all become 'right' (only the CSF agrees)
    left_only = np.where(np.isin(truth, (41, 42, 43)), H.lr_swap(truth), truth)
    assert np.array_equal(H.lr_swap(np.flip(truth, 0)), truth)  # a symmetric head
    csf = (truth == 24).sum() / (truth > 0).sum()
    assert H.lr_agreement(left_only, left_only, 0) == pytest.approx(csf)
    ratios = H.lr_volume_ratios(truth)
    assert ratios["Cerebral-White-Matter"] == pytest.approx(1.0) and ratios["Lateral-Ventricle"] == pytest.approx(1.0)
    assert H.lr_volume_ratios(left_only)["Cerebral-White-Matter"] != pytest.approx(1.0)


def test_centroid_baseline_and_shift():
    a = np.arange(27).reshape(3, 3, 3)
    moved = H.shift_into(a, (1, 0, -1), (4, 3, 3))
    assert moved[1, 0, 0] == a[0, 0, 1] and moved[0].sum() == 0 and moved[..., 2].sum() == 0
    truth = np.where(np.isin(tiny_head(), SEGMENTATION_LABELS), tiny_head(), 0)
    padded = np.pad(truth, ((3, 0), (0, 2), (1, 1)))  # same anatomy elsewhere on a bigger grid
    base = H.centroid_baseline(padded, truth)
    assert np.array_equal(base, truth)


def test_plans():
    fams = H.FAMILIES + (H.HU,)
    assert H.conditions(1, fams, "full") == [(f, r) for f in fams for r in H.RESOLUTIONS]
    three = [H.conditions(m, fams, "balanced") for m in range(3)]
    assert all(len(c) == len(fams) for c in three)  # each family once per map
    assert {x for c in three for x in c} == set(H.conditions(0, fams, "full"))  # every cell covered
    assert all(dict(c)["ct"] == dict(c)[H.HU] for c in three)  # HU scored at the CT-like render's resolution


def test_head_hull_counts_dark_skull_inside():
    img = np.zeros((20, 20, 20), np.float32)
    img[4:16, 4:16, 4:16] = 100
    img[6:14, 6:14, 6:14] = 0  # dark inside (skull, sinus)
    img[8:12, 8:12, 8:12] = 80
    hull = H.head_hull(img)
    assert hull[7, 7, 7] and hull[10, 10, 10] and not hull[2, 10, 10] and not hull[18, 18, 18]


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_evaluate_end_to_end_through_predict(head_files, tmp_path):
    model = tiny_model()
    logs = []
    res = H.evaluate(model, head_files, tmp_path / "cache", ("t1", "ct", H.HU), plan="balanced", lr=False, log=logs.append)
    # balanced: each family once per map, every (family, resolution) cell on one of the two maps, HU with CT
    cells = [(r["family"], r["resolution"]) for r in res["rows"]]
    assert sorted(cells) == sorted((f, r) for f in ("t1", "ct", H.HU) for r in H.RESOLUTIONS)
    assert {c for c, r in zip(cells, res["rows"]) if r["subject"] == "a.nii.gz"} == {("t1", "1mm"), ("ct", "5mm"), (H.HU, "5mm")}
    for r in res["rows"]:
        assert 0 <= r["dice_mean"] <= 1 and 0 <= r["brain_dice"] <= 1 and r["outside_head_ml"] >= 0
        assert -1 <= r["anatomy_r"] <= 1
    # the cache holds the 5 mm scans with their spacing and the HU scans as integers
    folder = tmp_path / "cache" / f"{H.CACHE_VERSION}-seed0" / "a"
    assert nib.load(folder / "t1_5mm.nii.gz").header.get_zooms() == (1.0, 1.0, 5.0)
    hu = nib.load(folder / "ct_hu_1mm.nii.gz")
    assert hu.get_data_dtype() == np.int16 and np.asarray(hu.dataobj).min() == -1000
    # both maps are the same anatomy: the baseline finds it exactly
    assert {b["resolution"] for b in res["baseline"]} == {"1mm", "5mm"}
    assert all(b["dice_mean"] == 1.0 and b["outside_head_ml"] == 0 for b in res["baseline"])
    text = H.markdown(res, "images/whole-head.png")
    assert "Whole heads and real scans" in text and "CT (HU)" in text and "baseline" in text
    assert "![whole head](images/whole-head.png)" in text
    png = H.montage(tmp_path / "m.png", res["_examples"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["_examples"][0]["seg"].shape == res["_examples"][0]["image"].shape
    # renders are reused: a second run renders nothing
    logs.clear()
    H.evaluate(model, head_files[:1], tmp_path / "cache", ("t1",), plan="balanced", lr=False, log=logs.append)
    assert not any(m.startswith("rendered") for m in logs)


@pytest.mark.slow
def test_real_head_and_lr_on_small_scans(tmp_path):
    model = tiny_model(1)
    r = H.render_head(tiny_head(), "t1", seed=0)
    t1 = tmp_path / "t1.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(r["image"], np.diag([1.2, 1.2, 1.2, 1])), t1)
    nib.save(nib.Nifti1Image((r["truth"] > 0).astype(np.uint8), np.diag([1.2, 1.2, 1.2, 1])), mask)
    out = H.evaluate_real_head(model, t1, mask, log=lambda m: None)
    assert 0 <= out["brain_dice"] <= 1 and out["mask_ml"] == pytest.approx((r["truth"] > 0).sum() * 1.2**3 / 1000)
    assert out["_example"]["seg"].shape == r["image"].shape
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), bad)
    with pytest.raises(H.BrainIDError, match="not on the grid"):
        H.evaluate_real_head(model, t1, bad)
    lr = H.evaluate_lr(model, image=t1, log=lambda m: None)
    assert 0 <= lr["agreement"] <= 1 and "Cerebral-White-Matter" in lr["volume_ratio"]


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    assert H.cli(["--labels", str(tmp_path / "missing.nii.gz"), "--no-lr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("head_eval: error:") and "missing.nii.gz not found" in err and err.count("\n") == 1
    bad = tmp_path / "notes.json"
    bad.write_text('{"rows_": []}')
    assert H.cli(["--no-lr", "--compare", str(bad)]) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert "notes.json is not a head_eval --json file" in err and err.count("\n") == 1


def _row(subject, family, resolution, dice, anatomy_r=None):
    return {"subject": subject, "family": family, "resolution": resolution, "dice_mean": dice,
            "tissue_mean": dice + 0.05, "brain_dice": 0.9, "anatomy_r": anatomy_r}


def test_compare_pairs_the_same_predictions_and_counts_the_improved_ones():
    before = [_row("a", "t1", "1mm", 0.50, 0.5), _row("a", "t2", "5mm", 0.60, 0.6), _row("b", "ct", "1mm", 0.1)]
    now = [_row("a", "t2", "5mm", 0.55, 0.7), _row("a", "t1", "1mm", 0.60), _row("c", "ct", "1mm", 0.9)]
    lines = H.compare(now, before).splitlines()
    assert lines[0] == "against the comparison file, 2 matched predictions:"  # c and b have no partner
    assert lines[1].split() == ["dice_mean", "0.575", "(was", "0.550,", "+0.025);", "better", "in", "1/2"]
    assert lines[3].split()[-1] == "0/2"  # brain Dice equal: not better
    assert lines[4].split() == ["anatomy_r", "0.700", "(was", "0.600,", "+0.100);", "better", "in", "1/1"]  # only where both have it
    with pytest.raises(H.BrainIDError, match="none of these predictions"):
        H.compare(now[2:], before)


def test_grid_ceiling_is_exact_on_the_scans_own_grid_and_lower_on_a_coarser_one(head_files, tmp_path, benchmark_module):
    """benchmarks/grid_ceiling.py: the truth through the model grid and back, with predict's resampling."""
    G = benchmark_module("grid_ceiling")
    rec = H.render_set(head_files[:1], tmp_path, families=("t1",))[0]
    same = G.ceiling(rec["folder"], 1.0)
    assert same["dice_mean"] == pytest.approx(1.0) and same["anatomy_r"] == pytest.approx(1.0, abs=1e-6)
    coarse = G.ceiling(rec["folder"], 3.0)
    assert 0.5 < coarse["dice_mean"] < 0.99 and 0.8 < coarse["anatomy_r"] < 0.999
