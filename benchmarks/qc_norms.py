"""Normal structure volumes for the QC score (Resources/labels/structure_volumes.json).

QC compares each segmented structure's volume with the range seen in training label maps: a
structure many times its normal size (scalp labelled as cortex) or nearly absent is not trusted.
This reads 1 mm FreeSurfer label maps (the SynthSeg training maps 01-13; never the held-out ones
that calibrate QC), maps them to the 33-class segmentation as the generator does, and writes the
median volume and the spread of log-volumes per structure. Only these statistics are stored.

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/qc_norms.py \
        /work/shared/data/synthseg/training_seg_{01..13}.nii.gz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from BrainIDLib.files import atomic_write
from BrainIDLib.labels import SEGMENTATION_LABELS, label_name
from BrainIDLib.resources import resource_path
from BrainIDLib.synth import load_label_map
from BrainIDLib.synth.tables import to_segmentation


def structure_volumes_ml(path: Path) -> dict[int, float]:
    """{FreeSurfer id: mL} of the 33-class structures of one label map."""
    import nibabel as nib

    labels = load_label_map(path)[0]
    voxel_ml = float(np.prod(nib.load(str(path)).header.get_zooms()[:3])) / 1000.0
    counts = torch.bincount(to_segmentation(labels).reshape(-1), minlength=len(SEGMENTATION_LABELS))
    return {lab: float(counts[i]) * voxel_ml for i, lab in enumerate(SEGMENTATION_LABELS) if lab}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("label_maps", nargs="+", type=Path, help="1 mm FreeSurfer label maps (training maps only)")
    ap.add_argument("--out", type=Path, default=resource_path("labels", "structure_volumes.json"))
    args = ap.parse_args(argv)
    per_map = [structure_volumes_ml(p) for p in args.label_maps]
    structures = {}
    for lab in SEGMENTATION_LABELS[1:]:
        v = np.array([m[lab] for m in per_map])
        logs = np.log(np.maximum(v, 1e-3))
        structures[str(lab)] = {"name": label_name(lab), "median_ml": round(float(np.median(v)), 3),
                                "log_sd": round(float(logs.std(ddof=1)), 4), "min_ml": round(float(v.min()), 3),
                                "max_ml": round(float(v.max()), 3)}
        print(f"{lab:3d} {label_name(lab):32s} median {np.median(v):8.2f} mL  range {v.min():8.2f}-{v.max():8.2f}")
    totals = np.array([sum(m.values()) for m in per_map])
    doc = {"description": "volumes (mL) of the 33-class structures in 1 mm training label maps; written by "
                          "benchmarks/qc_norms.py for BrainIDLib.qc",
           "maps": [p.name for p in args.label_maps], "structures": structures,
           "total": {"median_ml": round(float(np.median(totals)), 3), "min_ml": round(float(totals.min()), 3),
                     "max_ml": round(float(totals.max()), 3)}}
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8"))
    print(f"total {np.median(totals):.0f} mL ({totals.min():.0f}-{totals.max():.0f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
