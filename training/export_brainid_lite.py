"""Assemble the shipped default model file from the training runs and register it.

    PYTHONPATH=. python -m training.export_brainid_lite --pretrain runs/brainid-lite --heads runs/brainid-lite-heads

Takes the pretraining run's model (backbone + anatomy + segmentation heads, trained jointly), adds
the heads found in --heads (heads adapted on the frozen features: super-resolution and bias field,
or the segmentation and anatomy heads refitted by training/fit_heads.py), writes one safetensors
file with the model's description (labels, input grid, normalisation, training summary) to
Resources/Models/brainid-lite.safetensors, and updates its entry (SHA-256, size) in
Resources/models.json, making it the registry's default with --make-default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from BrainIDLib.feature_maps import model_fingerprint
from BrainIDLib.files import atomic_write, sha256_of
import BrainIDLib
from BrainIDLib.normalize import ROBUST
from BrainIDLib.labels import SEGMENTATION_LABELS, label_name
from BrainIDLib.weights import add_head_file, save_model

ROOT = Path(__file__).resolve().parent.parent
NAME = "brainid-lite"
DESCRIPTION = ("Small Brain-ID (3D U-Net, f_maps 16, 4 levels, 1.0 M parameters) trained by BrainID on 2 CPU cores from "
               "SynthSeg label maps with the Brain-ID generator, on a 2 mm grid, on whole heads and skull-stripped "
               "renders with robust intensity normalisation (CT windowed) and left/right flip averaging at inference; "
               "heads for 33-class segmentation, anatomy (T1 synthesis), super-resolution and bias field. A CPU-budget "
               "model: coarse anatomy is right, small structures are not (accuracy, whole-head and real-scan figures "
               "and known weaknesses in docs/model-card.md); not the official model.")
SPACING = [2.0, 2.0, 2.0]
NORMALISATION = ROBUST  # part 3 on; parts 1-2 used whole-volume min-max

REFIT = "; refitted on its frozen features of whole-head renders of the training maps, training/fit_heads.py)"


def _run_summary(run: Path) -> dict:
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()] if (run / "log.jsonl").is_file() else []
    cfg = json.loads((run / "config.json").read_text())["config"] if (run / "config.json").is_file() else {}
    out = {"run": run.name, "steps": max((r["step"] for r in log), default=0),
           "step_seconds_total": round(sum(r.get("step_time", 0.0) for r in log), 1)}
    if cfg:
        d = cfg["data"]
        out.update({"crop": d["size"], "samples_per_step": d["mild"] + d["severe"], "generator": d["generator"],
                    "loss": cfg["loss"], "optim": {k: cfg["optim"].get(k) for k in ("lr", "schedule", "warmup_steps", "grad_clip", "ema")}})
        if "adapt" in cfg and run.name.endswith("heads"):
            out["tasks"] = cfg["adapt"]["tasks"]
    if log:
        last = log[-min(len(log), 20):]
        out["final_losses"] = {k: round(sum(r[k] for r in last) / len(last), 4) for k in last[0]
                               if k not in ("step", "lr", "step_time", "grad_norm") and isinstance(last[0][k], (int, float))}
    return out


def _fit_summary(fit: dict) -> dict:
    """What training/fit_heads.py recorded, without the loss curves."""
    out = {k: fit[k] for k in ("tasks", "label_maps", "families", "images", "voxels") if k in fit}
    out["fits"] = {t: {k: v for k, v in rec.items() if k != "losses"} for t, rec in fit.get("fits", {}).items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain", default="runs/brainid-lite")
    ap.add_argument("--heads", default="runs/brainid-lite-heads")
    ap.add_argument("--out", default=str(ROOT / "Resources" / "Models" / f"{NAME}.safetensors"))
    ap.add_argument("--registry", default=str(ROOT / "Resources" / "models.json"))
    ap.add_argument("--make-default", action="store_true", help="also make it the registry default")
    ap.add_argument("--bf16-measured", action="store_true",
                    help="record that bfloat16 CPU inference was measured equivalent to float32 for these weights "
                         "(benchmarks/precision.py --part lite), so precision auto uses it on CPUs with native bf16")
    args = ap.parse_args(argv)
    pre, heads = Path(args.pretrain), Path(args.heads)
    model = BrainIDLib.load_model(pre / "model.safetensors")
    fit = json.loads((heads / "summary.json").read_text()) if (heads / "summary.json").is_file() else {}
    fitted = fit.get("backbone_sha256")  # written by training/fit_heads.py
    refitted = set(fit.get("tasks", ["segmentation"])) if fitted else set()
    if fitted and fitted != model_fingerprint(model):
        raise SystemExit(f"{heads} holds heads fitted on another backbone than {pre / 'model.safetensors'}: "
                         "refit them (python -m training.fit_heads) on this one")
    for task in ("super_resolution", "bias_field", "anatomy", "segmentation"):
        f = heads / f"{task}_head.safetensors"
        if f.is_file():
            add_head_file(model, task, f)
    missing = [t for t in BrainIDLib.TASKS if t not in model.heads]
    if missing:
        raise SystemExit(f"missing heads: {missing}")
    heads_meta = {
        "segmentation": {"labels": list(SEGMENTATION_LABELS), "label_names": [label_name(x) for x in SEGMENTATION_LABELS],
                         "description": "33-class FreeSurfer segmentation (trained jointly with the backbone" +
                                        (REFIT if "segmentation" in refitted else ")")},
        "anatomy": {"description": "T1-weighted anatomy synthesis (Brain-ID pretraining head" +
                                   (REFIT if "anatomy" in refitted else ")")},
        "super_resolution": {"description": "super-resolution (1x1x1 conv on frozen features and the input)"},
        "bias_field": {"description": "log bias field (1x1x1 conv on frozen features and the input)"},
    }
    fade = fit.get("fits", {}).get("anatomy", {}).get("brain_fade") if "anatomy" in refitted else None
    if fade:  # fitted on the brain only: predict fades it to 0 outside (BrainIDLib.inference.brain_fade)
        heads_meta["anatomy"]["brain_fade"] = fade
        heads_meta["anatomy"]["description"] = heads_meta["anatomy"]["description"][:-1] + (
            ", on the brain's voxels; faded to 0 where the segmentation is sure of background)")
    pretrain = _run_summary(pre)  # reads the whole log: once
    prior = pre / "typical_dice.json"  # training/qc_prior.py: the QC score's per-structure prior
    table = json.loads(prior.read_text()) if prior.is_file() else {}
    if table.get("step") != pretrain["steps"] or "typical_dice" not in table:
        print(f"note: no QC prior for step {pretrain['steps']} in {pre} (the QC score falls back to the scan's own "
              "signals): run python -m training.qc_prior on this export, then export again", file=sys.stderr)
    else:
        heads_meta["segmentation"]["typical_dice"] = table["typical_dice"]
        heads_meta["segmentation"]["typical_dice_source"] = (
            f"mean Dice per structure over {table['draws_per_map']} whole-head draws of each of "
            f"{len(table['label_maps'])} training label maps (training/qc_prior.py); the QC score's prior")
    inputs = {"spacing_mm": SPACING, "normalisation": NORMALISATION, "flip_average": True}
    if args.bf16_measured:
        inputs["bf16"] = True
    model.metadata = {
        "name": NAME, "description": DESCRIPTION,
        "heads": {t: {**heads_meta[t], "out_channels": model.heads[t].out_channels} for t in model.tasks},
        "input": inputs,
        "training": {"pretrain": pretrain, "heads": _run_summary(heads) if (heads / "log.jsonl").is_file() else None,
                     "head_fit": _fit_summary(fit) if fitted else None,
                     "data": "13 SynthSeg training label maps (training_seg_01..13), downsampled to 2 mm; "
                             "training_seg_14..16 held out", "hardware": "2 shared CPU cores",
                     "card": "docs/model-card.md"},
        "licence": "Apache-2.0 (weights trained by the BrainID project from the SynthSeg label maps, Apache-2.0)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    sha, size = sha256_of(out), out.stat().st_size
    reg_path = Path(args.registry)
    reg = json.loads(reg_path.read_text())
    entry = {
        "name": NAME,
        "aliases": ["lite"],
        "description": DESCRIPTION,
        "architecture": model.arch.to_dict(),
        "tasks": list(BrainIDLib.TASKS),
        "labels": list(SEGMENTATION_LABELS),
        "input": inputs,
        "licence": "Apache-2.0",
        "source": "Trained by the BrainID project (training/train_brainid_lite.sh, training/export_brainid_lite.py); "
                  "evaluation in docs/model-card.md",
        "notes": "Shipped inside BrainID; runs offline. Accuracy (and its limits) in docs/model-card.md.",
        "files": [{"filename": out.name, "role": "model", "path": f"Models/{out.name}", "sha256": sha, "size": size}],
    }
    reg["models"] = [m for m in reg["models"] if m["name"] != NAME] + [entry]
    if args.make_default:  # only once the model card shows it is good enough to be the default
        reg["default"] = NAME
    atomic_write(reg_path, lambda tmp: Path(tmp).write_text(json.dumps(reg, indent=2) + "\n"))  # the shipped registry
    print(json.dumps({"file": str(out), "sha256": sha, "size": size}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
