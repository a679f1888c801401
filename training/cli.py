"""`brainid-train`: pretrain, adapt, evaluate, export and synth-preview from YAML configs.

    brainid-train pretrain --config pretrain_lite_cpu --set data.labels=/data/labelmaps --set run.dir=runs/lite
    brainid-train pretrain --resume runs/lite                      # continue a stopped run
    torchrun --nproc_per_node 4 -m brainid_training.cli pretrain --config pretrain_brainid --set data.labels=...
    brainid-train adapt --config adapt_segmentation --set model.init=runs/lite/model.safetensors
    brainid-train evaluate --run runs/seg                          # or --weights/--head/--labels
    brainid-train export --official --run runs/seg --out exported/ # official-layout torch files
    brainid-train synth-preview --labels labels.nii.gz --out preview.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from BrainIDLib.errors import BrainIDError

from .config import CONFIG_DIR, ConfigError, load_config, with_defaults

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
DEFAULT_CONFIG = {"pretrain": "pretrain_brainid", "adapt": "adapt_segmentation", "evaluate": None}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML file or shipped config name ({', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 --set data.size=[96,96,96] (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainid-train", description="Brain-ID pretraining, adaptation and evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("pretrain", "pretrain the backbone on synthetic subjects"),
                       ("adapt", "train task heads on (frozen) features")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint "
                       "(its saved config is used; --set may still change e.g. run.max_steps)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p = sub.add_parser("evaluate", help="metrics per contrast family and resolution regime, with plots")
    _common(p)
    p.add_argument("--run", help="a pretrain/adapt run directory: its config, outputs and training curves")
    p.add_argument("--weights", help="model file or registry name (else the run's model / model.init)")
    p.add_argument("--head", action="append", default=[], metavar="TASK=FILE", help="a task head file (repeatable)")
    p.add_argument("--labels", help="label maps to evaluate on (folder, glob or file)")
    p.add_argument("--out", help="report folder (default: <run>/evaluation)")
    p.add_argument("--print-config", action="store_true")
    p = sub.add_parser("export", help="write a trained model and/or its heads as official Brain-ID torch files")
    _common(p)
    p.add_argument("--official", action="store_true", help="the official layout: {model: {backbone.*, "
                   "head.final_conv_image.*}} and one {model: {final_conv_<name>.*}} file per head")
    p.add_argument("--run", help="a pretrain/adapt run directory: its model or model.init, and its heads")
    p.add_argument("--weights", help="model file or registry name (else the run's model / model.init)")
    p.add_argument("--head", action="append", default=[], metavar="TASK=FILE", help="a task head file (repeatable)")
    p.add_argument("--heads-only", action="store_true", help="write the task heads only, not the backbone")
    p.add_argument("--name", help="file name prefix (default: the run folder's or the weights file's name)")
    p.add_argument("--out", help="folder to write into")
    p = sub.add_parser("synth-preview", help="PNG of synthetic samples drawn from one label map")
    p.add_argument("labels_pos", nargs="?", metavar="LABELS", help="same as --labels")
    p.add_argument("out_pos", nargs="?", metavar="OUT_PNG", help="same as --out")
    p.add_argument("--labels", help="a label map (NIfTI, FreeSurfer ids), or a folder of them (see --index)")
    p.add_argument("--out", help="the PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs="+", default=None, help="crop size (one or three ints)")
    p.add_argument("--preset", default="brainid", help="generator preset (brainid, brainid-extended, mild)")
    p.add_argument("--index", type=int, default=0, help="which label map of a folder")
    p.add_argument("--t1-dir", default=None, help="folder of T1s named like the label maps (the target)")
    return parser


def _config_for(args) -> "Config":  # noqa: F821
    if getattr(args, "resume", None):
        if args.config:
            raise ConfigError("--resume uses the run's saved config; drop --config (use --set to change values)")
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise BrainIDError(f"{args.resume} is not a run directory (no config.json); nothing to resume")
        base = json.loads(saved.read_text())["config"]
        cfg = load_config(None, args.overrides, base=with_defaults(base))
        cfg["run"]["dir"] = str(Path(args.resume))
        return cfg
    return load_config(args.config or DEFAULT_CONFIG.get(args.command), args.overrides)


def run_command(args) -> int:
    if args.command == "synth-preview":
        from .synth_preview import write_preview

        labels, out_png = args.labels or args.labels_pos, args.out or args.out_pos
        if not labels or not out_png:
            raise ConfigError("synth-preview needs --labels FILE_OR_DIR and --out preview.png")

        size = None
        if args.size:
            size = tuple(args.size * 3) if len(args.size) == 1 else tuple(args.size)
        kwargs = {"seed": args.seed, "preset": args.preset, "index": args.index, "t1_dir": args.t1_dir}
        kwargs |= {"size": size} if size else {}
        out = write_preview(labels, out_png, **kwargs)
        print(out or out_png)
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate_command

        report = evaluate_command(args)
        print(report["markdown_path"])
        return 0
    if args.command == "export":
        from .export_official import export_command

        print(json.dumps({k: str(v) for k, v in export_command(args).items()}, indent=2))
        return 0
    if args.command == "adapt" and not getattr(args, "resume", None):
        from .fewshot import fewshot_config, run_fewshot

        few = fewshot_config(args.config, args.overrides)
        if few is not None:  # a few-shot head from painted voxels (training/fewshot.py)
            if args.print_config:
                print(json.dumps({k: v for k, v in few.items() if k != "_base"}, indent=2))
                return 0
            run_fewshot(few)
            return 0
    cfg = _config_for(args)
    if args.print_config:
        print(json.dumps(cfg.plain(), indent=2))
        return 0
    from .engine import train

    if args.command == "pretrain":
        from .pretrain import make_job
    else:
        from .adapt import make_job
    summary = train(cfg, args.command, make_job, resume=bool(args.resume))
    if summary.get("interrupted"):
        return EXIT_SIGNAL.get(summary["interrupted"], 0)
    outputs = summary.get("outputs", {})
    if outputs:
        print(json.dumps(outputs, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except BrainIDError as e:
        print(f"brainid-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("brainid-train: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
