"""training.qc_prior: the QC score's per-structure prior (a model's typical Dice on its training maps),
measured end to end through BrainIDLib.predict on a small head label map and a tiny random model, and
tied to the training step of the weights it was measured on."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import BrainIDLib
from BrainIDLib.weights import save_model
from training import model_card, qc_prior

from test_head_eval import tiny_head, tiny_model


@pytest.fixture()
def run_and_model(tmp_path, monkeypatch):
    monkeypatch.setattr(model_card, "SIZE", (40, 44, 44))  # renders the size of the small map
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"step": 7}))
    m = tiny_model()
    m.metadata["training"] = {"pretrain": {"steps": 7}}
    save_model(m, tmp_path / "m.safetensors")
    labels = tmp_path / "map.nii.gz"
    nib.save(nib.Nifti1Image(tiny_head(), np.eye(4)), labels)
    return run, tmp_path / "m.safetensors", labels


def test_prior_is_measured_resumed_and_read_by_qc(run_and_model, monkeypatch):
    run, model_file, labels = run_and_model
    calls = []
    real = BrainIDLib.predict
    monkeypatch.setattr(BrainIDLib, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["--run", str(run), "--model", str(model_file), "--labels", str(labels), "--draws", "2"]
    assert qc_prior.main(argv) == 0
    table = json.loads((run / "typical_dice.json").read_text())
    assert table["step"] == 7 and table["draws_per_map"] == 2 and len(table["draws"]["map.nii.gz"]) == 2
    typical = table["typical_dice"]
    assert typical and all(0.0 <= v <= 1.0 for v in typical.values())
    # each structure's value is its mean over the draws where it was present
    for lab, v in typical.items():
        seen = [d[lab] for d in table["draws"]["map.nii.gz"] if lab in d]
        assert v == pytest.approx(np.mean(seen), abs=1e-4)
    assert len(calls) == 2
    assert qc_prior.main(argv) == 0 and len(calls) == 2  # finished draws are kept, not recomputed

    from BrainIDLib import qc

    m = BrainIDLib.load_model(model_file)
    m.metadata["heads"]["segmentation"]["typical_dice"] = typical
    assert qc.typical_dice_of(m) == {int(k): v for k, v in typical.items()}


def test_prior_refuses_a_model_made_from_other_weights(run_and_model):
    run, model_file, labels = run_and_model
    (run / "summary.json").write_text(json.dumps({"step": 8}))
    with pytest.raises(SystemExit, match="step 7, the run is at step 8"):
        qc_prior.main(["--run", str(run), "--model", str(model_file), "--labels", str(labels)])
    assert not (run / "typical_dice.json").exists()
