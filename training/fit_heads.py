"""Refit the segmentation and anatomy heads (1x1x1 convs) on the frozen backbone's features of whole-head renders.

    PYTHONPATH=. python -m training.fit_heads --model /tmp/lite.safetensors \\
        --labels $SYNTHSEG/training_seg_0{1..8}.nii.gz --out runs/brainid-lite-refit

Why: pretraining fits the backbone and its heads together on 64^3 crops, one mild and one severe draw
per step, while a user's scan is a whole head, mostly mildly corrupted. Brain-ID's downstream recipe is
a 1x1x1 layer on frozen features, so the heads can be refitted on exactly that: whole-head renders of
training maps (training.head_eval's renders: every contrast family and CT in Hounsfield units, 1 mm and
5 mm slices; the 1 mm ones also skull-stripped), prepared by predict's own code (resampling to the model
grid, normalisation), at sampled voxels (brain, plus half as many outside it: the head must keep the
skull and air apart from the brain).

- segmentation: cross-entropy + soft Dice over the classes present (training.losses, style "brainid":
  it learns small structures from few steps), Adam from the current head;
- anatomy (T1 synthesis): least squares to the canonical T1 render (the pretraining target) on the model
  grid, solved in closed form with a small ridge: the linear map with the best correlation on those voxels.
  By default on the brain's voxels only (--anatomy-region brain): that T1 is 0 outside the brain, and a
  linear map on 16 features that must also draw that 0 gives up brain contrast for it (held-out r in the
  brain 0.68 fitted on the whole head, 0.70 on the brain). Outside the brain such a head paints a flat
  grey, so the export records BRAIN_FADE and predict fades the output to 0 where the segmentation head is
  sure of background (BrainIDLib.inference.brain_fade). Fitted on the features its output is made of:
  with the model's flip averaging, the scan's averaged with its mirror's.

Writes <out>/<task>_head.safetensors (training.export_brainid_lite --heads <out> takes them) and
<out>/summary.json (a folder holding other heads of the same backbone keeps them). The heads belong to
the backbone they were fitted on (the SHA-256 of its tensors is recorded and export checks it). Give it the model file as predict runs it: its metadata (input grid,
normalisation) decides what the features are. Never pass the held-out maps the model card evaluates on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to

from BrainIDLib.errors import BrainIDError
from BrainIDLib.feature_maps import model_fingerprint
from BrainIDLib.files import atomic_write
from BrainIDLib.metrics import dice_per_label, mean_dice

from .card_parts import FAMILIES as GENERATOR_FAMILIES
from .head_eval import HU, RESOLUTIONS, render_set
from .losses import segmentation_loss

FAMILIES = GENERATOR_FAMILIES + (HU,)
TASKS = ("segmentation", "anatomy")
RIDGE = 1e-5  # anatomy least squares: a guard against dead feature channels (relative to the mean diagonal)
REGIONS = ("brain", "head")  # the voxels the anatomy head is fitted on
BRAIN_FADE = 0.25  # a brain-fitted anatomy head's output fades to 0 below this brain probability


def _on_grid(image: nib.Nifti1Image, prepared, order: int) -> np.ndarray:
    """A 1 mm volume (truth ids: order 0; the T1 render: order 1) on the model grid."""
    grid = nib.Nifti1Image(np.zeros(prepared.grid_shape, np.int16), prepared.grid_affine)
    return np.asarray(resample_from_to(image, grid, order=order).dataobj)


def _skull_stripped(image: nib.Nifti1Image, truth: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image with everything outside the brain (truth 0) set to 0, as a skull-stripped scan."""
    brain = np.asarray(resample_from_to(truth, image, order=0).dataobj) > 0
    return nib.Nifti1Image(np.where(brain, np.asarray(image.dataobj, dtype=np.float32), 0).astype(np.float32), image.affine)


