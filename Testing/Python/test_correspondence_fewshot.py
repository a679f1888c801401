"""Anatomical correspondence and few-shot heads (BrainIDLib.correspondence / .fewshot + CLI).

Machinery tests use a tiny random model on small volumes. Quality tests (slow) use the shipped
brainid-lite on the shipped MNI152 sample and a known-answer copy of it: re-contrasted (T2-like,
the brain's intensities inverted) and moved by a known rigid transform onto a new 2 mm grid
(BrainIDLib.demo_pairs), so the true location of every point is known.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib import cli
from BrainIDLib.correspondence import (FeatureCache, FeatureMap, compute_feature_map, find_correspondence,
                                       similarity_map)
from BrainIDLib.errors import BrainIDError
from BrainIDLib.fewshot import FewShotHead, negative_mask, segment, train_head
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.volume import make_nifti
from BrainIDLib.weights import save_model


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)


def tiny(seed=0):
    torch.manual_seed(seed)
    model = BrainIDModel(Architecture(f_maps=8, levels=3))
    model.metadata = {"name": f"tiny-{seed}", "input": {"spacing_mm": [2.0, 2.0, 2.0],
                                                       "normalisation": {"method": "minmax", "percentiles": [0, 100]}}}
    return model.eval()


def blob_image(shape=(30, 34, 28), spacing=2.0, seed=0):
    """Smooth random blobs inside an ellipsoid, plus its two-class label map."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    ijk = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    inside = sum(((ijk[i] - c[i]) / (0.42 * shape[i])) ** 2 for i in range(3)) < 1
    img = np.where(inside, 0.2 + a, 0).astype(np.float32)
    lab = np.where(inside, np.where(a > 0.5, 2, 1), 0).astype(np.int16)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30, -34, -20]
    return make_nifti(img, affine), make_nifti(lab, affine, np.int16)


# ------------------------------------------------------------------------------- machinery
def test_feature_map_grid_norm_and_cache(tmp_path):
    model = tiny()
    img, _ = blob_image()
    cache = FeatureCache(tmp_path / "features", max_memory_gb=1.0)
    fm = compute_feature_map(img, model=model, cache=cache)
    assert fm.features.dtype == torch.float16
    assert tuple(fm.features.shape) == (8,) + tuple(fm.shape)
    norms = fm.features.float().norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    assert fm.source_shape == img.shape and np.allclose(fm.source_affine, img.affine)
    assert compute_feature_map(img, model=model, cache=cache) is fm  # memory hit
    assert cache.hits == 1
    fresh = FeatureCache(tmp_path / "features")  # another process: the file on disk
    again = compute_feature_map(img, model=model, cache=fresh)
    assert fresh.disk_hits == 1 and torch.equal(again.features, fm.features)
    assert np.allclose(again.affine, fm.affine) and again.prepared is not None
    # other weights: a different key, recomputed
    other = compute_feature_map(img, model=tiny(seed=1), cache=fresh)
    assert other.model_hash != fm.model_hash and fresh.misses == 1


def test_memory_budget_evicts_oldest():
    model = tiny()
    cache = FeatureCache(None, max_memory_gb=1.5 * 8 * 30 * 34 * 28 * 2 / (1 << 30))  # room for one map
    a = compute_feature_map(blob_image(seed=0)[0], model=model, cache=cache)
    compute_feature_map(blob_image(seed=1)[0], model=model, cache=cache)
    assert len(cache) == 1 and cache.memory_bytes <= cache.max_memory_bytes
    assert compute_feature_map(blob_image(seed=0)[0], model=model, cache=cache) is not a


def test_similarity_map_on_target_grid_and_self_match():
    model = tiny()
    img, _ = blob_image()
    fm = compute_feature_map(img, model=model)
    point = np.array([0.0, 0.0, 6.0])
    heat = similarity_map(fm, point, fm)
    assert heat.shape == img.shape and np.allclose(heat.affine, img.affine)
    assert heat.get_data_dtype() == np.float32
    data = np.asarray(heat.dataobj)
    assert data.max() <= 1.001 and data.min() >= -1.001
    grid = similarity_map(fm, point, fm, on_source_grid=False)
    assert grid.shape == fm.shape
    (match,) = find_correspondence(fm, point, [fm])
    assert match.similarity > 0.99 and match.target_index == 0
    assert np.linalg.norm(match.point_ras - point) <= 2 * 2.0  # within 2 voxels of itself


def test_point_outside_the_source_is_a_clear_error():
    fm = compute_feature_map(blob_image()[0], model=tiny())
    with pytest.raises(BrainIDError, match="outside the source volume"):
        find_correspondence(fm, (500.0, 0.0, 0.0), [fm])


def test_negatives_are_unpainted_voxels_of_painted_slices():
    lab = np.zeros((10, 12, 8), np.int16)
    lab[2:5, 6, 2:5] = 1  # painted in one coronal slice (axis 1)
    neg = negative_mask(lab)
    assert neg[:, 6, :].sum() == 10 * 8 - 9
    assert neg.sum() == neg[:, 6, :].sum()  # no other slice
    assert not (neg & (lab > 0)).any()


