"""training.export_brainid_lite: the shipped model file and its registry entry from a pretraining run,
with the QC prior (training/qc_prior.py) only when it was measured on the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import BrainIDLib
from BrainIDLib.files import sha256_of
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.weights import save_model
from training import export_brainid_lite

REPO = Path(__file__).resolve().parents[2]


def make_run(tmp_path: Path, step: int) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    m = BrainIDModel(Architecture(f_maps=8, levels=3), {"segmentation": 33, "anatomy": 1, "super_resolution": 1,
                                                        "bias_field": 1})
    save_model(m, run / "model.safetensors")
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "step_time": 2.0})
                                             for s in range(1, step + 1)) + "\n")
    return run


def export(tmp_path: Path, run: Path, capsys, *extra: str):
    registry = tmp_path / "models.json"
    shutil.copy(REPO / "Resources" / "models.json", registry)
    out = tmp_path / "brainid-lite.safetensors"
    assert export_brainid_lite.main(["--pretrain", str(run), "--heads", str(tmp_path / "none"), "--out", str(out),
                                     "--registry", str(registry), *extra]) == 0
    entry = next(m for m in json.loads(registry.read_text())["models"] if m["name"] == "brainid-lite")
    assert entry["files"][0]["sha256"] == sha256_of(out)
    assert entry["input"] == BrainIDLib.load_model(out).metadata["input"]
    return BrainIDLib.load_model(out), capsys.readouterr().err


def test_export_embeds_the_qc_prior_of_the_same_step(tmp_path, capsys):
    run = make_run(tmp_path, 5)
    (run / "typical_dice.json").write_text(json.dumps({"step": 5, "draws_per_map": 2, "label_maps": ["a", "b"],
                                                       "typical_dice": {"2": 0.61, "17": 0.42}}))
    model, err = export(tmp_path, run, capsys)
    seg = model.metadata["heads"]["segmentation"]
    assert seg["typical_dice"] == {"2": 0.61, "17": 0.42} and "2 training label maps" in seg["typical_dice_source"]
    assert model.metadata["training"]["pretrain"]["steps"] == 5 and model.metadata["input"]["flip_average"] is True
    assert "note" not in err


def test_export_leaves_out_a_prior_of_other_weights_with_a_note(tmp_path, capsys):
    run = make_run(tmp_path, 6)
    (run / "typical_dice.json").write_text(json.dumps({"step": 5, "draws_per_map": 2, "label_maps": ["a"],
                                                       "typical_dice": {"2": 0.61}}))
    model, err = export(tmp_path, run, capsys)
    assert "typical_dice" not in model.metadata["heads"]["segmentation"]
    assert "no QC prior for step 6" in err and "training.qc_prior" in err


def test_bf16_is_recorded_only_when_measured(tmp_path, capsys, monkeypatch):
    """precision auto runs bf16 only for weights whose export says it was measured equivalent."""
    import BrainIDLib.inference as inference
    from BrainIDLib.inference import cpu_has_native_bf16, cpu_precision

    monkeypatch.setattr(inference, "bf16_faster", lambda *args: True)  # the timing is test_bf16_probe.py's

    run = make_run(tmp_path, 5)
    model, _ = export(tmp_path, run, capsys)
    assert "bf16" not in model.metadata["input"]
    measured, _ = export(tmp_path, run, capsys, "--bf16-measured")
    assert measured.metadata["input"]["bf16"] is True
    cpu = torch.device("cpu")
    assert cpu_precision("auto", model, cpu) == "fp32"
    assert cpu_precision("auto", measured, cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
