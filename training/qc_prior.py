"""A model's typical Dice per structure on label maps it was trained on: the prior of the QC score.

    PYTHONPATH=. python -m training.qc_prior --run runs/brainid-lite --model brainid-lite \
        --labels /work/shared/data/synthseg/training_seg_{01..13}.nii.gz --draws 2

Renders whole-head draws of the given 1 mm label maps exactly as the QC calibration does (the model
card's renderer, contrast families, resolution regimes and severities cycling), segments them with
`BrainIDLib.predict` as a user's scan would be, and averages each structure's Dice against the draw's
labels. Which structure it is explains most of how good a result is (`BrainIDLib.qc`), so the QC
score starts from this table. Use the maps the model was trained on: the held-out maps are for
measuring how well the QC score ranks results (benchmarks/qc_calibration.py), not for fitting it.

Writes <run>/typical_dice.json (with the run's step, so the export refuses a table measured on other
weights); training/export_brainid_lite.py puts it into the model file's metadata. Draws are kept in the
output as they finish, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import BrainIDLib
from BrainIDLib import metrics as M
from BrainIDLib.files import atomic_write

from .card_parts import _SEG, condition
from .model_card import make_generators


def run_step(run: Path) -> int:
    """The training step the run last exported (its summary.json)."""
    summary = run / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"{run} has no summary.json: export the run first (brainid-train pretrain writes it)")
    return int(json.loads(summary.read_text())["step"])


def measure(model, label_files: list[Path], draws: int, state: dict, save, log) -> dict:
    """Fills state["draws"] (map -> list of {label: Dice}) and returns label -> mean Dice."""
    gens = make_generators()
    for i, path in enumerate(label_files):
        done = state["draws"].setdefault(path.name, [])
        labels = None
        for j in range(len(done), draws):
            if labels is None:
                labels = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.int32)
            k = i * draws + j  # conditions keep cycling across maps
            fam, reg, sev = condition(k)
            t0 = time.time()
            draw = gens[fam, reg](labels, seed=9000 + 97 * k, severity=[sev])
            pred = BrainIDLib.predict(nib.Nifti1Image(draw["inputs"][0, 0].numpy(), np.eye(4)), tasks=("segmentation",),
                                      model=model, device="cpu")
            seg = np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int32)
            dice = {str(lab): d for lab, d in M.dice_per_label(seg, _SEG[draw["segmentation"].numpy()]).items()
                    if lab != 0 and not math.isnan(d)}
            done.append(dice)
            save()
            log(f"{path.name} #{j} {fam:5s} {reg:11s} sev {sev:.1f}: mean Dice {np.mean(list(dice.values())):.3f} "
                f"({time.time() - t0:.0f}s)")
    per_label: dict[str, list[float]] = {}
    for name in (p.name for p in label_files):
        for dice in state["draws"][name][:draws]:
            for lab, d in dice.items():
                per_label.setdefault(lab, []).append(d)
    return {lab: round(float(np.mean(v)), 4) for lab, v in sorted(per_label.items(), key=lambda kv: int(kv[0]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/brainid-lite"), help="the pretraining run (the table goes there)")
    ap.add_argument("--model", default="brainid-lite",
                    help="the model file assembled from that run (training/export_brainid_lite.py; registry name or path)")
    ap.add_argument("--labels", nargs="+", type=Path, required=True, help="1 mm label maps the model was trained on")
    ap.add_argument("--draws", type=int, default=3, help="draws per label map")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [str(p) for p in args.labels if not p.is_file()]
    if missing:
        raise SystemExit(f"label maps not found: {', '.join(missing)}")
    step = run_step(args.run)
    out = args.run / "typical_dice.json"
    state = json.loads(out.read_text()) if out.is_file() else {}
    if state.get("step") != step or state.get("draws_per_map") != args.draws:
        state = {"step": step, "draws_per_map": args.draws, "draws": {}}  # other weights or plan: start over
    state.update(command="python -m training.qc_prior " + " ".join(sys.argv[1:] if argv is None else argv),
                 label_maps=[p.name for p in args.labels])
    t0 = time.time()

    def save():
        text = json.dumps(state, indent=1) + "\n"
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))

    def log(msg):
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)

    model = BrainIDLib.load_model(args.model)
    made_from = ((model.metadata or {}).get("training") or {}).get("pretrain", {}).get("steps")
    if made_from != step:
        raise SystemExit(f"{args.model} was assembled from step {made_from}, the run is at step {step}: "
                         "export the run first (training/export_brainid_lite.py)")
    state["typical_dice"] = measure(model, args.labels, args.draws, state, save, log)
    save()
    log(f"wrote {out}: typical Dice of {len(state['typical_dice'])} structures, mean "
        f"{np.mean(list(state['typical_dice'].values())):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