def samples(model, image, truth: nib.Nifti1Image, t1: nib.Nifti1Image, class_of: np.ndarray, rng, per_image: int,
            mirrored: bool = False):
    """(features (n, f_maps) float32, the same averaged with the mirrored scan's or None, classes (n,),
    canonical T1 (n,)) at up to `per_image` brain voxels of the model grid, plus half as many outside the
    brain: the background the heads must keep off the skull and air.

    mirrored: also run the left/right mirrored scan and average its features (mirrored back) with the
    scan's. With flip averaging, predict's anatomy output is exactly the head on those (the head is linear
    and the T1 has no left or right); not the segmentation's, whose mirrored pass swaps its classes."""
    from BrainIDLib.inference import prepare_scan

    prep = prepare_scan(image, model).prepared
    with torch.no_grad():
        feats = prep.crop(model.features(prep.tensor)[0].float())
        averaged = (feats + prep.crop(model.features(prep.tensor.flip(2))[0].float().flip(1))) / 2 if mirrored else None
    ids = _on_grid(truth, prep, 0).astype(np.int64).reshape(-1)
    y = class_of[np.clip(ids, 0, len(class_of) - 1)]
    x = feats.reshape(feats.shape[0], -1)
    brain, other = np.flatnonzero(y > 0), np.flatnonzero(y == 0)
    keep = np.concatenate([rng.choice(brain, min(len(brain), per_image), replace=False),
                           rng.choice(other, min(len(other), per_image // 2), replace=False)])
    target = _on_grid(t1, prep, 1).astype(np.float32).reshape(-1)
    xm = None if averaged is None else averaged.reshape(x.shape)[:, keep].T.contiguous()
    return x[:, keep].T.contiguous(), xm, torch.from_numpy(y[keep]), torch.from_numpy(target[keep])


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """training.losses.segmentation_loss (style brainid) on (voxels, classes) rows."""
    return segmentation_loss(logits.T.unsqueeze(0), y.unsqueeze(0), style="brainid")[0]


def head_dice(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean hard Dice of the head's argmax over the foreground classes present in y."""
    pred = (x @ weight.T + bias).argmax(1)
    return mean_dice(dice_per_label(pred.numpy(), y.numpy(), labels=range(1, weight.shape[0])))


def fit_segmentation(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, iters: int = 200,
                     batch: int = 200_000, lr: float = 1e-2, seed: int = 0, log=print) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Adam on (weight, bias) from their current values; returns them and the loss every 20 steps."""
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for it in range(iters):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=gen)
        loss = _loss(x[idx] @ w.T + b, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 20 == 0 or it == iters - 1:
            losses.append([it, round(loss.item(), 4)])
            log(f"step {it}: loss {loss.item():.4f}")
    return w.detach(), b.detach(), losses


def fit_anatomy(x: torch.Tensor, t: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares x @ w.T + b ~ t (ridge on w, relative to the features' scale), in float64."""
    n = x.shape[1] + 1
    gram, rhs = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for i in range(0, len(x), 1 << 20):  # in chunks: the samples can be gigabytes
        xd = torch.cat([x[i:i + (1 << 20)].double(), torch.ones(min(1 << 20, len(x) - i), 1, dtype=torch.float64)], 1)
        gram += xd.T @ xd
        rhs += xd.T @ t[i:i + (1 << 20)].double()
    reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(n, dtype=torch.float64)
    reg[-1, -1] = 0  # the bias is free
    coef = torch.linalg.solve(gram + reg, rhs)
    return coef[:-1].float().unsqueeze(0), coef[-1:].float()


def correlation(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> float:
    """Pearson correlation of the anatomy head's output with its target at the given voxels."""
    return float(torch.corrcoef(torch.stack([(x @ weight.T + bias)[:, 0], t]))[0, 1])


def collect(model, records, families, class_of, per_image: int, seed: int, log=print, mirrored: bool = False):
    """samples() of every render (and its skull-stripped variant): (x, x mirror-averaged or None, y, t, images)."""
    rng = np.random.default_rng(seed)
    xs, xms, ys, ts, n = [], [], [], [], 0
    for rec in records:
        t0 = time.time()
        truth = nib.load(str(rec["folder"] / "truth.nii.gz"))
        t1 = nib.load(str(rec["folder"] / "t1.nii.gz"))
        for fam in families:
            for res in RESOLUTIONS:
                image = nib.load(str(rec["images"][fam, res]))
                stripped = fam != HU and res == "1mm"  # skull-stripped scans: 1 mm MR-like ones
                variants = [image] + ([_skull_stripped(image, truth)] if stripped else [])
                for img in variants:
                    x, xm, y, t = samples(model, img, truth, t1, class_of, rng, per_image, mirrored)
                    xs.append(x)
                    xms.append(xm)
                    ys.append(y)
                    ts.append(t)
                    n += 1
        log(f"features of {rec['name']} in {time.time() - t0:.0f}s")
    return torch.cat(xs), torch.cat(xms) if mirrored else None, torch.cat(ys), torch.cat(ts), n


def refit(model, tasks, x, y, t, iters: int, seed: int, anatomy_region: str = "brain", x_anatomy=None) -> dict:
    """Fit each task's head on the samples, write it into `model`; returns {task: its fit record}.
    x_anatomy: the anatomy head's features if not x (collect's mirror-averaged ones)."""
    out = {}
    for task in tasks:
        conv = model.heads[task].conv  # its current weights are read before the fit overwrites them
        w0, b0 = conv.weight.detach().reshape(conv.out_channels, -1), conv.bias.detach()
        if task == "segmentation":
            before = head_dice(w0, b0, x, y)
            w, b, losses = fit_segmentation(w0, b0, x, y, iters, seed=seed)
            rec = {"dice_on_fit_voxels": {"before": round(before, 4), "after": round(head_dice(w, b, x, y), 4)},
                   "iters": iters, "losses": losses}
        else:
            xa = x if x_anatomy is None else x_anatomy
            xb, tb = xa[y > 0], t[y > 0]  # the brain's samples (a copy: index once)
            before = correlation(w0, b0, xb, tb)
            w, b = fit_anatomy(xb, tb) if anatomy_region == "brain" else fit_anatomy(xa, t)
            rec = {"r_in_brain_on_fit_voxels": {"before": round(before, 4), "after": round(correlation(w, b, xb, tb), 4)},
                   "ridge": RIDGE, "region": anatomy_region, "mirror_averaged": x_anatomy is not None}
            if anatomy_region == "brain":
                rec["brain_fade"] = BRAIN_FADE
        with torch.no_grad():
            conv.weight.copy_(w.reshape(conv.weight.shape))
            conv.bias.copy_(b)
        out[task] = rec
    return out


def _merged(path: Path, summary: dict) -> dict:
    """A refit of some heads into a folder that holds others fitted on the same backbone keeps those
    (their files and records): e.g. --tasks anatomy leaves the segmentation head as it was."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("backbone_sha256") != summary["backbone_sha256"]:
        return summary
    kept = [t for t in old.get("tasks", []) if t not in summary["tasks"]]
    return {**summary, "tasks": kept + summary["tasks"], "fits": {**{t: old["fits"][t] for t in kept}, **summary["fits"]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="model file as predict runs it (its backbone stays frozen): for brainid-lite the exported file, "
                         "whose metadata sets the 2 mm grid and the normalisation, not the run's raw model.safetensors")
    ap.add_argument("--labels", nargs="+", required=True, help="training label maps (never the held-out ones)")
    ap.add_argument("--out", required=True, help="folder for <task>_head.safetensors and summary.json")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--renders", default="runs/seg-head-renders", help="cache of the whole-head renders")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--per-image", type=int, default=40_000, help="brain voxels sampled per image (model grid)")
    ap.add_argument("--iters", type=int, default=200, help="segmentation head: Adam steps")
    ap.add_argument("--anatomy-region", default="brain", choices=REGIONS,
                    help="anatomy head: fit on the brain's voxels (predict then fades it outside the brain) or the whole head's")
    ap.add_argument("--seed", type=int, default=7, help="render seed (the card's held-out renders use 0)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import BrainIDLib
    from BrainIDLib.inference import segmentation_labels
    from BrainIDLib.weights import save_head

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = BrainIDLib.load_model(args.model)
    if "segmentation" not in model.heads:
        raise BrainIDError(f"{args.model} has no segmentation head: its classes define the voxels' labels")
    missing = [t for t in args.tasks if t not in model.heads]
    if missing:
        raise BrainIDError(f"{args.model} has no {' or '.join(missing)} head to refit")
    ids = np.array(segmentation_labels(model))
    class_of = np.zeros(int(ids.max()) + 1, np.int64)
    class_of[ids] = np.arange(len(ids))
    if "ct" not in args.families and HU in args.families:
        args.families.append("ct")  # the HU renders are made from the CT-like ones
    records = render_set(args.labels, Path(args.renders), families=tuple(args.families), seed=args.seed)
    mirrored = "anatomy" in args.tasks and bool((model.metadata.get("input") or {}).get("flip_average"))
    x, xm, y, t, images = collect(model, records, args.families, class_of, args.per_image, args.seed, mirrored=mirrored)
    fits = refit(model, args.tasks, x, y, t, args.iters, args.seed, args.anatomy_region, xm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = {"backbone_sha256": model_fingerprint(model), "how": "training/fit_heads.py"}
    for task in args.tasks:
        save_head(model, task, out / f"{task}_head.safetensors", metadata={"head_fit": source})
    summary = {**source, "model": str(args.model), "tasks": args.tasks, "label_maps": [Path(p).name for p in args.labels],
               "families": args.families, "images": images, "voxels": len(y), "fits": fits,
               "input": model.metadata.get("input"), "render_seed": args.seed, "minutes": round((time.time() - t0) / 60, 1)}
    summary = _merged(out / "summary.json", summary)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    said = {"segmentation": ("Dice", "dice_on_fit_voxels"), "anatomy": ("r in the brain", "r_in_brain_on_fit_voxels")}
    for task, rec in fits.items():
        name, key = said[task]
        print(f"{task} head refitted on {images} images ({len(y)} voxels): {name} on those voxels "
              f"{rec[key]['before']:.3f} -> {rec[key]['after']:.3f}; wrote {out / f'{task}_head.safetensors'}")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except BrainIDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
