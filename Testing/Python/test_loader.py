"""The one model resolver: objects, files and registry names become a model the same way."""

import pytest
import torch

import BrainIDLib as bid
from BrainIDLib import loader, registry, weights
from BrainIDLib.errors import BrainIDError
from BrainIDLib.model import Architecture, BrainIDModel


def tiny(heads):
    torch.manual_seed(0)
    return BrainIDModel(Architecture(f_maps=8, levels=2), heads).eval()


def test_a_weights_file_is_loaded_and_owned_a_model_object_is_only_given_its_heads(tmp_path):
    path = weights.save_model(tiny({"anatomy": 1, "segmentation": 33}), tmp_path / "tiny.safetensors")
    head = weights.save_head(tiny({"bias_field": 1}), "bias_field", tmp_path / "bf.safetensors")
    from_file = loader.resolve(str(path), heads={"bias_field": head})
    assert (from_file.label, from_file.owned) == ("tiny.safetensors", True)
    assert set(from_file.model.tasks) == {"anatomy", "segmentation", "bias_field"}
    given = tiny({"anatomy": 1})
    from_object = loader.resolve(given, heads={"bias_field": head})
    assert from_object.model is given and not from_object.owned
    assert set(given.tasks) == {"anatomy", "bias_field"}
    assert bid.load_model is loader.load_model and bid.load_model(path).heads.keys() == {"anatomy", "segmentation"}


def test_no_default_model_and_wrong_types_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(registry, "default_model", lambda *a: None)
    monkeypatch.setattr(registry, "how_to_get_weights", lambda *a: "no model is available here")
    with pytest.raises(BrainIDError, match="no model is available here"):
        loader.resolve(None)
    with pytest.raises(BrainIDError, match="not int"):
        loader.resolve(3)
