"""The shipped experimental model (brainid-lite): registered, intact, and it runs on the shipped sample.
It is not the registry default until it is good enough to be one (docs/model-card.md)."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

import BrainIDLib
from BrainIDLib import registry as reg
from BrainIDLib.labels import SEGMENTATION_LABELS


@pytest.fixture(autouse=True)
def _shipped_registry(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))  # nothing cached: the file must ship


def test_lite_entry_resolves_to_the_shipped_file_with_its_checksum():
    entry = reg.load_registry().get("brainid-lite")
    assert entry is not None and entry.name == "brainid-lite"
    f = entry.model_file
    assert f.shipped and f.path == "Models/brainid-lite.safetensors"
    path = reg.resolve_weights("brainid-lite")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size
    assert len(data) <= 25 * 1024 * 1024
    model = BrainIDLib.load_model("brainid-lite")
    assert set(model.tasks) == set(BrainIDLib.TASKS)
    assert model.metadata["input"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert model.metadata["heads"]["segmentation"]["labels"] == list(SEGMENTATION_LABELS)


@pytest.mark.slow
def test_lite_model_segments_the_sample():
    """A smoke check of the shipped model on the shipped sample (its accuracy is in docs/model-card.md):
    it labels most of the brain, with cerebral white matter the commonest label."""
    from BrainIDLib.samples import sample_path

    img = nib.load(str(sample_path()))
    pred = BrainIDLib.predict(img, tasks=("segmentation",), model="brainid-lite", device="cpu")
    seg = np.asarray(pred.outputs["segmentation"].dataobj)
    assert seg.shape == img.shape
    assert set(np.unique(seg).tolist()) <= set(SEGMENTATION_LABELS)
    brain = np.asarray(img.dataobj) > 0
    assert (seg[brain] > 0).mean() > 0.5
    labels, counts = np.unique(seg[brain & (seg > 0)], return_counts=True)
    assert int(labels[counts.argmax()]) in (2, 41)
