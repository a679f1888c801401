"""docs/images/correspondence.png: anatomical correspondence across contrast and position.

Source: the shipped MNI152 sample (T1). Target: the same brain re-contrasted (T2-like: intensities
inverted) and moved by a known rigid transform (8 deg about S, 5 deg about R, 6/-4/3 mm) onto a
new 2 mm grid (brainid_devtools.demo_pairs), so the true location of the point is known. Panels: the
source with the query point and its self-similarity; the target with the similarity heatmap of the
default descriptor (features at the point and on 12-50 mm cubes around it), its best match (x) and
the true location (+); the same with single-voxel features; all on the axial slice through the
point (target: through the true location).

    PYTHONPATH=. python docs/make_correspondence_figure.py [--model brainid-lite] [--point R,A,S] [--out PNG]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from BrainIDLib.correspondence import find_correspondence, similarity_map  # noqa: E402
from BrainIDLib.feature_maps import compute_feature_map  # noqa: E402
from brainid_devtools.demo_pairs import apply_transform, displaced, recontrast  # noqa: E402
from BrainIDLib.samples import sample_path  # noqa: E402

HERE = Path(__file__).resolve().parent


def _voxel(img, point_ras) -> np.ndarray:
    return (np.linalg.inv(img.affine) @ np.append(point_ras, 1.0))[:3]


def _axial(img, point_ras) -> np.ndarray:
    """The 2D axial slice through the point of a RAS-aligned image (for imshow, origin lower)."""
    k = int(np.clip(round(_voxel(img, point_ras)[2]), 0, img.shape[2] - 1))
    return np.asarray(img.dataobj)[:, :, k].T


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brainid-lite")
    ap.add_argument("--point", default="38,5,2", help="query point R,A,S (mm) on the source")
    ap.add_argument("--out", default=str(HERE / "images" / "correspondence.png"))
    args = ap.parse_args(argv)
    point = np.array([float(v) for v in args.point.split(",")])

    source = nib.load(sample_path())
    target, transform = displaced(recontrast(source, "t2"), rotation_deg=(5, 0, 8), translation_mm=(6, -4, 3), spacing=2.0)
    truth = apply_transform(transform, point)
    src = compute_feature_map(source, model=args.model)
    tgt = compute_feature_map(target, model=args.model)
    (match,) = find_correspondence(src, point, [tgt])
    (single,) = find_correspondence(src, point, [tgt], context_mm=())
    self_heat = similarity_map(src, point, src)
    error = float(np.linalg.norm(match.point_ras - truth))
    single_error = float(np.linalg.norm(single.point_ras - truth))

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    panels = [(source, self_heat, point, point, None, "source T1 + query point\n(self-similarity)"),
              (target, match.heatmap, truth, match.point_ras, truth,
               f"T2-like, moved target: descriptor with context\nmatch x, truth +: error {error:.1f} mm"),
              (target, single.heatmap, truth, single.point_ras, truth,
               f"same target, single-voxel features\nmatch x, truth +: error {single_error:.1f} mm")]
    for ax, (img, heat, plane, p, true_p, title) in zip(axes, panels):
        base = _axial(img, plane)
        ax.imshow(base, cmap="gray", origin="lower")
        h = _axial(heat, plane)
        top = float(np.max(np.asarray(heat.dataobj)))
        lo = top - 0.5 * (top - float(np.median(h[h > -0.99])))  # the upper half of the brain's similarity range
        ax.imshow(np.ma.masked_less(h, lo), cmap="inferno", origin="lower", alpha=0.6, vmin=lo, vmax=top)
        ax.plot(*_voxel(img, p)[:2], "x" if true_p is not None else "+", color="cyan", ms=12, mew=2)
        if true_p is not None:
            ax.plot(*_voxel(img, true_p)[:2], "+", color="lime", ms=12, mew=2)
        ax.set_title(title, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Brain-ID anatomical correspondence ({args.model}): point {args.point} mm RAS", color="white")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor="black")
    print(f"{out}: match {np.round(match.point_ras, 1)} vs truth {np.round(truth, 1)}: error {error:.1f} mm "
          f"(single-voxel features: {single_error:.1f} mm), similarity {match.similarity:.3f}")


if __name__ == "__main__":
    main()
