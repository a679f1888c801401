"""Does the segmentation clean-up (BrainIDLib.cleanup: each structure keeps its largest connected
piece) help on whole heads? Predicts the model card's whole-head renders (training/head_eval.py,
cached in --cache) with and without it and prints 33-class Dice, coarse-tissue Dice, brain-mask
Dice and the volume labelled in extra-cerebral tissue, case by case and on average.

    PYTHONPATH=. python benchmarks/cleanup.py --labels /work/shared/data/synthseg/training_seg_{14,15,16}.nii.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's training/

import BrainIDLib  # noqa: E402
from training.head_eval import SLICE_MM, _load, render_set, scores, slice_centres  # noqa: E402

CASES = (("t1", "1mm"), ("t2", "1mm"), ("flair", "1mm"), ("ct_hu", "1mm"), ("t1", "5mm"), ("ct", "5mm"))
KEYS = ("dice_mean", "tissue_mean", "brain_dice", "extracerebral_ml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", nargs="+", required=True, help="held-out label maps (SynthSeg training maps)")
    ap.add_argument("--model", default="brainid-lite")
    ap.add_argument("--cache", default="runs/head-eval")
    args = ap.parse_args(argv)
    model = BrainIDLib.load_model(args.model)
    renders = render_set(args.labels, Path(args.cache), families=("t1", "t2", "flair", "ct", "ct_hu"))
    totals = {False: [], True: []}
    for k, (fam, res) in enumerate(CASES):  # one case per (map, condition), maps in turn
        rec = renders[k % len(renders)]
        truth = _load(rec["folder"] / "truth.nii.gz").astype(np.int32)
        labels = _load(rec["folder"] / "labels.nii.gz")
        ml = 1e-3
        if res == "5mm":
            zc = slice_centres(truth.shape[2])
            truth, labels, ml = truth[..., zc], labels[..., zc], SLICE_MM * 1e-3
        for cleanup in (False, True):
            pred = BrainIDLib.predict(str(rec["images"][fam, res]), model=model, device="cpu", cleanup=cleanup)
            r = scores(np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int32), truth, labels, ml)
            totals[cleanup].append([r[key] for key in KEYS])
            print(f"{rec['name']} {fam:6s} {res} cleanup={'on ' if cleanup else 'off'} "
                  + " ".join(f"{key}={r[key]:.3f}" for key in KEYS), flush=True)
    for cleanup, rows in totals.items():
        mean = np.mean(rows, 0)
        print(f"mean over {len(rows)} cases, cleanup {'on ' if cleanup else 'off'}: "
              + " ".join(f"{key}={v:.4f}" for key, v in zip(KEYS, mean)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
