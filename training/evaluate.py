"""`brainid-train evaluate`: task metrics and feature robustness per contrast family and resolution
regime, on synthetic draws from held-out label maps; JSON + Markdown report + PNG plots.

Every (family, regime) condition of a subject uses the same draw seed, so all conditions share one
anatomy (the generator draws the spatial transform before the contrast): metrics are comparable
across conditions and the features of one subject can be compared voxel by voxel.

Contrast families
- gmm: the official random Gaussian-mixture contrast (generator, CT/FLAIR options off).
- t1, t2, flair, ct: the generator's T1-/T2-/FLAIR-/CT-like class means (<family>_prob = 1).
Resolution regimes (spec 3.6): 1mm, thick_slice, low_field, low_iso; the generator's own
resolution draw is forced to the regime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import BrainIDLib
from BrainIDLib import metrics as M
from BrainIDLib.devices import select_device
from BrainIDLib.errors import BrainIDError
from BrainIDLib.inference import brain_fade, brain_weight
from BrainIDLib.labels import SEGMENTATION_LABELS

from .config import Config, crop_sizes, load_config, with_defaults
from .data import NiftiSteps, list_files, make_generator, seed_for
from .adapt import NEEDS
from .engine import read_log

FAMILIES = ("t1", "t2", "flair", "ct", "gmm")
REGIMES = ("1mm", "thick_slice", "low_field", "low_iso")
FEATURE_VOXELS = 20000
_SEG_IDS = torch.tensor(SEGMENTATION_LABELS)


def family_options(family: str) -> dict:
    """Generator options that force a contrast family."""
    keys = [f"{f}_prob" for f in FAMILIES if f != "gmm"]
    return {k: 1.0 if k == f"{family}_prob" else 0.0 for k in keys}


def _regime_probs(regime: str):
    p = [0.0] * 4
    p[REGIMES.index(regime)] = 1.0
    return (tuple(p), tuple(p))


class ConditionSampler:
    """Draws one sample of a subject under a (family, regime) condition, generator-backed."""

    def __init__(self, cfg: Config, size):
        self.data_cfg = dict(cfg["data"])
        self.size = size
        self.severity = 0.0
        self._gens = {}

    def _gen(self, family: str, regime: str):
        key = (family, regime)
        if key not in self._gens:
            dc = dict(self.data_cfg)
            options = dict(dc.get("generator") or {})
            options.setdefault("preset", "brainid")
            if options["preset"] not in ("brainid", "brainid-extended"):
                options["preset"] = "brainid"
            options.update(family_options(family))
            options["resolution_probs"] = _regime_probs(regime)
            dc.update(generator=options, mild=1, severe=0)
            self._gens[key] = make_generator(dc, self.size)
        return self._gens[key]

    def draw(self, labels, t1, family: str, regime: str, seed: int) -> dict:
        return self._gen(family, regime)(labels, t1=t1, seed=seed, severity=[self.severity])


def _generator_subject(sampler: ConditionSampler, path: Path, draw_seed: int):
    from BrainIDLib.synth import load_label_map

    labels = load_label_map(path)[0]
    return lambda family, regime: sampler.draw(labels, None, family, regime, draw_seed)


def model_and_heads(cfg: Config, args, run_dir: Path | None):
    """The model and its head files, from --weights / --head, else a run directory, else the config."""
    weights = getattr(args, "weights", None) or cfg["evaluate"]["weights"]
    heads = dict(cfg["evaluate"]["heads"] or {})
    for item in getattr(args, "head", None) or []:
        if "=" not in item:
            raise BrainIDError(f"--head expects TASK=FILE, got {item!r}")
        t, f = item.split("=", 1)
        heads[t] = f
    if run_dir is not None:
        if weights is None:
            own = run_dir / "model.safetensors"
            weights = str(own) if own.is_file() else cfg["model"]["init"]
        if not heads and not (run_dir / "model.safetensors").is_file():
            heads = {p.name[: -len("_head.safetensors")]: str(p) for p in sorted(run_dir.glob("*_head.safetensors"))}
    if weights is None:
        weights = cfg["model"]["init"]
    if not weights:
        raise BrainIDError("no model: give --run RUN_DIR, --weights FILE or evaluate.weights")
    return BrainIDLib.load_model(weights, heads=heads or None), str(weights), heads


def _to_ids(indices: torch.Tensor) -> np.ndarray:
    return _SEG_IDS[indices.long().cpu()].numpy()


@torch.no_grad()
def evaluate(cfg: Config, model, out_dir: Path, run_dir: Path | None = None, labels_spec=None,
             model_name: str = "", head_files: dict | None = None) -> dict:
    ec = cfg["evaluate"]
    device = select_device(cfg["run"]["device"])
    model = model.to(device).eval()
    size = max(crop_sizes(cfg["data"]["size"]), key=lambda s: s[0] * s[1] * s[2])
    families = [f for f in ec["families"] if f in FAMILIES]
    regimes = [r for r in ec["regimes"] if r in REGIMES]
    unknown = sorted(set(ec["families"]) - set(FAMILIES)) + sorted(set(ec["regimes"]) - set(REGIMES))
    if unknown or not families or not regimes:
        raise BrainIDError(f"evaluate.families must be among {', '.join(FAMILIES)} and evaluate.regimes among "
                           f"{', '.join(REGIMES)} (unknown: {', '.join(unknown) or 'none'})")
    seed = int(cfg["run"]["seed"])
    if cfg["data"]["source"] == "nifti":  # real images: one family, each regime applied to the 1 mm image
        real = NiftiSteps({**cfg["data"], "mild": 1}, seed, corruption=cfg["adapt"]["corruption"],
                          normalisation=(model.metadata or {}).get("input", {}).get("normalisation"))
        families = ["real"]
        n = min(int(ec["subjects"]), len(real.subjects))
        subjects = [(Path(real.subjects[i]["image"]).name,
                     lambda family, regime, i=i: real.draw(i, seed_for(seed, 900_001, i) % 2**32, REGIMES.index(regime)))
                    for i in range(n)]
        notes = [f"real images from data.subjects, deformed and flipped as in adaptation training, "
                 f"{cfg['adapt']['corruption']} corruption, each regime simulated from the 1 mm image"]
    else:
        sampler = ConditionSampler(cfg, size)
        files = list_files(labels_spec or cfg["data"]["labels"], "label maps to evaluate on (data.labels / --labels)")
        subjects = [(p.name, _generator_subject(sampler, p, seed_for(seed, 900_001, i) % 2**62))
                    for i, p in enumerate(files[: int(ec["subjects"])])]
        notes = []
    tasks = model.tasks
    fade = brain_fade(model)
    rows, examples = [], {}
    structure_dice: dict[str, list] = {}
    feature_stats = {"per_subject": []}
    subject_feats = []
    for si, (name, draw_fn) in enumerate(subjects):
        vox = None
        feats_conditions, cond_names, mask_k = [], [], None
        for family in families:
            for regime in regimes:
                draw = draw_fn(family, regime)
                x = draw["inputs"][:1].to(device).float()
                feats = model.features(x)
                row = {"subject": name, "family": family, "regime": regime}
                mask = draw["mask"] if "mask" in draw else (draw["segmentation"] > 0 if "segmentation" in draw
                                                               else draw["inputs"][0, 0] > 0.05)
                mask = mask.to(device)
                for task in tasks:
                    if NEEDS[task] not in draw:
                        continue  # no reference for this task in this data
                    out = model.apply_head(task, feats, x)[0]
                    if task == "anatomy" and fade:  # as predict gives it (BrainIDLib.inference.brain_fade)
                        out = out * brain_weight(model, model.apply_head("segmentation", feats, x)[0], fade)
                    if task == "segmentation":
                        pred_ids = _to_ids(out.argmax(0))
                        ref_ids = _to_ids(draw["segmentation"])
                        table = M.dice_table(pred_ids, ref_ids)
                        row["dice_mean"] = table["mean"]
                        for name, v in table["per_structure"].items():
                            structure_dice.setdefault(name, []).append(v)
                        if (family, regime) == (families[0], regimes[0]) and si == 0:
                            examples["segmentation"] = pred_ids
                            examples["segmentation_ref"] = ref_ids
                    elif task in ("anatomy", "super_resolution"):
                        ref = draw["target_t1"][0] if task == "anatomy" else draw["clean"][0, 0]
                        ref = ref.float().cpu()
                        pred = out[0].float().cpu()
                        m = M.image_metrics(pred, ref)
                        row.update({f"{task}_{k}": v for k, v in m.items()})
                        if si == 0 and regime == regimes[0]:
                            examples.setdefault(task, {})[family] = pred.numpy()
                    elif task == "bias_field":
                        pred = torch.exp(out[0].float()).cpu()
                        ref = draw["bias_field"][0, 0].float().cpu()
                        row["bias_field_nl2"] = M.normalised_l2(pred, ref, mask.cpu())
                if si == 0:
                    examples.setdefault("inputs", {})[(family, regime)] = draw["inputs"][0, 0].numpy()
                    if "target_t1" in draw:
                        examples["target"] = draw["target_t1"][0].float().numpy()
                if ec["features"]:
                    if vox is None:
                        g = torch.Generator().manual_seed(seed_for(seed, 900_002, si))
                        n = int(np.prod(size))
                        vox = torch.randperm(n, generator=g)[: min(FEATURE_VOXELS, n)].to(device)
                        mask_k = mask.reshape(-1)[vox].cpu()
                    feats_conditions.append(feats[0].reshape(feats.shape[1], -1)[:, vox].float().cpu())
                    cond_names.append((family, regime))
                rows.append(row)
        if ec["features"] and len(feats_conditions) >= 2:
            stack = torch.stack(feats_conditions)  # (S, C, K)
            fs = {"subject": name, "consistency_all": M.feature_consistency(stack, mask_k)}
            for family in families:
                idx = [i for i, c in enumerate(cond_names) if c[0] == family]
                if len(idx) >= 2:
                    fs[f"consistency_family_{family}"] = M.feature_consistency(stack[idx], mask_k)
            for regime in regimes:
                idx = [i for i, c in enumerate(cond_names) if c[1] == regime]
                if len(idx) >= 2:
                    fs[f"consistency_regime_{regime}"] = M.feature_consistency(stack[idx], mask_k)
            feature_stats["per_subject"].append(fs)
            subject_feats.append((stack, mask_k))
    if len(subject_feats) >= 2:
        common = torch.stack([m for _, m in subject_feats]).all(0)
        feature_stats["distinctiveness"] = M.feature_distinctiveness([s for s, _ in subject_feats], common)
        feature_stats["between_subject_similarity"] = 1 - feature_stats["distinctiveness"]
    if feature_stats["per_subject"]:
        feature_stats["consistency"] = float(np.mean([f["consistency_all"] for f in feature_stats["per_subject"]]))
    elif ec["features"]:
        notes.append("feature robustness needs at least two conditions per subject")
    if ec["features"] and len(subject_feats) < 2:
        notes.append("inter-subject distinctiveness needs evaluate.subjects >= 2 label maps")

    summary = _summarise(rows, families, regimes)
    report = {
        "model": model_name, "heads": {k: str(v) for k, v in (head_files or {}).items()}, "tasks": tasks,
        "label_maps": [name for name, _ in subjects], "size": list(size), "families": families, "regimes": regimes,
        "notes": notes, "conditions": rows, "summary": summary,
        "per_structure_dice": {k: _nanmean(v) for k, v in structure_dice.items()},
        "features": {k: v for k, v in feature_stats.items()},
        "psnr_cap_db": M.PSNR_CAP_DB,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(_finite(report), indent=2))
    md = _markdown(report)
    (out_dir / "evaluation.md").write_text(md)
    report["plots"] = _plots(out_dir, report, examples, run_dir)
    report["markdown_path"] = str(out_dir / "evaluation.md")
    (out_dir / "evaluation.json").write_text(json.dumps(_finite(report), indent=2))
    return report


def _nanmean(values) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _finite(obj):
    """JSON has no NaN: undefined values become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


