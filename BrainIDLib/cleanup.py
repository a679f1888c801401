"""Topological clean-up of a segmentation, as SynthSeg does: every structure keeps only its largest
connected piece.

A structure's stray islands (cortex on the scalp, a pallidum blob in the orbit) are almost always
wrong. Their voxels are not painted over with a guess: the structure's probability is zeroed there,
so they take the next most probable class (usually a neighbour or background). Working on the class
probabilities keeps the result symmetric under a left/right mirror and feeds the same decision to
every output grid. `benchmarks/cleanup.py` (6 whole-head renders: T1/T2/FLAIR/CT in HU at 1 mm, T1
and CT at 5 mm; brainid-lite part 3): every case improved; 33-class Dice 0.455 -> 0.460 (+0.002 to
+0.010), coarse tissue 0.524 -> 0.539, brain mask 0.802 -> 0.807, extra-cerebral tissue labelled as
brain 648 -> 621 mL (-1% to -8%).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbours: a diagonal touch joins two pieces
RENORMALISE_VALUES = 1 << 24  # probabilities renormalised at once (64 MB of float32)


def keep_largest_components_(probs: torch.Tensor, background: int | None = None) -> int:
    """Zero each class's probability on the argmax voxels outside its largest 26-connected piece(s),
    in place, and renormalise those voxels. probs: (C, X, Y, Z). Returns the number of voxels changed."""
    idx = probs.argmax(0).to(torch.int16).numpy()  # (int64 would be 8 bytes a voxel)
    changed = np.zeros(idx.shape, dtype=bool)
    for c, box in enumerate(ndimage.find_objects(idx + 1)):  # +1: find_objects skips label 0
        if box is None or c == background:
            continue
        mask = idx[box] == c
        pieces, n = ndimage.label(mask, structure=CONNECTIVITY)
        if n <= 1:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        drop = mask & (sizes[pieces] < sizes.max())  # ties all stay: the rule must not depend on scan order
        probs[c][box][torch.from_numpy(drop)] = 0
        changed[box] |= drop
    # renormalise the changed voxels a slab at a time: a poor model can change millions of voxels, and
    # all their class probabilities at once took ~0.7 GB on a whole 1 mm head (past a tiled run's budget)
    step = max(1, RENORMALISE_VALUES // max(1, probs[:, 0].numel()))
    for x0 in range(0, changed.shape[0], step):
        where = torch.from_numpy(changed[x0 : x0 + step])
        if where.any():
            slab = probs[:, x0 : x0 + step]
            picked = slab[:, where]
            slab[:, where] = picked / picked.sum(0, keepdim=True).clamp_min(1e-12)
    return int(changed.sum())
