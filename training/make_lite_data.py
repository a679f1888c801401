"""The 2 mm label maps brainid-lite trains on: every second voxel (nearest) of each 1 mm map, RAS.

    python training/make_lite_data.py /path/to/synthseg runs/data [--held-out 14 15 16]

Writes <out>/train2mm/<name> and <out>/test2mm/<name> (held-out maps, by the number in the name).
The files derive from the SynthSeg label maps: keep them out of git (runs/ is ignored).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nibabel as nib
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--held-out", type=int, nargs="*", default=[14, 15, 16])
    ap.add_argument("--factor", type=int, default=2)
    args = ap.parse_args(argv)
    files = sorted(Path(args.src).glob("*.nii*"))
    if not files:
        raise SystemExit(f"no label maps in {args.src}")
    for f in files:
        img = nib.as_closest_canonical(nib.load(str(f)))
        data = np.asarray(img.dataobj).astype(np.int16)[:: args.factor, :: args.factor, :: args.factor]
        affine = img.affine.copy()
        affine[:3, :3] *= args.factor
        digits = re.findall(r"\d+", f.name)
        number = int(digits[-1]) if digits else -1
        sub = Path(args.out) / (f"test{args.factor}mm" if number in args.held_out else f"train{args.factor}mm")
        sub.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(sub / f.name))
        print(sub / f.name, data.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
