"""bf16 CPU inference: agreement with float32 on a small random model and the shipped sample, the
memory-saving forward kept (bf16 activations), and `auto` choosing float32 unless bf16 is native,
measured equivalent for the model and timed faster (the probe itself: test_bf16_probe.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib.feature_maps as feature_maps
import BrainIDLib.inference as inference
from BrainIDLib.errors import BrainIDError
from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import Architecture, BrainIDModel, _conv_bias_bf16
from BrainIDLib.samples import sample_path
from test_cli import make_scan

CPU = torch.device("cpu")


def small_model(bf16_measured: bool | None = None) -> BrainIDModel:
    torch.manual_seed(0)
    m = BrainIDModel(Architecture(f_maps=8, levels=3), {"segmentation": 33, "anatomy": 1}).eval()
    m.metadata = {"input": {"spacing_mm": [2.0, 2.0, 2.0], "normalisation": {"method": "robust"}},
                  "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}}}
    if bf16_measured is not None:
        m.metadata["input"]["bf16"] = bf16_measured
    return m


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


NO_ONEDNN_BF16 = pytest.mark.skipif(
    _conv_bias_bf16() is None, reason="this CPU has no oneDNN bfloat16 convolution (AVX-512 BW/VL/DQ or "
    "AVX-NE-CONVERT): bfloat16 is emulated there, minutes per volume, and precision auto never picks it")


@NO_ONEDNN_BF16
def test_bf16_agrees_with_fp32_on_the_sample():
    """The shipped default model (brainid-lite, a small trained network) on the shipped sample: the
    network's labels (argmax of the segmentation head on the model grid) and features."""
    import BrainIDLib

    model = BrainIDLib.load_model("brainid-lite")
    scan = inference.prepare_scan(str(sample_path()), model)
    x = scan.prepared.tensor
    out = {p: inference._forward_volume(model, x, ["segmentation"], True, CPU, lambda: None, p) for p in ("fp32", "bf16")}
    n = model.heads["segmentation"].out_channels
    brain = x[0, 0] > 0
    labels = {p: o[:n].argmax(0)[brain] for p, o in out.items()}
    assert len(torch.unique(labels["fp32"])) > 10  # a real segmentation
    assert (labels["fp32"] == labels["bf16"]).float().mean() >= 0.99
    f32, bf16 = out["fp32"][n:], out["bf16"][n:]
    assert not torch.equal(f32, bf16)  # bf16 really ran
    assert corr(f32.numpy(), bf16.numpy()) >= 0.999


def test_bf16_keeps_the_low_memory_forward():
    """Activations stay bfloat16 (half the memory of float32) and the slabbed forward is used; heads
    run in float32 on them."""
    model = small_model()
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), inference._autocast(CPU, "bf16"):
        f = model.features(x)
    assert f.dtype == torch.bfloat16 and f.shape == (1, 8, 32, 32, 32)
    with torch.no_grad():
        ref = model.features(x)
    assert corr(ref.numpy(), f.float().numpy()) >= 0.999
    heads = inference._raw_heads(model, f, x, ["segmentation", "anatomy"])
    assert [h.dtype for h in heads] == [torch.float32, torch.float32]
    with torch.no_grad():  # the float32 head on the bf16 features, in one piece
        whole = model.apply_head("segmentation", f.float())
    torch.testing.assert_close(heads[0], whole)


@pytest.mark.parametrize("shape", [(6, 7, 5), (1, 2, 3), (2, 5, 1), (9, 3, 4)])
def test_bf16_folded_normalisation_is_exact_to_rounding_everywhere(shape):
    """bf16 on the CPU folds GroupNorm's affine into the convolution and adds the shift's border terms
    (faces, edges, corners; axes of 1-3 voxels) afterwards. Inputs offset by 3x their spread (the fold
    cancels the offset inside the convolution; a missing or misplaced border term would be off by about
    the offset) must give the normalised convolution to bf16 rounding at every voxel: whole, and one
    depth row per slab with the output overwriting its input."""
    from BrainIDLib.model import SingleConv, _Activation, _single_conv
    from BrainIDLib.storage import Storage

    torch.manual_seed(3)
    x = (3 + torch.randn(1, 8, *shape)).bfloat16()
    layer = SingleConv(8, 8, 4).eval()
    with torch.no_grad():
        layer.groupnorm.weight.copy_(torch.rand(8) + 0.5)
        layer.groupnorm.bias.copy_(torch.randn(8))
        ref = layer(x.float())
    for slab in (None, 8 * shape[1] * shape[2]):
        storage = Storage(CPU, "ram", slab, memory_format=torch.contiguous_format)
        with torch.no_grad(), inference._autocast(CPU, "bf16"):
            out = _single_conv(layer, [_Activation.store(x, storage)], storage, lambda: None).tensor
        assert out.dtype == torch.bfloat16
        err = (out.float() - ref).abs().max().item()
        assert err <= 0.03 * float(ref.abs().max()), (shape, slab, err)  # (without the border terms: ~1.5x)


def test_auto_is_fp32_unless_native_measured_and_faster(monkeypatch, tmp_path):
    probed = []
    for native, measured, faster, expected in [
            (False, True, True, "fp32"), (True, None, True, "fp32"), (True, False, True, "fp32"),
            (True, True, True, "bf16"), (True, True, False, "fp32"), (False, None, True, "fp32")]:
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(inference, "bf16_faster", lambda m, spacing, autocast, progress, faster=faster: probed.append(m) or faster)
        assert inference.cpu_precision("auto", small_model(measured), CPU) == expected, (native, measured, faster)
    assert len(probed) == 2  # timed only where bf16 is native and measured equivalent
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.cpu_precision("auto", small_model(True), torch.device("cuda")) == "fp32"  # no CPU probe
    assert len(probed) == 2
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.cpu_precision("bf16", small_model(), CPU) == "bf16"  # asked for explicitly: honoured
    # end to end: auto ran float32 (bit-identical to an explicit fp32 run)
    model = small_model(True)
    scan = make_scan(tmp_path / "scan.nii.gz")
    runs = [feature_maps.features(str(scan), model=model, device="cpu", precision=p, on_1mm=True)
            for p in ("auto", "fp32")]
    assert np.array_equal(*(np.asarray(r.dataobj) for r in runs))


def test_precision_values_checked():
    with pytest.raises(BrainIDError, match="auto, fp32 or bf16"):
        inference.cpu_precision("fp16", small_model(), CPU)
    with pytest.raises(BrainIDError, match="CPU"):
        inference.cpu_precision("bf16", small_model(), torch.device("cuda"))
    assert inference.cpu_precision("auto", None, torch.device("cuda")) == "fp32"


def test_cli_precision_flag(tmp_path, capsys):
    from BrainIDLib import cli
    from BrainIDLib.weights import save_model

    path = save_model(small_model(), tmp_path / "small.safetensors")
    scan = make_scan(tmp_path / "scan.nii.gz")
    outs = {}
    for p in ("fp32", "bf16"):
        rc = cli.main(["features", str(scan), "-o", str(tmp_path / f"{p}.nii.gz"), "--model", str(path),
                       "--precision", p, "--progress-format", "none", "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err
        outs[p] = np.asarray(nib.load(tmp_path / f"{p}.nii.gz").dataobj)
    # the flag reaches the network (agreement itself: test_bf16_agrees_with_fp32_on_the_sample)
    assert not np.array_equal(outs["fp32"], outs["bf16"]) and corr(outs["fp32"], outs["bf16"]) >= 0.99
