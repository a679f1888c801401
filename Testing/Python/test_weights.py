"""Weights I/O: the official checkpoint layout (made here with random weights), safe loading,
strict key/shape checks, official downstream head files, our safetensors format."""

from __future__ import annotations

import argparse
import math
import pickle

import pytest
import torch

import BrainIDLib as bid
from BrainIDLib import weights
from BrainIDLib.errors import BrainIDError
from BrainIDLib.model import Architecture, BrainIDModel

# Facts of the released brain_id_pretrained.pth (from the official state-dict key list):
# every SingleConv is GroupNorm(in) -> Conv3d(in, out, 3x3x3, no bias); (in, out) per conv below,
# plus the anatomy head `head.final_conv_image` (1x64x1x1x1 + bias). 65,870,051 parameters.
OFFICIAL_CONVS = {
    "encoders.0": [(1, 32), (32, 64)],
    "encoders.1": [(64, 64), (64, 128)],
    "encoders.2": [(128, 128), (128, 256)],
    "encoders.3": [(256, 256), (256, 512)],
    "encoders.4": [(512, 512), (512, 1024)],
    "decoders.0": [(1536, 512), (512, 512)],
    "decoders.1": [(768, 256), (256, 256)],
    "decoders.2": [(384, 128), (128, 128)],
    "decoders.3": [(192, 64), (64, 64)],
}
OFFICIAL_PARAMS = 65_870_051
# Downstream head files (no `head.` prefix): seg 33 classes from 64 features; super-resolution and
# bias field see [64 features, image] = 65 channels.
OFFICIAL_HEADS = {
    "segmentation": {"final_conv_seg.weight": (33, 64, 1, 1, 1), "final_conv_seg.bias": (33,)},
    "anatomy": {"final_conv_image.weight": (1, 64, 1, 1, 1), "final_conv_image.bias": (1,)},
    "super_resolution": {"final_conv_image.weight": (1, 65, 1, 1, 1), "final_conv_image.bias": (1,)},
    "bias_field": {"final_conv_bias_field_log.weight": (1, 65, 1, 1, 1), "final_conv_bias_field_log.bias": (1,)},
}


def official_key_shapes() -> dict[str, tuple]:
    shapes = {}
    for module, convs in OFFICIAL_CONVS.items():
        for i, (cin, cout) in enumerate(convs, start=1):
            base = f"backbone.{module}.basic_module.SingleConv{i}"
            shapes[f"{base}.groupnorm.weight"] = (cin,)
            shapes[f"{base}.groupnorm.bias"] = (cin,)
            shapes[f"{base}.conv.weight"] = (cout, cin, 3, 3, 3)
    shapes["head.final_conv_image.weight"] = (1, 64, 1, 1, 1)
    shapes["head.final_conv_image.bias"] = (1,)
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def official_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(task="feat-anat", num_groups=8, f_maps=64, lr=1e-4, out_dir="/out", **extra)


def save_official(path, state: dict, **extra) -> None:
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "args": official_args(), "best_val_stats": None, **extra},
               path)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A full-size official-layout checkpoint with random weights (~263 MB)."""
    path = tmp_path_factory.mktemp("official") / "brain_id_pretrained.pth"
    state = random_state(weights.official_shapes())
    save_official(path, state)
    return path, state


def test_official_key_list_matches_architecture():
    expected = official_key_shapes()
    assert sum(math.prod(s) for s in expected.values()) == OFFICIAL_PARAMS
    found = weights.official_shapes(Architecture())
    assert list(found) == list(expected)  # same keys, same order
    assert found == expected
    model = BrainIDModel(Architecture(), heads={"anatomy": 1})
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS


@pytest.mark.slow
def test_official_checkpoint_loads_with_weights_only(official_file, monkeypatch):
    path, state = official_file
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = bid.load_model(path)
    assert calls and all(c is True for c in calls)
    assert model.arch == Architecture(64, 5, 8, 1)
    assert model.tasks == ["anatomy"]
    sd = model.state_dict()
    for k, v in state.items():
        ours = "heads.anatomy." + k[len("head."):] if k.startswith("head.") else k
        assert torch.equal(sd[ours], v), k
    assert model.metadata["official_args"]["task"] == "feat-anat"


@pytest.mark.slow
def test_official_downstream_heads_load(official_file, tmp_path):
    path, _ = official_file
    files, states = {}, {}
    for task in ("segmentation", "super_resolution", "bias_field"):
        states[task] = random_state(OFFICIAL_HEADS[task], seed=len(task))
        files[task] = tmp_path / f"{task}.pth"
        # segmentation as a bare state dict, the others wrapped like the official training code
        torch.save(states[task] if task == "segmentation" else {"model": states[task], "epoch": 1}, files[task])
    model = bid.load_model(path, heads=files)
    assert set(model.tasks) == {"anatomy", "segmentation", "super_resolution", "bias_field"}
    assert model.heads["segmentation"].out_channels == 33
    assert model.metadata["heads"]["segmentation"]["labels"][:3] == [0, 14, 15]
    feats = torch.randn(1, 64, 3, 3, 3)
    image = torch.randn(1, 1, 3, 3, 3)
    for task, state in states.items():
        key = next(iter(state)).rsplit(".", 1)[0]
        w, b = state[f"{key}.weight"], state[f"{key}.bias"]
        inp = torch.cat([feats, image], 1) if w.shape[1] == 65 else feats
        with torch.no_grad():
            got = model.apply_head(task, feats, image)
        torch.testing.assert_close(got, torch.nn.functional.conv3d(inp, w, b))


def test_narrow_official_checkpoint_infers_width_and_depth(tmp_path):
    arch = Architecture(f_maps=16, levels=4)
    path = tmp_path / "narrow.pth"
    save_official(path, random_state(weights.official_shapes(arch)))
    model = bid.load_model(path)
    assert (model.arch.f_maps, model.arch.levels) == (16, 4)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert model.features(x).shape == (1, 16, 16, 16, 16)
        assert model.head_output(x, "anatomy").shape == (1, 1, 16, 16, 16)


def _side_effect(marker: str) -> dict:
    with open(marker, "w") as f:
        f.write("pwned")
    return {}


class Payload:
    """Unpickling this runs _side_effect: it must never happen when BrainID reads a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_arbitrary_pickled_object_is_refused_without_running(tmp_path):
    arch = Architecture(f_maps=8, levels=3)
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    save_official(path, random_state(weights.official_shapes(arch)), extra=Payload(marker))
    with pytest.raises(BrainIDError, match="will not unpickle for safety"):
        bid.load_model(path)
    assert not marker.exists(), "the payload's code ran during loading"
    with pytest.raises(BrainIDError, match="will not unpickle"):
        weights.read_head(path, "segmentation", 8)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it (proves the check above means something)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(BrainIDError):
        bid.load_model(path)
    assert not marker.exists()


