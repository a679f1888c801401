"""What a model's input grid allows: the true labels and T1 passed through the grid and back.

    python benchmarks/grid_ceiling.py --labels $SYNTHSEG/training_seg_{14,15,16}.nii.gz [--spacing 2] [--cache runs/head-eval]

A model that runs on a coarser grid than the scan (brainid-lite: 2 mm) cannot score 1 on the scan's
grid however good it is. This measures that ceiling with BrainIDLib's own resampling, as `predict`
does it: `prepare` (RAS, anti-aliased resampling to the grid) and `Prepared.argmax_on_input_grid`
(class probabilities back to the scan's grid, then argmax). The 33-class truth goes through as
one-hot probabilities and the canonical T1 render as an image, on the model card's whole-head
renders (`training.head_eval.render_set`: cached in --cache, rendered if missing), scored as the card
scores a model: mean 33-class Dice, coarse-tissue Dice, anatomy correlation inside the brain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainIDLib.labels import SEGMENTATION_LABELS  # noqa: E402
from BrainIDLib.volume import Volume, prepare  # noqa: E402
from training.head_eval import anatomy_correlation, render_set, scores  # noqa: E402

AS_IS = {"method": "none"}


def through_grid(array: np.ndarray, affine: np.ndarray, spacing: float):
    """(the array on the model grid, its Prepared mapping back to the scan's grid)."""
    prep = prepare(Volume(array, affine), [spacing] * 3, AS_IS, multiple=1)
    return prep.tensor[0, 0], prep


def ceiling(folder: Path, spacing: float) -> dict:
    img = nib.load(str(folder / "truth.nii.gz"))
    truth = np.asarray(img.dataobj).astype(np.int32)
    channels, prep = [], None
    for lab in SEGMENTATION_LABELS:
        grid, prep = through_grid((truth == lab).astype(np.float32), img.affine, spacing)
        channels.append(grid)
    labels = np.asarray(SEGMENTATION_LABELS)[prep.argmax_on_input_grid(torch.stack(channels)).numpy()]
    t1 = np.asarray(nib.load(str(folder / "t1.nii.gz")).dataobj).astype(np.float32)
    grid, prep = through_grid(t1, img.affine, spacing)
    t1_back = prep.to_input_grid(grid[None])[0].numpy()
    out = scores(labels, truth)
    out["anatomy_r"] = anatomy_correlation(t1_back, t1, truth > 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", nargs="+", required=True, help="held-out 1 mm label maps (the model card's)")
    ap.add_argument("--spacing", type=float, default=2.0, help="the model grid's spacing in mm (brainid-lite: 2)")
    ap.add_argument("--cache", default="runs/head-eval", help="the model card's render cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for rec in render_set(args.labels, Path(args.cache), families=("t1",)):
        r = ceiling(rec["folder"], args.spacing)
        rows.append(r)
        print(f"{rec['name']}: Dice 33 {r['dice_mean']:.3f}, tissue {r['tissue_mean']:.3f} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in r['tissue'].items())}), anatomy r {r['anatomy_r']:.3f}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice_mean", "tissue_mean", "anatomy_r")}
    print(f"ceiling of a {args.spacing:g} mm grid at 1 mm (mean of {len(rows)} maps): Dice 33 {mean['dice_mean']:.3f}, "
          f"tissue {mean['tissue_mean']:.3f}, anatomy r {mean['anatomy_r']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
