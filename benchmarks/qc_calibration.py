"""QC calibration: does the QC score rank segmentations by their true Dice?

Held-out generator draws (the model card's renderer, `training.model_card.make_generators`: 1 mm,
160x192x160, whole heads) across contrast families, resolution regimes and severities go through
`BrainIDLib.predict(..., qc=True)` exactly as a user's scan would; each structure's QC score is
compared with its true Dice at 1 mm (BrainIDLib.metrics). Prints:

- Spearman correlation of per-structure QC with true Dice, pooled over all (draw, structure) pairs,
  and the median of the per-structure correlations across draws; the same for each QC signal;
- the QC threshold that best separates structures with Dice < 0.5 from the others (max Youden J =
  recall + specificity - 1: most structures of this model fail, so F1 would flag everything), its
  precision/recall, and the same with the threshold chosen on the other label maps (leave one map out);
- the whole-scan score against each draw's mean Dice;
- a with-skull scan against the same scan skull-stripped (intracranial mask of the reference), and
  the shipped (real, skull-stripped) sample;
- what QC costs: CPU seconds of `predict` on the shipped sample with and without QC (best of 3;
  CPU time, not wall time, because the machine may be shared).

Writes docs/images/qc-calibration.png (scatter plots) and docs/qc-calibration.json. Per-draw records
are cached in --cache so an interrupted run resumes; draws cached for other weights, heads, metadata or QC
passes are not reused.

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/qc_calibration.py \
        --labels /work/shared/data/synthseg/training_seg_{14,15,16}.nii.gz --draws 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's training/, not benchmarks/training.py

import BrainIDLib  # noqa: E402
from BrainIDLib import metrics as M  # noqa: E402
from BrainIDLib import qc as Q  # noqa: E402
from BrainIDLib.feature_maps import tensors_sha256  # noqa: E402
from BrainIDLib.labels import SEGMENTATION_LABELS, label_color  # noqa: E402
from BrainIDLib.samples import sample_path  # noqa: E402
from training.card_parts import FAMILY_OPTIONS, condition  # noqa: E402
from training.model_card import make_generators  # noqa: E402

DICE_FAIL = 0.5
_SEG = np.array(SEGMENTATION_LABELS)


def _records(pred, ref: np.ndarray, meta: dict) -> tuple[list[dict], dict]:
    """(per-structure rows, whole-scan row) of one prediction against its reference labels."""
    seg = np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int32)
    dice = M.dice_per_label(seg, ref)
    rows = []
    for s in pred.qc.structures:
        d = dice.get(s.label, float("nan"))
        if math.isnan(d):  # absent from both: Dice undefined
            continue
        rows.append({**meta, "label": s.label, "dice": d, "qc": s.score, "agreement": s.agreement,
                     "volume_plausibility": s.volume_plausibility, "confidence": s.confidence,
                     "expected_dice": s.expected_dice, "typical_dice": s.typical_dice,
                     **{f"agree_{k}": v for k, v in s.by_perturbation.items()}})
    scan = {**meta, "scan_score": pred.qc.scan_score, "mean_dice": M.mean_dice(dice),
            "total_ml": pred.qc.total_volume_ml, "reference_ml": float((ref > 0).sum()) / 1000.0}
    return rows, scan


def model_id(model) -> str:
    """What a cached draw depends on: every tensor (backbone and heads) and the metadata (input grid,
    normalisation, the QC typical-Dice table)."""
    meta = json.dumps(model.metadata, sort_keys=True, default=str)
    return hashlib.sha256((tensors_sha256(model) + meta).encode()).hexdigest()


def load_cache(cache: Path, kinds: tuple, model_key: str, log) -> dict:
    """The cached draws, if they were made by this very model with these QC passes; else an empty
    record (a stale cache would silently calibrate an older model)."""
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if done and (done.get("perturbations") != list(kinds) or done.get("model") != model_key):
        log(f"{cache}: cached draws of another model or other QC passes, not reused")
        done = {}
    return done or {"perturbations": list(kinds), "model": model_key, "rows": [], "scans": []}


def run_draws(model, label_files, draws: int, cache: Path, kinds: tuple, log) -> tuple[list, list]:
    done = load_cache(cache, kinds, model_id(model), log)
    seen = {(s["map"], s["draw"]) for s in done["scans"]}
    gens = make_generators()
    for path in label_files:
        labels = None
        for k in range(draws):
            if (path.name, k) in seen:
                continue
            if labels is None:
                labels = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.int32)
            fam, reg, sev = condition(k)
            t0 = time.time()
            draw = gens[fam, reg](labels, seed=5000 + 97 * k, severity=[sev])
            img = nib.Nifti1Image(draw["inputs"][0, 0].numpy(), np.eye(4))
            pred = BrainIDLib.predict(img, tasks=("segmentation",), model=model, device="cpu", qc=kinds)
            meta = {"map": path.name, "draw": k, "family": fam, "regime": reg, "severity": sev}
            rows, scan = _records(pred, _SEG[draw["segmentation"].numpy()], meta)
            done["rows"] += rows
            done["scans"].append(scan)
            cache.write_text(json.dumps(done))
            log(f"{path.name} #{k} {fam:5s} {reg:11s} sev {sev:.1f}: mean Dice {scan['mean_dice']:.3f} "
                f"scan QC {scan['scan_score']:.3f} ({time.time() - t0:.0f}s)")
    names = {p.name for p in label_files}
    return ([r for r in done["rows"] if r["map"] in names and r["draw"] < draws],
            [s for s in done["scans"] if s["map"] in names and s["draw"] < draws])


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:  # undefined for constant inputs
        return float("nan")
    return float(spearmanr(a, b).statistic)


def flag_stats(qc: np.ndarray, dice: np.ndarray, t: float) -> dict:
    """Precision/recall of `qc < t` as a detector of `dice < DICE_FAIL`."""
    flagged, bad = qc < t, dice < DICE_FAIL
    tp = int((flagged & bad).sum())
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(bad.sum()))
    specificity = int((~flagged & ~bad).sum()) / max(1, int((~bad).sum()))
    return {"threshold": round(float(t), 3), "precision": precision, "recall": recall, "specificity": specificity,
            "youden_j": recall + specificity - 1, "flagged": int(flagged.sum()), "failing": int(bad.sum())}


def best_threshold(qc: np.ndarray, dice: np.ndarray) -> dict:
    return max((flag_stats(qc, dice, t) for t in np.arange(0.05, 1.0, 0.025)), key=lambda s: s["youden_j"])


def calibrate(rows: list, scans: list) -> dict:
    dice = np.array([r["dice"] for r in rows])
    signals = ["qc", "agreement", "confidence", "expected_dice", "volume_plausibility"] + sorted(k for k in rows[0] if k.startswith("agree_"))
    if all(r.get("typical_dice") is not None for r in rows):  # the model file's prior (training/qc_prior.py)
        signals.append("typical_dice")
        for r in rows:  # the scan's own part of the score, without the prior
            r["scan_signals"] = Q.structure_score(r["agreement"], r["expected_dice"], r["volume_plausibility"], None)
        signals.append("scan_signals")
    pooled = {s: spearman([r[s] for r in rows], dice) for s in signals}
    within = {}
    for s in signals:
        per = [spearman([r[s] for r in rows if r["label"] == lab], [r["dice"] for r in rows if r["label"] == lab])
               for lab in sorted({r["label"] for r in rows})]
        within[s] = float(np.nanmedian(per))
    qc = np.array([r["qc"] for r in rows])
    best = best_threshold(qc, dice)
    maps = sorted({r["map"] for r in rows})
    cv_flag, cv_bad = [], []
    for m in maps if len(maps) > 1 else []:
        train = np.array([r["map"] != m for r in rows])
        t = best_threshold(qc[train], dice[train])["threshold"]
        cv_flag.append(qc[~train] < t)
        cv_bad.append(dice[~train])
    held = None
    if cv_flag:  # each map's structures flagged with the threshold chosen on the other maps
        held = {**flag_stats(np.where(np.concatenate(cv_flag), 0.0, 1.0), np.concatenate(cv_bad), 0.5),
                "threshold": "chosen on the other maps"}
    return {"pairs": len(rows), "draws": len(scans), "spearman_pooled": pooled, "spearman_within_structure_median": within,
            "flag_best": best, "flag_library": flag_stats(qc, dice, Q.FLAG_BELOW), "flag_leave_one_map_out": held,
            "scan_spearman": spearman([s["scan_score"] for s in scans], [s["mean_dice"] for s in scans])}


def skull_demo(model, label_file: Path, kinds: tuple, log, older=None) -> dict:
    """A T1-like whole-head draw vs the same image with everything outside the intracranial mask set to 0;
    `older`: also the with-skull draw through another model (one that labels the scalp as brain)."""
    from BrainIDLib.synth import SubjectGenerator

    gen = SubjectGenerator(preset="brainid-extended", size=(192, 224, 192), n_mild=1, n_severe=0,
                           resolution_probs=((1.0, 0, 0, 0), (1.0, 0, 0, 0)), **FAMILY_OPTIONS["t1"])
    labels = np.asarray(nib.as_closest_canonical(nib.load(str(label_file))).dataobj).astype(np.int32)
    draw = gen(labels, seed=77, severity=[0.0])
    ref = _SEG[draw["segmentation"].numpy()]
    head = draw["inputs"][0, 0].numpy()
    out = {}
    cases = [("with skull", head, model), ("skull-stripped", head * (ref > 0), model)]
    if older is not None:
        cases.append(("with skull, older model", head, older))
    for name, image, m in cases:
        pred = BrainIDLib.predict(nib.Nifti1Image(image, np.eye(4)), tasks=("segmentation",), model=m,
                                  device="cpu", qc=kinds)
        _, scan = _records(pred, ref, {"map": label_file.name, "case": name})
        seg = np.asarray(pred.outputs["segmentation"].dataobj)
        scan["labelled_outside_brain_ml"] = float(((seg > 0) & (ref == 0)).sum()) / 1000.0
        scan["flagged"] = [s.name for s in pred.qc.flagged()]
        out[name] = scan
        log(f"{name}: scan QC {scan['scan_score']:.3f}, mean Dice {scan['mean_dice']:.3f}, labelled "
            f"{scan['total_ml']:.0f} mL (reference {scan['reference_ml']:.0f} mL; "
            f"{scan['labelled_outside_brain_ml']:.0f} mL outside the brain)")
    pred = BrainIDLib.predict(str(sample_path()), tasks=("segmentation",), model=model, device="cpu", qc=kinds)
    out["sample (real, skull-stripped)"] = {"scan_score": pred.qc.scan_score, "total_ml": pred.qc.total_volume_ml,
                                            "flagged": [s.name for s in pred.qc.flagged()]}
    log(f"shipped sample: scan QC {pred.qc.scan_score:.3f}, flagged {out['sample (real, skull-stripped)']['flagged']}")
    return out


def cost(model, kinds: tuple, log, repeats: int = 3) -> dict:
    """CPU seconds of predict() on the shipped sample without and with QC (best of `repeats`)."""
    BrainIDLib.predict(str(sample_path()), model=model, device="cpu")  # warm-up
    best = {}
    for qc in (False, True) * repeats:
        t = time.process_time()
        BrainIDLib.predict(str(sample_path()), model=model, device="cpu", qc=kinds if qc else False)
        key = "with_qc_s" if qc else "without_qc_s"
        best[key] = min(best.get(key, math.inf), time.process_time() - t)
    best["ratio"] = best["with_qc_s"] / best["without_qc_s"]
    log(f"cost on the sample: {best['without_qc_s']:.2f} CPU s without QC, {best['with_qc_s']:.2f} with "
        f"({best['ratio']:.2f}x)")
    return best


def plot(path: Path, rows: list, scans: list, res: dict, demo: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.35, 1]})
    ax = axes[0]
    colours = np.array([label_color(r["label"]) for r in rows]) / 255.0
    ax.scatter([r["qc"] for r in rows], [r["dice"] for r in rows], s=9, c=colours, alpha=0.7, linewidths=0)
    t = res["flag_best"]["threshold"]
    ax.axvline(Q.FLAG_BELOW, color="k", lw=1, ls="--", label=f"flag threshold {Q.FLAG_BELOW:g}")
    ax.axhline(DICE_FAIL, color="grey", lw=0.8, ls=":", label=f"Dice {DICE_FAIL:g}")
    lib = res["flag_library"]
    ax.set_title(f"per structure: Spearman {res['spearman_pooled']['qc']:.2f} ({res['pairs']} pairs, "
                 f"{res['draws']} draws)\nflag QC < {Q.FLAG_BELOW:g}: precision {lib['precision']:.2f}, recall "
                 f"{lib['recall']:.2f} for Dice < {DICE_FAIL:g} (best Youden J at {t:g})", fontsize=9)
    ax.set_xlabel("QC score (structure colour = FreeSurfer colour)")
    ax.set_ylabel("true Dice at 1 mm")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax = axes[1]
    sev = np.array([s["severity"] for s in scans])
    sc = ax.scatter([s["scan_score"] for s in scans], [s["mean_dice"] for s in scans], c=sev, cmap="viridis", s=22,
                    vmin=0, vmax=1, label="held-out draws (colour: severity)")
    fig.colorbar(sc, ax=ax, shrink=0.8, label="severity")
    if demo:
        for name, marker, colour in (("with skull", "X", "red"), ("skull-stripped", "P", "C1"),
                                     ("with skull, older model", "s", "m")):
            d = demo.get(name)
            if d:
                ax.scatter([d["scan_score"]], [d["mean_dice"]], marker=marker, s=110, c=colour, edgecolors="k",
                           label=f"T1 draw, {name} ({d['total_ml'] / 1000:.1f} L labelled)")
        real = demo.get("sample (real, skull-stripped)")
        if real:
            ax.axvline(real["scan_score"], color="grey", ls="--", lw=1,
                       label=f"shipped sample (real, no per-structure truth): {real['scan_score']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_title(f"whole scan: Spearman {res['scan_spearman']:.2f} with mean Dice", fontsize=9)
    ax.set_xlabel("whole-scan QC score")
    ax.set_ylabel("mean Dice (32 structures)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="brainid-lite", help="weights file or registry name")
    ap.add_argument("--labels", nargs="+", type=Path, required=True, help="held-out 1 mm label maps")
    ap.add_argument("--draws", type=int, default=10, help="draws per label map")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/brainid-qc-calibration.json"))
    ap.add_argument("--quick", action="store_true",
                    help="skip the with-skull / skull-stripped comparison and the cost measurement")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--perturbations", nargs="+", default=list(Q.PERTURBATIONS), choices=Q.KNOWN_PERTURBATIONS,
                    help="QC passes (default: BrainIDLib.qc's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--older-model", help="also run the with-skull draw through this model (e.g. an earlier "
                                          "brainid-lite that labels the scalp as brain) to show its whole-scan score")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)

    model = BrainIDLib.load_model(args.model)
    kinds = tuple(args.perturbations)
    rows, scans = run_draws(model, args.labels, args.draws, args.cache, kinds, log)
    res = calibrate(rows, scans)
    older = BrainIDLib.load_model(args.older_model) if args.older_model else None
    demo = None if args.quick else skull_demo(model, args.labels[0], kinds, log, older)
    costs = None if args.quick else cost(model, kinds, log)
    print(f"\nper-structure Spearman(signal, true Dice) over {res['pairs']} (draw, structure) pairs, {res['draws']} draws:")
    for s, v in res["spearman_pooled"].items():
        print(f"  {s:22s} pooled {v:6.3f}   median within a structure {res['spearman_within_structure_median'][s]:6.3f}")
    for key in ("flag_best", "flag_library", "flag_leave_one_map_out"):
        f = res[key]
        if f:
            print(f"{key:24s} threshold {f['threshold']}: precision {f['precision']:.3f} recall {f['recall']:.3f} "
                  f"specificity {f['specificity']:.3f} ({f['flagged']} flagged, {f['failing']} with Dice < {DICE_FAIL:g})")
    print(f"whole-scan score vs mean Dice: Spearman {res['scan_spearman']:.3f}")
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    plot(args.out / "images" / "qc-calibration.png", rows, scans, res, demo)
    doc = {"command": "python benchmarks/qc_calibration.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
           "label_maps": [p.name for p in args.labels], "draws_per_map": args.draws,
           "perturbations": list(kinds), "results": res, "skull_demo": demo, "cost": costs}
    (args.out / "qc-calibration.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    log(f"wrote {args.out / 'images' / 'qc-calibration.png'} and {args.out / 'qc-calibration.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
