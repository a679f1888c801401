"""Exact tiling: activations in CPU RAM or on disk, depth slabs through the device, same numbers."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib.inference as inf
from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import Architecture, BrainIDModel, activation_peak_bytes, widest_slab_row
from BrainIDLib.storage import Storage

from test_model import _randomise

ARCH = Architecture(f_maps=8, levels=3, num_groups=4)
META = {"name": "test", "input": {"spacing_mm": [1.0, 1.0, 1.0], "normalisation": {"method": "minmax", "percentiles": [0, 100]}},
        "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}}}


def random_model(heads=None, seed=0):
    """Random weights with non-trivial GroupNorm affine parameters (so the comparison exercises them)."""
    torch.manual_seed(seed)
    m = _randomise(BrainIDModel(ARCH, heads or {}).eval())
    m.metadata = {k: (dict(v) if isinstance(v, dict) else v) for k, v in META.items()}
    return m


def smooth_volume(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1) + tuple(s // 4 + 1 for s in shape), generator=g)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def brainid_mappings() -> list[str]:
    """This process's mapped activation files (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if "brainid-" in line and ".activations" in line]


@pytest.fixture(scope="module")
def model_and_whole():
    m = random_model()
    x = smooth_volume((28, 22, 19), seed=1) * 2 - 0.5
    with torch.no_grad():
        whole = m.backbone.forward_low_memory(x)
        plain = m.backbone(x)
    torch.testing.assert_close(whole, plain, rtol=1e-4, atol=1e-4)
    return m, x, whole


@pytest.mark.parametrize("kind", ["ram", "disk"])
@pytest.mark.parametrize("slab", [3000, 700, 1])  # 3000: a few rows per slab; 1: one row per slab everywhere
def test_tiled_forward_equals_the_whole_volume(model_and_whole, kind, slab, tmp_path):
    m, x, whole = model_and_whole
    storage = Storage("cpu", kind, slab, directory=tmp_path)
    calls = []
    with torch.no_grad():
        tiled = m.backbone.forward_low_memory(x, lambda: calls.append(1), storage)
    assert len(calls) > 3 * 12  # many slabs per layer (12 convolutions)
    err = float((tiled - whole).abs().max() / whole.abs().max())
    assert err <= 1e-4, err
    assert tiled.device.type == "cpu" and tiled.shape == whole.shape
    assert storage.peak_bytes > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["device", "disk"])
def test_both_activation_layouts_give_the_same_features(model_and_whole, kind, tmp_path):
    # the CPU keeps activations channels-last (depth slabs are contiguous blocks); GPUs keep (N, C, D, H, W):
    # run that layout here too, tiled, so its code paths (moments, upsampling gather) are checked on the CPU
    m, x, whole = model_and_whole
    last = Storage("cpu", kind, 700, directory=tmp_path)
    plain = Storage("cpu", kind, 700, directory=tmp_path, memory_format=torch.contiguous_format)
    assert last.memory_format == torch.channels_last_3d
    stored = last.empty((1, 3, 4, 5, 6), torch.float32)
    assert stored.is_contiguous(memory_format=torch.channels_last_3d) and stored[:, :, 1:3].is_contiguous(memory_format=torch.channels_last_3d)
    assert plain.empty((1, 3, 4, 5, 6), torch.float32).is_contiguous()
    assert last.empty((1, 3, 4, 5, 6), torch.bfloat16).is_contiguous()  # bf16 convolutions prefer (N, C, D, H, W)
    del stored
    with torch.no_grad():
        a = m.backbone.forward_low_memory(x, None, last)
        b = m.backbone.forward_low_memory(x, None, plain)
    assert a.is_contiguous(memory_format=torch.channels_last_3d) and b.is_contiguous()
    for out in (a, b):
        assert float((out - whole).abs().max() / whole.abs().max()) <= 1e-4


def test_disk_storage_is_mapped_files_that_never_outlive_the_run(tmp_path):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    m = random_model()
    x = smooth_volume((24, 16, 16))
    seen = []

    def check():  # during the run: activations are mapped files whose names are already gone
        seen.append((len(brainid_mappings()), list(tmp_path.iterdir())))

    with torch.no_grad():
        out = m.backbone.forward_low_memory(x, check, Storage("cpu", "disk", 2000, directory=tmp_path))
    assert max(n for n, _ in seen) >= 2 and all(files == [] for _, files in seen)
    assert all("(deleted)" in line for line in brainid_mappings())
    del out
    assert brainid_mappings() == []

    class Stop(Exception):
        pass

    def cancel():
        if len(brainid_mappings()) >= 3:
            raise Stop
    with pytest.raises(Stop), torch.no_grad():
        m.backbone.forward_low_memory(x, cancel, Storage("cpu", "disk", 2000, directory=tmp_path))
    assert brainid_mappings() == [] and list(tmp_path.iterdir()) == []


def test_storage_estimate_matches_what_the_forward_allocates():
    for arch, shape in [(ARCH, (32, 24, 16)), (Architecture(f_maps=6, levels=4, num_groups=3), (33, 17, 20))]:
        m = BrainIDModel(arch).eval()
        storage = Storage("cpu", "ram")
        with torch.no_grad():
            m.backbone.forward_low_memory(torch.rand((1, 1) + shape), None, storage)
        assert storage.peak_bytes == activation_peak_bytes(arch, shape, 4), arch