METRIC_COLUMNS = [("dice_mean", "Dice"), ("anatomy_psnr", "Anat PSNR"), ("anatomy_ssim", "Anat SSIM"),
                  ("anatomy_ms_ssim", "Anat MS-SSIM"), ("anatomy_l1", "Anat L1"), ("super_resolution_psnr", "SR PSNR"),
                  ("super_resolution_ssim", "SR SSIM"), ("super_resolution_ms_ssim", "SR MS-SSIM"),
                  ("bias_field_nl2", "Bias nL2")]


def _summarise(rows, families, regimes) -> dict:
    keys = [k for k, _ in METRIC_COLUMNS if any(k in r for r in rows)]
    out = {}
    for family in families + ["all"]:
        for regime in regimes + ["all"]:
            sel = [r for r in rows if family in (r["family"], "all") and regime in (r["regime"], "all")]
            out.setdefault(family, {})[regime] = {k: _nanmean([r[k] for r in sel if k in r]) for k in keys}
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _markdown(report: dict) -> str:
    keys = [(k, n) for k, n in METRIC_COLUMNS if any(k in r for r in report["conditions"])]
    lines = [f"# Brain-ID evaluation: {report['model']}", "",
             f"Label maps: {', '.join(report['label_maps'])}; crop {report['size']}; tasks: {', '.join(report['tasks']) or 'none'}.",
             f"PSNR is capped at {report['psnr_cap_db']:.0f} dB. Dice: mean over the 32 foreground structures present. "
             "MS-SSIM: 3D, Wang et al.'s weights, 5 scales where the crop allows (fewer, renormalised, on small "
             "crops; see BrainIDLib.metrics).", ""]
    if keys:
        lines += ["| family | regime | " + " | ".join(n for _, n in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for family in report["families"] + ["all"]:
            for regime in report["regimes"] + ["all"]:
                vals = report["summary"][family][regime]
                lines.append(f"| {family} | {regime} | " + " | ".join(_fmt(vals.get(k)) for k, _ in keys) + " |")
        lines.append("")
    f = report["features"]
    if f.get("per_subject"):
        lines += ["## Feature robustness", "",
                  f"- intra-subject consistency (mean cosine similarity at the same voxel across all conditions): "
                  f"{_fmt(f.get('consistency'))}"]
        if "distinctiveness" in f:
            lines.append(f"- inter-subject distinctiveness (1 - cosine similarity between subjects at the same voxel): "
                         f"{_fmt(f['distinctiveness'])}")
        fam = {k[len('consistency_family_'):]: v for k, v in f["per_subject"][0].items() if k.startswith("consistency_family_")}
        if fam:
            lines.append("- consistency across regimes within a family: " + ", ".join(
                f"{k} {_fmt(_nanmean([s.get('consistency_family_' + k, float('nan')) for s in f['per_subject']]))}" for k in fam))
        reg = {k[len('consistency_regime_'):]: v for k, v in f["per_subject"][0].items() if k.startswith("consistency_regime_")}
        if reg:
            lines.append("- consistency across families within a regime: " + ", ".join(
                f"{k} {_fmt(_nanmean([s.get('consistency_regime_' + k, float('nan')) for s in f['per_subject']]))}" for k in reg))
        lines.append("")
    if report["per_structure_dice"]:
        lines += ["## Dice per structure", "", "| structure | Dice |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["per_structure_dice"].items() if not math.isnan(v)]
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _plots(out_dir: Path, report: dict, examples: dict, run_dir: Path | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    log = read_log(run_dir) if run_dir is not None else []
    if log:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = np.array([r["step"] for r in log])
        window = max(1, len(log) // 20)  # moving average over ~5% of the run: per-step losses are noisy
        for key in [k for k in log[0] if k not in ("step", "lr", "step_time", "grad_norm")]:
            vals = np.array([r.get(key, float("nan")) for r in log], dtype=float)
            if window > 1:
                vals = np.convolve(vals, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], vals, label=key, lw=1)
        ax.set_xlabel("step" + (f" (moving average of {window})" if window > 1 else ""))
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("training curves")
        fig.tight_layout()
        fig.savefig(out_dir / "training_curves.png", dpi=100)
        plt.close(fig)
        written.append("training_curves.png")
    dice = {k: v for k, v in report["per_structure_dice"].items() if not math.isnan(v)}
    if dice:
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(dice)), 4))
        ax.bar(range(len(dice)), list(dice.values()), color="tab:blue")
        ax.set_xticks(range(len(dice)), list(dice.keys()), rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title("Dice per structure (all conditions)")
        fig.tight_layout()
        fig.savefig(out_dir / "dice_per_structure.png", dpi=100)
        plt.close(fig)
        written.append("dice_per_structure.png")
    inputs = examples.get("inputs", {})
    if inputs:
        panels = [(f"{f} / {r}", v) for (f, r), v in inputs.items() if r == report["regimes"][0]]
        panels += [(f"{report['families'][0]} / {r}", v) for (f, r), v in inputs.items()
                   if f == report["families"][0] and r != report["regimes"][0]]
        if "target" in examples:
            panels.append(("T1 target", examples["target"]))
        for task in ("anatomy", "super_resolution"):
            if task in examples:
                panels += [(f"{task} from {f}", v) for f, v in examples[task].items()]
        segs = [(k, examples[k]) for k in ("segmentation", "segmentation_ref") if k in examples]
        cols = 5
        n = len(panels) + len(segs)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (title, vol) in zip(axes.flat, panels + segs):
            sl = vol[vol.shape[0] // 2]
            if title.startswith("segmentation"):
                ax.imshow(_colour(sl), interpolation="nearest")
            else:
                ax.imshow(sl.T, cmap="gray", origin="lower")
            ax.set_title(title, fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "examples.png", dpi=100)
        plt.close(fig)
        written.append("examples.png")
    return written


def _colour(label_slice: np.ndarray) -> np.ndarray:
    from BrainIDLib.labels import label_color

    out = np.zeros(label_slice.shape + (3,), dtype=np.uint8)
    for lab in np.unique(label_slice):
        out[label_slice == lab] = label_color(int(lab))
    return np.transpose(out, (1, 0, 2))[::-1]


def run_config(args) -> tuple[Config, Path | None]:
    """The config of `--run RUN_DIR` (completed with defaults), else --config; --set on top."""
    run_dir = Path(args.run) if args.run else None
    if run_dir is None:
        return load_config(args.config, args.overrides), None
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise BrainIDError(f"{run_dir} is not a run directory (no config.json)")
    return load_config(args.config, args.overrides, base=with_defaults(json.loads(saved.read_text())["config"])), run_dir


def evaluate_command(args) -> dict:
    cfg, run_dir = run_config(args)
    if args.print_config:
        print(json.dumps(cfg.plain(), indent=2))
        return {"markdown_path": ""}
    model, name, heads = model_and_heads(cfg, args, run_dir)
    out = Path(args.out or cfg["evaluate"]["out"] or ((run_dir or Path(cfg["run"]["dir"])) / "evaluation"))
    if cfg["run"]["threads"]:
        torch.set_num_threads(int(cfg["run"]["threads"]))
    return evaluate(cfg, model, out, run_dir, args.labels, name, heads)


__all__ = ["evaluate", "evaluate_command", "run_config", "model_and_heads", "FAMILIES", "REGIMES"]