def test_strict_mismatch_names_every_problem(tmp_path):
    arch = Architecture(f_maps=8, levels=3)
    state = random_state(weights.official_shapes(arch))
    del state["backbone.decoders.1.basic_module.SingleConv2.conv.weight"]
    state["backbone.extra.weight"] = torch.zeros(3)
    state["backbone.encoders.1.basic_module.SingleConv1.groupnorm.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    save_official(path, state)
    with pytest.raises(BrainIDError) as e:
        bid.load_model(path)
    msg = str(e.value)
    assert "missing keys: backbone.decoders.1.basic_module.SingleConv2.conv.weight" in msg
    assert "unexpected keys: backbone.extra.weight" in msg
    assert "mis-shaped keys: backbone.encoders.1.basic_module.SingleConv1.groupnorm.bias [5] (expected [8])" in msg
    assert "\n" not in msg


def test_wrong_head_shape_and_wrong_head_file(tmp_path):
    arch = Architecture(f_maps=8, levels=3)
    path = tmp_path / "m.pth"
    save_official(path, random_state(weights.official_shapes(arch)))
    seg = tmp_path / "seg.pth"
    torch.save(random_state(OFFICIAL_HEADS["segmentation"]), seg)  # 64 features, model has 8
    with pytest.raises(BrainIDError, match=r"final_conv_seg.weight \[33, 64, 1, 1, 1\] \(expected \[33, 8, 1, 1, 1\]\)"):
        bid.load_model(path, heads={"segmentation": seg})
    with pytest.raises(BrainIDError, match="has no 'final_conv_bias_field_log.weight'"):
        bid.load_model(path, heads={"bias_field": seg})
    with pytest.raises(BrainIDError, match="task-head file"):
        bid.load_model(seg)


def test_corrupt_and_foreign_files(tmp_path):
    arch = Architecture(f_maps=8, levels=3)
    good = tmp_path / "m.pth"
    save_official(good, random_state(weights.official_shapes(arch)))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(BrainIDError, match="not a readable torch checkpoint"):
        bid.load_model(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(BrainIDError, match="neither a torch checkpoint nor a safetensors"):
        bid.load_model(text)
    with pytest.raises(BrainIDError, match="not found"):
        bid.load_model(tmp_path / "missing.pth")


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    model = BrainIDModel(Architecture(f_maps=8, levels=3), heads={"segmentation": 33, "anatomy": 1,
                                                                  "super_resolution": 1, "bias_field": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.metadata = {"name": "tiny", "description": "round trip", "heads": {"segmentation": {"labels": list(range(33))}}}
    path = weights.save_model(model, tmp_path / "tiny.safetensors", {"licence": "test"})
    again = bid.load_model(path)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert again.arch == model.arch
    assert again.metadata["name"] == "tiny" and again.metadata["licence"] == "test"
    assert again.metadata["heads"]["segmentation"]["labels"] == list(range(33))
    # a head file saved from it loads onto the same backbone, bit-identical too
    head = weights.save_head(model, "bias_field", tmp_path / "bf.safetensors")
    base = BrainIDModel(Architecture(f_maps=8, levels=3))
    base.metadata = {"name": "base"}
    base_path = weights.save_model(base, tmp_path / "base.safetensors")
    with_head = bid.load_model(base_path, heads={"bias_field": head})
    for k, v in model.heads["bias_field"].state_dict().items():
        assert torch.equal(with_head.heads["bias_field"].state_dict()[k], v)