def test_planner_tiles_when_the_budget_is_short():
    big = BrainIDModel(Architecture(), {"segmentation": 33})
    head = (208, 240, 192)
    cpu = torch.device("cpu")
    assert inf.plan_mode(big, head, cpu, 64 << 30, 33) == ("whole", None)
    mode, slab = inf.plan_mode(big, head, cpu, 3 << 30, 33)
    assert mode == "tiled" and widest_slab_row(big.arch, head) <= slab <= inf.SLAB_ELEMENTS
    fixed = inf._weights_bytes(big) + inf.RUNTIME_BYTES
    assert fixed + inf.estimate_forward_bytes(big, head, cpu, 33, slab) <= 3 << 30
    # a tighter budget gives smaller slabs, never under one row of the widest layer
    _, tight = inf.plan_mode(big, head, cpu, 1 << 30, 33)
    assert widest_slab_row(big.arch, head) <= tight < slab
    assert inf.tile_plan(big, head, cpu, 1 << 20) == widest_slab_row(big.arch, head)


def test_predict_tiled_on_disk_gives_the_whole_volume_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    m = random_model({"segmentation": 33, "anatomy": 1})
    img = nib.Nifti1Image((smooth_volume((30, 26, 21), seed=3)[0, 0].numpy() * 200).astype(np.float32), np.eye(4))
    whole = inf.predict(img, ["segmentation", "anatomy"], model=m, device="cpu", mode="whole", flip_average=False)
    messages = []
    tiled = inf.predict(img, ["segmentation", "anatomy"], model=m, device="cpu", memory_budget_gb=0.01, flip_average=False,
                        progress=lambda f, msg: messages.append(msg))
    assert whole.mode == "whole" and tiled.mode == "tiled"
    assert any("tiled (activations on disk" in msg for msg in messages)
    np.testing.assert_array_equal(np.asarray(tiled.outputs["segmentation"].dataobj),
                                  np.asarray(whole.outputs["segmentation"].dataobj))
    a, b = whole.outputs["anatomy"].get_fdata(), tiled.outputs["anatomy"].get_fdata()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert list(tmp_path.iterdir()) == []


def test_whole_volume_statistics_stay_exact_on_a_real_sized_volume():
    # GroupNorm statistics gathered over millions of voxels per channel: a float32 running sum (GroupNorm's own
    # kernel on channels-last data) drifts to ~5e-5 here; the low-memory forward must match the plain one
    from BrainIDLib import load_model
    from BrainIDLib.samples import sample_path

    model = load_model("brainid-lite")
    x = inf.prepare_scan(str(sample_path()), model).prepared.tensor
    with torch.no_grad():
        plain = model.backbone(x)
        low = model.backbone.forward_low_memory(x)
    assert float((low - plain).abs().max() / plain.abs().max()) < 5e-6


def test_moments_stay_exact_when_the_slab_layout_changes():
    """A convolution's output slabs need not share a memory layout (oneDNN picks it per shape: on the shipped
    model, a 28-row channels-last slab was followed by a 12-row contiguous one). The moments summed
    deviations from a pilot for the one and plain values for the other, and GroupNorm normalised the next
    layer with the wrong statistics (tiled features off by up to 6 of 180 at 1M-value slabs)."""
    from BrainIDLib.model import _Moments

    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 5, 9, 6, 7, generator=g, dtype=torch.float64).float() * torch.arange(1, 6).view(1, 5, 1, 1, 1) + 40
    exact_mean, exact_sq = t.double().mean((0, 2, 3, 4)), (t.double() ** 2).mean((0, 2, 3, 4))
    last = lambda s: s.contiguous(memory_format=torch.channels_last_3d)
    for layouts in ((last, torch.Tensor.contiguous), (torch.Tensor.contiguous, last), (last, torch.Tensor.contiguous, last)):
        m = _Moments()
        bounds = [0, 4, 6, 9] if len(layouts) == 3 else [0, 4, 9]
        for layout, lo, hi in zip(layouts, bounds, bounds[1:]):
            slab = layout(t[:, :, lo:hi])
            assert slab.is_contiguous() == (layout is torch.Tensor.contiguous)
            m.add(slab)
        mean, sq = m.mean_sq()
        torch.testing.assert_close(mean, exact_mean, rtol=1e-6, atol=0)  # float32 sums inside: ~1e-7
        torch.testing.assert_close(sq, exact_sq, rtol=1e-6, atol=0)


def test_tiled_shipped_model_matches_whole_at_any_slab_size():
    """The shipped model on the sample, at slab sizes whose convolutions change output layout between slabs."""
    from BrainIDLib import load_model
    from BrainIDLib.samples import sample_path

    model = load_model("brainid-lite")
    x = inf.prepare_scan(str(sample_path()), model).prepared.tensor
    cpu = torch.device("cpu")
    whole = inf._forward_volume(model, x, [], True, cpu, lambda: None)
    tiled = inf._forward_volume(model, x, [], True, cpu, lambda: None, "fp32", Storage(cpu, "ram", 1 << 20))
    assert float((tiled - whole).abs().max() / whole.abs().max()) < 5e-6
