"""Structure volumes (mL) from a segmentation image, with FreeSurfer names (and QC scores when
given): for the CLI and Slicer."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from .files import atomic_write
from .labels import label_name

CSV_HEADER = ("label", "name", "voxels", "volume_ml")
QC_HEADER = ("qc_score", "qc_flagged")  # appended when a QC report is given (BrainIDLib.qc)


@dataclass(frozen=True)
class StructureVolume:
    label: int
    name: str
    voxels: int
    ml: float

    def as_tuple(self) -> tuple:
        return (self.label, self.name, self.voxels, self.ml)


def volumes_table(seg, labels=None, include_background: bool = False) -> list[StructureVolume]:
    """One row per label present (or per label in `labels`, zeros included), sorted by label id.

    seg: a nibabel image of integer label ids (volumes use its voxel size), or a (array, affine) pair.
    """
    if isinstance(seg, tuple):
        array, affine = seg
    else:
        array, affine = np.asanyarray(seg.dataobj), seg.affine
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D label image, got shape {array.shape}")
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    ids, counts = np.unique(np.rint(array).astype(np.int64), return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist()))
    wanted = sorted(found) if labels is None else sorted({int(v) for v in labels})
    rows = []
    for label in wanted:
        if label == 0 and not include_background:
            continue
        n = int(found.get(label, 0))
        rows.append(StructureVolume(int(label), label_name(label), n, n * voxel_ml))
    return rows


def write_volumes_csv(rows: list[StructureVolume], path: str | os.PathLike, qc=None) -> Path:
    """The rows as CSV (CSV_HEADER columns, mL to 4 decimals), written atomically. With a QC report,
    also each structure's QC score (3 decimals) and whether it is flagged (1/0); blank when unscored."""
    scores = qc.by_label() if qc is not None else None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER + (QC_HEADER if scores is not None else ()))
    for r in rows:
        row = (r.label, r.name, r.voxels, f"{r.ml:.4f}")
        if scores is not None:
            s = scores.get(r.label)
            row += (f"{s.score:.3f}", int(s.flagged)) if s else ("", "")
        w.writerow(row)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))
