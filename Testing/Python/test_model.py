"""The network itself: official parameter layout, configurable size, and the low-memory path."""

import pytest
import torch

import BrainIDLib as bid
import BrainIDLib.model as model_module
from BrainIDLib.model import TaskHead, UNet3D
from BrainIDLib.weights import official_shapes

# Facts of the released brain_id_pretrained.pth (official_state_dict_keys.json): per level, the
# (in, mid, out) channels of each encoder/decoder double conv, and the parameter count.
OFFICIAL_ENCODERS = [(1, 32, 64), (64, 64, 128), (128, 128, 256), (256, 256, 512), (512, 512, 1024)]
OFFICIAL_DECODERS = [(1536, 512, 512), (768, 256, 256), (384, 128, 128), (192, 64, 64)]
OFFICIAL_KEY_COUNT = 56
OFFICIAL_PARAMETERS_WITH_ANATOMY_HEAD = 65_870_051


def _official_key_facts():
    keys = {}
    for kind, table in (("encoders", OFFICIAL_ENCODERS), ("decoders", OFFICIAL_DECODERS)):
        for i, (cin, mid, cout) in enumerate(table):
            base = f"backbone.{kind}.{i}.basic_module"
            for j, (a, b) in enumerate(((cin, mid), (mid, cout)), start=1):
                keys[f"{base}.SingleConv{j}.groupnorm.weight"] = (a,)
                keys[f"{base}.SingleConv{j}.groupnorm.bias"] = (a,)
                keys[f"{base}.SingleConv{j}.conv.weight"] = (b, a, 3, 3, 3)
    keys["head.final_conv_image.weight"] = (1, 64, 1, 1, 1)
    keys["head.final_conv_image.bias"] = (1,)
    return keys


def test_official_keys_and_shapes_match_exactly():
    facts = _official_key_facts()
    assert len(facts) == OFFICIAL_KEY_COUNT
    assert official_shapes() == facts


def test_official_parameter_count():
    model = bid.BrainIDModel(heads={"anatomy": 1})
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS_WITH_ANATOMY_HEAD


def test_groupnorm_groups_follow_the_official_rule():
    net = UNet3D()
    first = net.encoders[0].basic_module.SingleConv1.groupnorm
    assert first.num_groups == 1 and first.num_channels == 1  # below 8 channels: one group
    assert all(m.num_groups == 8 for m in net.modules() if isinstance(m, torch.nn.GroupNorm) and m.num_channels >= 8)


@pytest.mark.parametrize("f_maps,levels", [(8, 3), (16, 4), (24, 5)])
def test_width_and_depth_are_configurable(f_maps, levels):
    arch = bid.Architecture(f_maps=f_maps, levels=levels)
    model = bid.BrainIDModel(arch, heads={"segmentation": 33, "super_resolution": 1})
    x = torch.rand(1, 1, 20, 17, 23)  # odd sizes: nearest upsampling to the skip's exact size
    with torch.no_grad():
        f = model.features(x)
        seg = model.head_output(x, "segmentation")
        sr = model.head_output(x, "super_resolution")
    assert f.shape == (1, f_maps, 20, 17, 23)
    assert seg.shape == (1, 33, 20, 17, 23) and sr.shape == (1, 1, 20, 17, 23)
    assert len(model.backbone.encoders) == levels and len(model.backbone.decoders) == levels - 1


def _randomise(model):
    """Non-trivial GroupNorm affine parameters so the comparison exercises them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "groupnorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif "groupnorm.bias" in name:
                p.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("f_maps,levels,slab_elements", [(16, 4, None), (16, 3, 4096), (8, 4, 1)])
def test_low_memory_forward_equals_the_plain_forward(f_maps, levels, slab_elements, monkeypatch):
    if slab_elements is not None:  # force many depth slabs (down to one row each)
        monkeypatch.setattr(model_module, "SLAB_ELEMENTS", slab_elements)
    model = _randomise(bid.BrainIDModel(bid.Architecture(f_maps=f_maps, levels=levels))).eval()
    x = torch.rand(2, 1, 29, 22, 33) * 3 - 1
    original = x.clone()
    with torch.no_grad():
        plain = model.backbone(x)
        low = model.backbone.forward_low_memory(x)
    assert torch.equal(x, original), "the low-memory path must not modify the caller's input"
    assert low.shape == plain.shape
    torch.testing.assert_close(low, plain, rtol=1e-4, atol=1e-4)


def test_features_use_autograd_when_training_and_match_eval():
    model = _randomise(bid.BrainIDModel(bid.Architecture(f_maps=8, levels=3), heads={"anatomy": 1}))
    x = torch.rand(1, 1, 16, 16, 16)
    train_features = model.features(x)
    assert train_features.requires_grad
    train_features.sum().backward()
    assert model.backbone.encoders[0].basic_module.SingleConv1.conv.weight.grad is not None
    with torch.no_grad():
        eval_features = model.features(x)
    torch.testing.assert_close(eval_features, train_features.detach(), rtol=1e-4, atol=1e-4)


def test_official_get_feature_levels_are_available():
    model = bid.BrainIDModel(bid.Architecture(f_maps=8, levels=4))
    levels = model.backbone(torch.rand(1, 1, 16, 16, 16), all_levels=True)
    assert [lv.shape[1] for lv in levels] == [32, 16, 8]  # widths 8,16,32,64: three decoders


def test_contrast_dependent_heads_see_features_then_image():
    head = TaskHead("bias_field", features=4, out_channels=1)
    with torch.no_grad():
        head.final_conv_bias_field_log.weight.zero_()
        head.final_conv_bias_field_log.weight[0, 4] = 1.0  # the last input channel
        head.final_conv_bias_field_log.bias.zero_()
    image = torch.rand(1, 1, 5, 5, 5)
    out = head(torch.zeros(1, 4, 5, 5, 5), image)
    torch.testing.assert_close(out, image)
    with pytest.raises(ValueError, match="needs the input image"):
        head(torch.zeros(1, 4, 5, 5, 5))


def test_unknown_task_and_missing_head_are_named():
    with pytest.raises(ValueError, match="unknown task 'tumour'"):
        TaskHead("tumour", 8, 1)
    model = bid.BrainIDModel(bid.Architecture(f_maps=8, levels=3), heads={"anatomy": 1})
    with pytest.raises(ValueError, match="no 'segmentation' head .*anatomy"):
        model.head_output(torch.rand(1, 1, 8, 8, 8), "segmentation")
