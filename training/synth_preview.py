"""Visual QA of the synthetic generator: a montage of one subject draw.

    python -m training.synth_preview --labels FILE_OR_DIR --out preview.png [--seed 0]
    (also wired as `brainid-train synth-preview ...`)

Rows: axial, coronal, sagittal mid-slices. Columns: every sample (mild / severe, with its severity,
resolution regime and spacing), then the targets: T1 target, 33-class segmentation, the clean image
and the bias field of the most severe sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REGIME_NAMES = ("1 mm", "thick slice", "low field", "low res")


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal mid-slices of a RAS volume, oriented for display (origin lower)."""
    x, y, z = (s // 2 for s in vol.shape[:3])
    return [np.swapaxes(v, 0, 1) for v in (vol[:, :, z], vol[:, y, :], vol[x, :, :])]


def _seg_rgb(seg_ids: np.ndarray) -> np.ndarray:
    from BrainIDLib.labels import label_color

    rgb = np.zeros((*seg_ids.shape, 3), dtype=np.float32)
    for lab in np.unique(seg_ids):
        if lab == 0:
            continue
        rgb[seg_ids == lab] = np.array(label_color(int(lab)), dtype=np.float32) / 255.0
    return rgb


def write_preview(labels_path_or_dir, out_png, seed: int = 0, size=(128, 128, 128), preset: str = "brainid",
                  t1_dir=None, index: int = 0, device: str = "cpu", **overrides) -> Path:
    """Generate one draw from a label map (a file, or file `index` of a folder) and save a PNG.
    `overrides` go to SubjectGenerator (e.g. ct_prob=1.0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from BrainIDLib.labels import SEGMENTATION_LABELS
    from BrainIDLib.synth import SubjectGenerator
    from BrainIDLib.synth.dataset import list_label_maps, load_label_map

    if isinstance(size, int):
        size = (size,) * 3
    files = list_label_maps(labels_path_or_dir)
    path = files[index % len(files)]
    t1_path = None
    if t1_dir is not None and (Path(t1_dir) / path.name).is_file():
        t1_path = Path(t1_dir) / path.name
    labels, t1, _ = load_label_map(path, t1_path)
    gen = SubjectGenerator(preset=preset, size=size, device=device, **overrides)
    draw = gen(labels, t1=t1, seed=seed)

    inputs = draw["inputs"][:, 0].cpu().numpy()
    sev = draw["severity"].cpu().numpy()
    p = {k: v.cpu().numpy() for k, v in draw["params"].items()}
    seg_ids = np.asarray(SEGMENTATION_LABELS)[draw["segmentation"].cpu().numpy()]
    worst = int(np.argmax(sev))
    columns = []
    for i in range(inputs.shape[0]):
        kind = "severe" if sev[i] >= 0.5 else "mild"
        sp = "x".join(f"{v:.1f}" for v in p["spacing"][i])
        extra = next((f" {name}" for key, name in (("ct", "CT"), ("flair", "FLAIR"), ("t1", "T1"), ("t2", "T2"))
                      if key in p and p[key][i]), "")
        title = (f"{kind} s={sev[i]:.2f}{extra}\n{REGIME_NAMES[int(p['regime'][i])]} {sp} mm\n"
                 f"noise {p['noise_std'][i]:.1f} bias {p['bias_std'][i]:.2f} gamma {p['gamma'][i]:.2f}")
        columns.append((title, _slices(inputs[i]), dict(cmap="gray", vmin=0, vmax=1)))
    tgt = draw["target_t1"][0].cpu().numpy()
    columns.append(("target T1" + (" (subject)" if t1 is not None else " (rendered)"), _slices(tgt),
                    dict(cmap="gray", vmin=0, vmax=max(1e-6, float(np.percentile(tgt, 99.9))))))
    columns.append(("segmentation (33 classes)", _slices(_seg_rgb(seg_ids)), {}))
    clean = draw["clean"][worst, 0].cpu().numpy()
    columns.append((f"clean of sample {worst}\n(super-resolution target)", _slices(clean),
                    dict(cmap="gray", vmin=0, vmax=max(1e-6, float(clean.max())))))
    bias = draw["bias_field"][worst, 0].cpu().numpy()
    columns.append((f"bias field of sample {worst}", _slices(bias), dict(cmap="magma")))

    views = ("axial", "coronal", "sagittal")
    fig, axes = plt.subplots(3, len(columns), figsize=(2.3 * len(columns), 7.6), squeeze=False)
    for c, (title, ims, kw) in enumerate(columns):
        for r in range(3):
            ax = axes[r][c]
            ax.imshow(ims[r], origin="lower", interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(views[r], fontsize=8)
    flip = " flipped L/R" if bool(draw["flipped"]) else ""
    fig.suptitle(f"{path.name}: preset {preset}, seed {seed}, {size[0]}x{size[1]}x{size[2]}{flip}", fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, help="label map (NIfTI/MGZ) or a folder of them")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="crop size (cube)")
    parser.add_argument("--preset", default="brainid")
    parser.add_argument("--t1-dir", default=None, help="folder of T1s named like the label maps")
    parser.add_argument("--index", type=int, default=0, help="which map of a folder")


def run(args: argparse.Namespace) -> int:
    out = write_preview(args.labels, args.out, seed=args.seed, size=args.size, preset=args.preset,
                        t1_dir=args.t1_dir, index=args.index)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    from BrainIDLib.errors import BrainIDError

    parser = argparse.ArgumentParser(prog="python -m training.synth_preview", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BrainIDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
