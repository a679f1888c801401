"""The inference engine: outputs on the input grid, segmentation via probabilities, tiling, errors."""

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib.feature_maps as feature_maps
import BrainIDLib.inference as inf
import BrainIDLib.model as model_mod
from BrainIDLib.errors import BrainIDError, Cancelled
from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.volume import load_volume, prepare
from BrainIDLib.volumes import volumes_table, write_volumes_csv

SMALL = Architecture(f_maps=8, levels=3)
META = {"name": "test", "input": {"spacing_mm": [1.0, 1.0, 1.0], "normalisation": {"method": "minmax", "percentiles": [0, 100]}},
        "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}}}
LPS_OBLIQUE = np.array([[-1.1, 0.1, 0.0, 20.0], [-0.1, -1.1, 0.0, 30.0], [0.0, 0.0, 1.3, -10.0], [0, 0, 0, 1]])


def random_model(heads=None):
    m = BrainIDModel(SMALL, heads or {"segmentation": 33, "anatomy": 1, "super_resolution": 1, "bias_field": 1}).eval()
    m.metadata = {k: (dict(v) if isinstance(v, dict) else v) for k, v in META.items()}
    return m


class IdentityFeatures(BrainIDModel):
    """Features = the input image in channel 0 (zeros elsewhere): a local, exactly known 'network'."""

    def features(self, x, check=None, storage=None):
        f = torch.zeros((x.shape[0], self.arch.f_maps) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        f[:, 0] = x[:, 0]
        return f


def identity_segmenter(centres):
    """Segmentation head whose argmax is the nearest intensity centre: logits_k = 2 c_k x - c_k^2."""
    m = IdentityFeatures(SMALL, {"segmentation": len(centres)}).eval()
    conv = m.heads["segmentation"].conv
    with torch.no_grad():
        conv.weight.zero_()
        c = torch.tensor(centres, dtype=torch.float32)
        conv.weight[:, 0, 0, 0, 0] = 50 * 2 * c
        conv.bias.copy_(-50 * c**2)
    m.metadata = {"input": META["input"], "heads": {"segmentation": {"labels": [0, 17, 53]}}}
    return m


def blocks(shape, seed=0):
    """A label volume of coarse blocks with labels 0,1,2."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=tuple(max(1, s // 4) for s in shape))
    lab = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)
    out = np.zeros(shape, dtype=np.int64)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, lab.shape))
    out[sl] = lab[sl]
    out[0, 0, 0], out[-1, -1, -1] = 0, 2  # both extremes present: min-max maps 0->0, 2->1
    return out


def smooth_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1) + tuple(s // 4 + 1 for s in shape), generator=g)
    x = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x[0, 0].numpy()


# ---------------------------------------------------------------------------- network paths
@pytest.mark.parametrize("slab", [1 << 25, 2000])
def test_low_memory_forward_matches_plain(monkeypatch, slab):
    monkeypatch.setattr(model_mod, "SLAB_ELEMENTS", slab)
    for arch, shape in [(SMALL, (1, 1, 20, 17, 13)), (Architecture(f_maps=16, levels=4, num_groups=4), (1, 1, 24, 31, 16))]:
        m = BrainIDModel(arch).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            a = m.backbone(x)
            b = m.backbone.forward_low_memory(x)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- outputs on grid
def test_predict_outputs_on_the_exact_input_grid():
    shape = (22, 19, 14)
    img = nib.Nifti1Image((smooth_image(shape) * 300).astype(np.int16), LPS_OBLIQUE)
    prog = []
    pred = inf.predict(img, tasks=["segmentation", "anatomy", "super_resolution", "bias_field"], model=random_model(),
                       device="cpu", on_1mm=True, probabilities=True, progress=lambda f, m: prog.append(f))
    assert set(pred.outputs) == {"segmentation", "anatomy", "super_resolution", "bias_field", "bias_corrected"}
    for key, out in pred.outputs.items():
        assert out.shape == shape, key
        assert np.array_equal(out.affine, img.affine), key
        # headers store float32: sform within float32 rounding, qform where representable (no shear here)
        assert np.allclose(out.get_sform(), img.affine, atol=1e-6) and np.allclose(out.get_qform(), img.affine, atol=1e-5)
    assert pred.outputs["segmentation"].get_data_dtype() == np.int16
    assert set(np.unique(pred.outputs["segmentation"].dataobj)) <= set(SEGMENTATION_LABELS)
    for key in ("anatomy", "super_resolution", "bias_field", "bias_corrected"):
        assert pred.outputs[key].get_data_dtype() == np.float32
    bias = pred.outputs["bias_field"].get_fdata()
    assert (bias > 0).all()
    np.testing.assert_allclose(pred.outputs["bias_corrected"].get_fdata(), img.get_fdata() / bias, rtol=1e-5, atol=1e-4)
    probs = pred.probabilities.get_fdata()
    assert probs.shape == shape + (33,)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-4)
    lut = np.array(SEGMENTATION_LABELS)
    agree = (lut[probs.argmax(-1)] == np.asarray(pred.outputs["segmentation"].dataobj)).mean()
    assert agree > 0.999
    assert prog[-1] == 1.0 and all(a <= b for a, b in zip(prog, prog[1:]))
    # the 1 mm grid is RAS with 1 mm voxels
    one = pred.outputs_1mm["segmentation"]
    assert nib.aff2axcodes(one.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.sqrt((one.affine[:3, :3] ** 2).sum(0)), 1, atol=1e-6)


@pytest.mark.parametrize("affine", [
    np.diag([-1.0, -1.0, 1.0, 1.0]),  # LPS 1 mm
    np.array([[-1.0, 0, 0, 5], [0, 0, 1.0, -3], [0, -1.0, 0, 7], [0, 0, 0, 1]]),  # LIA 1 mm
])
def test_segmentation_lands_back_exactly(affine, tmp_path):
    """With a known local 'network', a labelled volume's segmentation must reproduce its labels.
    (Geometry tests turn the clean-up off: their random blocks make many islands per label.)"""
    lab = blocks((20, 16, 12))
    img = nib.Nifti1Image((lab * 50.0 + 10).astype(np.float32), affine)
    pred = inf.predict(img, tasks="segmentation", model=identity_segmenter([0.0, 0.5, 1.0]), device="cpu", cleanup=False)
    seg = np.asarray(pred.outputs["segmentation"].dataobj)
    np.testing.assert_array_equal(seg, np.array([0, 17, 53])[lab])
    assert np.array_equal(pred.outputs["segmentation"].affine, affine)
    # through files: the saved output's affine is bit-identical to the saved input's
    nib.save(img, tmp_path / "in.nii.gz")
    pred = inf.predict(tmp_path / "in.nii.gz", tasks="segmentation", model=identity_segmenter([0.0, 0.5, 1.0]), device="cpu", cleanup=False)
    nib.save(pred.outputs["segmentation"], tmp_path / "seg.nii.gz")
    a, b = nib.load(tmp_path / "in.nii.gz"), nib.load(tmp_path / "seg.nii.gz")
    assert np.array_equal(a.affine, b.affine) and np.array_equal(np.asarray(b.dataobj), seg)


@pytest.mark.parametrize("affine", [
    np.array([[-0.8, 0, 0, 0], [0, -1.3, 0, 0], [0, 0, 1.2, 0], [0, 0, 0, 1]]),  # anisotropic LPS
    LPS_OBLIQUE,
    np.diag([0.9, 0.9, 4.0, 1.0]),  # thick slices
])
def test_segmentation_after_resampling_keeps_the_labels(affine):
    lab = blocks((32, 28, 12) if affine[2, 2] == 4.0 else (28, 24, 20))
    img = nib.Nifti1Image((lab * 50.0 + 10).astype(np.float32), affine)
    pred = inf.predict(img, tasks="segmentation", model=identity_segmenter([0.0, 0.5, 1.0]), device="cpu", cleanup=False, on_1mm=True)
    seg = np.asarray(pred.outputs["segmentation"].dataobj)
    expected = np.array([0, 17, 53])[lab]
    assert seg.shape == lab.shape and np.array_equal(pred.outputs["segmentation"].affine, affine)
    assert (seg == expected).mean() > 0.9  # only voxels at block borders may change
    assert pred.outputs_1mm["segmentation"].shape != lab.shape


# ---------------------------------------------------------------------------- tiling (more in test_tiling.py)
def test_mode_is_chosen_from_the_memory_budget():
    m = random_model({})
    img = nib.Nifti1Image(smooth_image((40, 40, 40)), np.eye(4))
    pred = inf.predict(img, tasks=["anatomy"], model=random_model({"anatomy": 1}), device="cpu", memory_budget_gb=8)
    assert pred.mode == "whole"
    mode, slab = inf.plan_mode(m, (256, 256, 256), torch.device("cpu"), 1 << 30, 33)
    assert mode == "tiled" and inf.estimate_forward_bytes(m, (256, 256, 256), "cpu", 33, slab) <= (1 << 30)


def test_cancel_stops_a_tiled_run():
    img = nib.Nifti1Image(smooth_image((48, 48, 48)), np.eye(4))
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] >= 20

    with pytest.raises(Cancelled):
        inf.predict(img, tasks=["segmentation"], model=random_model(), device="cpu", mode="tiled", memory_budget_gb=0.01,
                    cancel=cancel)
    assert calls["n"] == 20
    assert isinstance(Cancelled("x"), BrainIDError)


def test_progress_is_monotonic_and_reaches_one_when_tiled():
    seen = []
    img = nib.Nifti1Image(smooth_image((40, 36, 32)), np.eye(4))
    pred = inf.predict(img, tasks=["anatomy"], model=random_model(), device="cpu", mode="tiled",
                       progress=lambda f, msg: seen.append((f, msg)))
    assert pred.mode == "tiled"
    fr = [f for f, _ in seen]
    assert fr[-1] == 1.0 and all(a <= b for a, b in zip(fr, fr[1:]))
    assert any("tiled" in m for _, m in seen)


def test_cuda_out_of_memory_falls_back_to_tiles_then_cpu(monkeypatch):
    m = random_model()
    monkeypatch.setattr(BrainIDModel, "to", lambda self, *a, **k: self)
    real = inf._forward_volume
    seen = []

    def fake(model, x, heads, want, device, check, precision="fp32", storage=None):
        seen.append((device.type, storage.kind, storage.slab_elements))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, heads, want, device, check, precision, storage)

    monkeypatch.setattr(inf, "_forward_volume", fake)
    monkeypatch.setattr(inf, "select_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(inf, "release_memory", lambda d: None)
    monkeypatch.setattr(inf, "available_memory_bytes", lambda d: 4 << 30)
    img = nib.Nifti1Image(smooth_image((96, 96, 96)), np.eye(4))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pred = inf.predict(img, tasks=["anatomy"], model=m, device="cuda")
    assert pred.device == "cpu" and pred.outputs["anatomy"].shape == (96, 96, 96)
    assert seen[0] == ("cuda", "device", None)  # whole first
    tiled = [slab for d, kind, slab in seen if d == "cuda" and kind != "device"]  # then tiled, activations in RAM
    assert len(tiled) >= 2 and tiled == sorted(tiled, reverse=True) and tiled[-1] < tiled[0]  # smaller slabs
    assert any("falling back to the CPU" in str(x.message) for x in w)
    assert any("retrying tiled" in msg for msg in pred.messages)


# ---------------------------------------------------------------------------- features / PCA
def test_features_and_pca():
    m = random_model({})
    img = nib.Nifti1Image(smooth_image((24, 20, 16)), np.diag([1.2, 1.2, 1.5, 1]))
    f = feature_maps.features(img, m, device="cpu")
    assert f.shape == (24, 20, 16, SMALL.f_maps) and np.array_equal(f.affine, img.affine)
    p = feature_maps.features(img, m, device="cpu", pca=3)
    d = p.get_fdata()
    assert d.shape == (24, 20, 16, 3) and d.min() >= 0 and d.max() <= 1 and d.std() > 0.05
    one = feature_maps.features(img, m, device="cpu", pca=3, on_1mm=True)
    np.testing.assert_allclose(np.sqrt((one.affine[:3, :3] ** 2).sum(0)), 1, atol=1e-6)
    with pytest.raises(BrainIDError, match="pca"):
        feature_maps.features(img, m, device="cpu", pca=99)


def test_pca_recovers_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 10, 10, 10, generator=g)
    feats = torch.cat([base * 5, base * -3, 0.01 * torch.randn(4, 10, 10, 10, generator=g)])
    pc = feature_maps.pca_channels(feats, 1)[0]
    r = np.corrcoef(pc.reshape(-1).numpy(), base.reshape(-1).numpy())[0, 1]
    assert abs(r) > 0.99


# ---------------------------------------------------------------------------- errors
def test_unknown_and_missing_tasks():
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    with pytest.raises(BrainIDError, match="no task"):
        inf.predict(img, tasks=[], model=random_model(), device="cpu")
    with pytest.raises(BrainIDError, match="unknown task"):
        inf.predict(img, tasks=["parcellation"], model=random_model(), device="cpu")
    with pytest.raises(BrainIDError, match="no segmentation head"):
        inf.predict(img, tasks=["segmentation"], model=random_model({"anatomy": 1}), device="cpu")


def test_predict_reads_task_aliases_from_the_one_task_list():
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    pred = inf.predict(img, tasks="T1, bias", model=random_model(), device="cpu")
    assert list(pred.outputs) == ["anatomy", "bias_field", "bias_corrected"]
    with pytest.raises(BrainIDError, match="unknown task 'pca'"):  # a Slicer view, not a predict output
        inf.predict(img, tasks=["pca"], model=random_model(), device="cpu")


def test_bad_inputs_reach_predict_as_brainid_errors(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(BrainIDError):
        inf.predict(bad, model=random_model(), device="cpu")
    with pytest.raises(BrainIDError, match="constant"):
        inf.predict(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), model=random_model(), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_missing_gpu_is_a_clear_error():
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    with pytest.raises(BrainIDError, match="GPU"):
        inf.predict(img, model=random_model(), device="cuda")


def test_no_model_says_how_to_get_one(monkeypatch):
    import BrainIDLib.registry as registry

    monkeypatch.setattr(registry, "default_model", lambda *a: None, raising=False)
    monkeypatch.setattr(registry, "how_to_get_weights", lambda *a: "no model is available: use --model PATH", raising=False)
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    with pytest.raises(BrainIDError, match="no model"):
        inf.predict(img, model=None, device="cpu")


def test_model_from_a_weights_file_and_head_files(tmp_path):
    from BrainIDLib.weights import save_head, save_model

    m = random_model({"anatomy": 1, "segmentation": 33})
    save_model(m, tmp_path / "m.safetensors")
    save_head(m, "segmentation", tmp_path / "seg.safetensors")
    only_anatomy = random_model({"anatomy": 1})
    save_model(only_anatomy, tmp_path / "a.safetensors")
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    p1 = inf.predict(img, ["segmentation"], model=str(tmp_path / "m.safetensors"), device="cpu")
    p2 = inf.predict(img, ["segmentation"], model=str(tmp_path / "a.safetensors"), device="cpu",
                     heads={"segmentation": tmp_path / "seg.safetensors"})
    p3 = inf.predict(img, ["segmentation"], model=only_anatomy, device="cpu", heads={"segmentation": tmp_path / "seg.safetensors"})
    assert p1.outputs["segmentation"].shape == (16, 16, 16)
    assert p2.labels == tuple(SEGMENTATION_LABELS) and p3.labels == tuple(SEGMENTATION_LABELS)
    np.testing.assert_array_equal(np.asarray(p2.outputs["segmentation"].dataobj), np.asarray(p3.outputs["segmentation"].dataobj))


# ---------------------------------------------------------------------------- volumes table
def test_volumes_table(tmp_path):
    lab = np.zeros((10, 10, 10), np.int16)
    lab[:2] = 17
    lab[5:] = 53
    img = nib.Nifti1Image(lab, np.diag([2.0, 1.0, 1.0, 1]))  # 2 mm^3 voxels
    rows = volumes_table(img)
    assert [(r.label, r.name, r.voxels) for r in rows] == [(17, "Left-Hippocampus", 200), (53, "Right-Hippocampus", 500)]
    assert rows[0].ml == pytest.approx(0.4) and rows[1].ml == pytest.approx(1.0)
    rows = volumes_table(img, labels=[0, 17, 18], include_background=True)
    assert [r.voxels for r in rows] == [300, 200, 0]
    write_volumes_csv(rows, tmp_path / "v.csv")
    text = (tmp_path / "v.csv").read_text().splitlines()
    assert text[0] == "label,name,voxels,volume_ml" and text[2].startswith("17,Left-Hippocampus,200,0.4")


def test_prepare_pads_to_the_network_multiple():
    vol = load_volume(nib.Nifti1Image(smooth_image((21, 19, 17)), np.eye(4)))
    prep = prepare(vol, [1, 1, 1], None, multiple=16)
    assert all(s % 16 == 0 for s in prep.tensor.shape[2:]) and prep.grid_shape == (21, 19, 17)


def test_cpu_out_of_memory_is_a_clear_error(monkeypatch):
    def fake(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")

    monkeypatch.setattr(inf, "_forward_volume", fake)
    img = nib.Nifti1Image(smooth_image((16, 16, 16)), np.eye(4))
    with pytest.raises(BrainIDError, match="out of memory"):
        inf.predict(img, "anatomy", model=random_model(), device="cpu")


def test_empty_padding_is_background_whatever_the_network_says():
    """Skull-stripped scans sit in zero padding the network never saw in training: labels there are
    noise, so predict() sets voxels at the image's minimum to background when they fill >= 5% of it."""
    lab = blocks((24, 20, 16), seed=3)
    lab[lab == 0] = 1  # inside: labels 1 and 2 only
    img = (lab * 0.5).astype(np.float32)
    img[:4], img[-4:] = 0.0, 0.0  # a 4-voxel zero slab on both ends: 33% of the volume
    # intensity 0 -> label 17, 0.5 -> 53, 1.0 -> 0: without the rule the padding would be 17
    m = identity_segmenter([1.0, 0.0, 0.5])
    pred = inf.predict(nib.Nifti1Image(img, np.eye(4)), tasks="segmentation", model=m, device="cpu", cleanup=False, on_1mm=True)
    seg = np.asarray(pred.outputs["segmentation"].dataobj)
    assert (seg[img == 0] == 0).all()
    inner = np.zeros_like(img, dtype=bool)
    inner[5:-5] = True
    assert (seg[inner] == np.array([17, 53, 0])[lab[inner]]).mean() > 0.9
    assert (np.asarray(pred.outputs_1mm["segmentation"].dataobj)[:3] == 0).all()
    # a few dark voxels (< 5%) are tissue, not padding: they keep the network's label
    img2 = (lab * 0.5).astype(np.float32)
    img2[0, 0, :5] = 0.0
    seg2 = np.asarray(inf.predict(nib.Nifti1Image(img2, np.eye(4)), tasks="segmentation", model=m, device="cpu", cleanup=False).outputs["segmentation"].dataobj)
    assert (seg2[0, 0, :5] == 17).all()
    assert inf.padding_mask(img2) is None and inf.padding_mask(img).mean() > 0.3


def _brain_fitted_anatomy(fade):
    """identity_segmenter's classes (0 air, 17, 53 brain) plus an anatomy head that outputs 1 everywhere,
    as a head fitted on brain voxels only would paint the air (metadata brain_fade as the export writes it)."""
    seg = identity_segmenter([0.0, 0.5, 1.0])
    m = IdentityFeatures(SMALL, {"segmentation": 3, "anatomy": 1}).eval()
    m.heads["segmentation"].load_state_dict(seg.heads["segmentation"].state_dict())
    with torch.no_grad():
        m.heads["anatomy"].conv.weight.zero_()
        m.heads["anatomy"].conv.bias.fill_(1.0)
    m.metadata = {"input": META["input"], "heads": {"segmentation": {"labels": [0, 17, 53]}}}
    if fade:
        m.metadata["heads"]["anatomy"] = {"brain_fade": fade}
    return m


def test_a_brain_fitted_anatomy_head_fades_to_zero_outside_the_brain():
    data = np.zeros((16, 12, 10), np.float32)
    data[4:12, 3:9, 2:8] = 1.0  # the "brain"; the rest is air
    data[4:12, 3:9, 5:8] = 0.5
    img = nib.Nifti1Image(data, np.eye(4))
    run = lambda m, tasks, **kw: inf.predict(img, tasks=tasks, model=m, device="cpu", cleanup=False, **kw)
    plain = np.asarray(run(_brain_fitted_anatomy(None), ["anatomy"]).outputs["anatomy"].dataobj)
    np.testing.assert_allclose(plain, 1.0, atol=1e-6)  # without the flag: the head as it is, air included
    model = _brain_fitted_anatomy(0.25)
    alone = run(model, ["anatomy"], keep_features=True)
    assert set(alone.outputs) == {"anatomy"}  # the segmentation head ran for the fade but is not an output
    anat = np.asarray(alone.outputs["anatomy"].dataobj)
    assert np.abs(anat[data == 0]).max() < 1e-3 and np.abs(anat[data > 0] - 1).max() < 1e-3
    both = run(model, ["segmentation", "anatomy"])
    np.testing.assert_allclose(np.asarray(both.outputs["anatomy"].dataobj), anat, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(both.outputs["segmentation"].dataobj) > 0, data > 0)
    feats = np.asarray(alone.features_1mm.dataobj)  # the features, not the extra segmentation channels
    assert feats.shape[-1] == SMALL.f_maps and np.abs(feats[..., 1:]).max() == 0
    np.testing.assert_allclose(feats[..., 0], data, atol=1e-5)