def test_head_round_trip_and_backbone_check(tmp_path):
    model = tiny()
    img, lab = blob_image()
    paint = np.asarray(lab.dataobj).copy()
    paint[:, :, :10] = 0
    paint[:, :, 18:] = 0
    head = train_head([img], [make_nifti(paint, img.affine, np.int16)], names={1: "Outer", 2: "Bright"},
                      colors={2: (1, 2, 3)}, model=model, steps=50, name="blobs")
    assert head.labels == [1, 2] and head.names == ["Outer", "Bright"] and head.colors[1] == (1, 2, 3)
    assert head.backbone["name"] == "tiny-0" and len(head.backbone["sha256"]) == 64
    path = head.save(tmp_path / "blobs.safetensors")
    assert path.stat().st_size < 20_000
    back = FewShotHead.load(path)
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert (back.labels, back.names, back.colors, back.name) == (head.labels, head.names, head.colors, "blobs")
    assert back.training["voxels"] == head.training["voxels"]
    seg = segment(img, back, model=model)
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine) and seg.get_data_dtype() == np.int16
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    seg2, probs = segment(img, back, model=model, probabilities=True)
    assert probs.shape == img.shape + (3,) and np.array_equal(np.asarray(seg2.dataobj), np.asarray(seg.dataobj))
    with pytest.raises(BrainIDError, match="trained on backbone tiny-0"):
        segment(img, back, model=tiny(seed=1))
    with pytest.raises(BrainIDError, match="feature channels"):
        segment(img, back, model=BrainIDModel(Architecture(f_maps=16, levels=3)))
    (tmp_path / "junk.safetensors").write_bytes(b"not a head")
    with pytest.raises(BrainIDError, match="not a BrainID few-shot head"):
        FewShotHead.load(tmp_path / "junk.safetensors")


def test_background_label_gives_explicit_negatives():
    model = tiny()
    img, lab = blob_image()
    paint = np.zeros(img.shape, np.int16)
    paint[12:16, 14:18, 12:16] = 1
    paint[0:3, 0:3, 0:3] = 9
    head = train_head([img], [make_nifti(paint, img.affine, np.int16)], names={1: "Core", 9: "background"},
                      model=model, steps=20)
    assert head.labels == [1] and head.training["voxels"] == {"none": 27, "1": 64}
    with pytest.raises(BrainIDError, match="no painted voxel"):
        train_head([img], [make_nifti(np.zeros(img.shape, np.int16), img.affine, np.int16)], model=model)


# ------------------------------------------------------------------------------------- CLI
def _cli_files(tmp_path):
    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=8, levels=3))
    model.metadata = {"name": "tiny-cli", "input": {"spacing_mm": [2.0, 2.0, 2.0]}}
    weights = save_model(model, tmp_path / "tiny.safetensors")
    scans = tmp_path / "scans"
    scans.mkdir()
    img, lab = blob_image()
    nib.save(img, scans / "a.nii.gz")
    nib.save(blob_image(seed=3)[0], scans / "b.nii.gz")
    paint = np.asarray(lab.dataobj).copy()
    paint[:, :15] = 0
    paint[:, 16:] = 0
    nib.save(make_nifti(paint, img.affine, np.int16), tmp_path / "a_paint.nii.gz")
    return weights, scans


def test_cli_correspond_writes_heatmaps_and_json(tmp_path, capsys):
    weights, scans = _cli_files(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["correspond", "--source", str(scans / "a.nii.gz"), "--point", "0,0,6", "--target", str(scans),
                   "--out", str(out), "--model", str(weights), "--progress-format", "machine"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "OUTPUT correspondence" in text and text.count("INFO match") == 2
    record = json.loads((out / "correspondence.json").read_text())
    assert record["point_ras"] == [0.0, 0.0, 6.0] and len(record["matches"]) == 2
    for m in record["matches"]:
        heat = nib.load(m["heatmap"])
        assert heat.shape == nib.load(m["target"]).shape and len(m["point_ras"]) == 3
    assert (out / "a_similarity.nii.gz").is_file() and (out / "b_similarity.nii.gz").is_file()
    assert list((tmp_path / "cache" / "features").glob("*.safetensors"))  # on-disk cache by default
    rc = cli.main(["correspond", "--source", str(scans / "a.nii.gz"), "--point", "900,0,0", "--target",
                   str(scans / "b.nii.gz"), "--out", str(out), "--model", str(weights), "--progress-format", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the source volume" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["correspond", "--source", str(scans / "a.nii.gz"), "--point", "1,2", "--target",
                     str(scans), "--out", str(out), "--model", str(weights)]) == 2


def test_cli_fewshot_train_and_apply(tmp_path, capsys):
    weights, scans = _cli_files(tmp_path)
    head = tmp_path / "blobs.safetensors"
    rc = cli.main(["fewshot", "train", "--image", str(scans / "a.nii.gz"), "--annotation", str(tmp_path / "a_paint.nii.gz"),
                   "--names", "1=Outer,2=Bright", "--out", str(head), "--name", "blobs", "--model", str(weights),
                   "--steps", "30", "--feature-cache", "off", "--progress-format", "machine"])
    assert rc == 0 and f"OUTPUT head {head}" in capsys.readouterr().out
    assert FewShotHead.load(head).names == ["Outer", "Bright"]
    out = tmp_path / "seg"
    rc = cli.main(["fewshot", "apply", "--head", str(head), "--input", str(scans), "--output", str(out),
                   "--model", str(weights), "--progress-format", "machine"])
    assert rc == 0
    assert capsys.readouterr().out.count("OUTPUT segmentation") == 2
    seg = nib.load(out / "b_blobs.nii.gz")
    assert seg.shape == nib.load(scans / "b.nii.gz").shape and (out / "a_blobs.nii.gz").is_file()
    assert cli.main(["fewshot", "apply", "--head", str(scans / "a.nii.gz"), "--input", str(scans), "--output", str(out)]) == 2
    assert "not a BrainID few-shot head" in capsys.readouterr().err
    assert cli.main(["fewshot", "train", "--image", str(scans / "a.nii.gz"), "--annotation", str(tmp_path / "a_paint.nii.gz"),
                     "--names", "one", "--out", str(head), "--model", str(weights)]) == 2
