"""`brainid`: run Brain-ID from the command line.

    brainid predict INPUT --task segmentation --task anatomy --output OUTDIR_OR_PREFIX [--model NAME_OR_PATH]
    brainid predict --sample --model NAME --output out/
    brainid predict SCANS_FOLDER_OR_LIST.txt --output OUTDIR [--overwrite]     (a cohort: see cohort.py)
    brainid features INPUT --output feats.nii.gz [--pca 3]
    brainid models
    brainid download NAME
    brainid correspond --source SRC --point R,A,S --target T [--target T2|FOLDER ...] --out DIR
    brainid fewshot train --image A --annotation A_lab [--image B --annotation B_lab ...] --out HEAD.safetensors
    brainid fewshot apply --head HEAD.safetensors --input SCAN_OR_FOLDER --output DIR

Every user-fixable problem (a BrainIDError, or a file-system error) prints `brainid: error: <message>`
on one line and exits with status 2; inputs, output folders and model files are checked before any
compute. Warnings become `brainid: note: <message>` lines. Ctrl-C (or SIGTERM) exits with 130 and
leaves no half-written file; torch is imported only inside `main`, so `--version` and `--help` are fast.
`--progress-format machine` prints `PROGRESS <fraction> <message>` lines (flushed, on stdout) and
`OUTPUT <kind> <path>` for every file written, for front ends such as the Slicer module.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .console import (PROG, Reporter, check_writable, describe, load_command_model, model_tasks, one_line, output_paths,
                      parse_heads, qc_wanted, unique_stems, write_prediction)
from .devices import HELP as DEVICE_HELP
from .errors import BrainIDError
from .files import safe_name, save_nifti, scan_paths
from .tasks import OUTPUT_TASKS
from .tasks import parse as parse_tasks

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes on one line, like every other error."""

    def error(self, message):
        raise BrainIDError(f"{message} (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME_OR_PATH",
                   help="registered model name (see `brainid models`) or a weights file (.safetensors or official .pth)")
    p.add_argument("--head", action="append", default=[], metavar="TASK=FILE",
                   help="add or replace a task head from a head file (official final_conv_*.pth or BrainID head); repeatable")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--mode", default="auto", choices=("auto", "whole", "tiled"),
                   help="whole-volume or tiled inference (same results; tiled keeps activations in RAM or on disk and "
                        "streams slabs through the device); auto picks from the memory budget")
    p.add_argument("--memory-gb", type=float, default=None, metavar="X",
                   help="memory budget in GB for choosing whole-volume vs tiled inference")
    p.add_argument("--progress-format", default="bar", choices=("bar", "machine", "none"),
                   help="bar: progress bars on stderr; machine: 'PROGRESS <fraction> <message>' lines on stdout")
    p.add_argument("--sample", action="store_true", help="use the sample volume shipped with BrainID as INPUT")
    p.add_argument("--max-voxels", type=int, default=None, metavar="N",
                   help="refuse scans whose model grid exceeds N voxels (default 32M, i.e. a 320 mm cube at 1 mm; "
                        "or set BRAINID_MAX_VOXELS)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="CPU arithmetic: bf16 (bfloat16 convolutions, faster on CPUs with native bf16), fp32, or "
                        "auto: bf16 only where the CPU has it natively and the model was measured equivalent")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Brain-ID: contrast-agnostic brain MRI features, segmentation, "
                     "T1 synthesis, super-resolution and bias field estimation.")
    parser.add_argument("--version", action="version", version=f"brainid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("predict", help="run task heads on a scan (or a cohort) and write one NIfTI per output",
                       description="Run task heads on a NIfTI scan, or on a cohort: a folder of scans or a list "
                                   "file (.txt/.lst/.list, one path per line). Outputs lie on the input's exact grid.")
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="a NIfTI scan (.nii/.nii.gz), 'sample', a folder of scans or a list file (a cohort)")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="segmentation, anatomy, super_resolution or bias_field; repeatable or comma-separated "
                        "(default: every task the model has)")
    p.add_argument("--output", "-o", required=True, metavar="OUTDIR_OR_PREFIX",
                   help="a folder (existing, or ending in '/'), a prefix (PREFIX_<task>.nii.gz) or, for one "
                        "output, a .nii.gz file name")
    p.add_argument("--on-1mm", action="store_true", help="also write the outputs on the model's 1 mm RAS grid")
    p.add_argument("--no-volumes", action="store_true", help="do not write the structure volumes CSV")
    p.add_argument("--qc", action=argparse.BooleanOptionalAction, default=None,
                   help="score how far each structure and the whole segmentation can be trusted (perturbed "
                        "passes of the network): QC columns in the volumes CSV and <...>_qc.json "
                        "(default: on whenever segmentation runs)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write the per-voxel QC uncertainty map (<...>_uncertainty.nii.gz, 0 sure to 1 uniform)")
    p.add_argument("--report", action="store_true",
                   help="also write <...>_report.html: one self-contained page with montages, volumes and QC")
    p.add_argument("--no-cleanup", action="store_true",
                   help="keep every island of each structure (default: each keeps its largest connected piece; "
                        "stray islands take their next most probable label)")
    p.add_argument("--overwrite", action="store_true",
                   help="cohorts: run scans whose outputs already exist again (default: skip them)")
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("features", help="write the Brain-ID feature maps (or a PCA of them) as a NIfTI",
                       description="Write the backbone's features on the input grid; --pca K keeps K principal "
                                   "components (3 gives a colour view).")
    p.add_argument("input", nargs="?", metavar="INPUT", help="a NIfTI scan, or 'sample'")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="output .nii.gz (4D: one volume per channel)")
    p.add_argument("--pca", type=int, default=None, metavar="K", help="keep K principal components (e.g. 3)")
    _add_common(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("models", help="list registered models and whether they are available here",
                       description="List the model registry and the cache status of each model.")
    p.add_argument("--check", action="store_true", help="also hash the files present (verified / corrupt)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="download a registered model into the cache (or say where to place it)",
                       description="Download a registered model (resumable, SHA-256 checked) into the cache.")
    p.add_argument("name", metavar="NAME", help="registered model name (see `brainid models`)")
    p.add_argument("--force", action="store_true", help="download again even if the file is cached")
    p.add_argument("--progress-format", default="bar", choices=("bar", "machine", "none"))
    p.set_defaults(func=cmd_download)

    _add_correspond(sub)
    _add_fewshot(sub)
    return parser


def _add_analysis_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME_OR_PATH",
                   help="registered model name (see `brainid models`) or a weights file")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--feature-cache", default="default", metavar="DIR|off",
                   help="folder caching feature maps between runs (default $BRAINID_CACHE/features, "
                        "i.e. ~/.cache/brainid/features); 'off' keeps them in memory only")
    p.add_argument("--progress-format", default="bar", choices=("bar", "machine", "none"),
                   help="bar: progress bars on stderr; machine: 'PROGRESS <fraction> <message>' lines on stdout")


def _add_correspond(sub) -> None:
    p = sub.add_parser("correspond", help="find the anatomical correspondence of a point on other scans",
                       description="Match a point (RAS mm) on a source scan to the most similar anatomy on each "
                                   "target scan (any contrast, any subject) by cosine similarity of Brain-ID "
                                   "features at the point and on cubes of 12-50 mm around it. Writes one "
                                   "similarity heatmap per scan (on its own grid) and correspondence.json.")
    p.add_argument("--source", required=True, metavar="SRC", help="the scan holding the point (NIfTI)")
    p.add_argument("--point", required=True, metavar="R,A,S", help="the point in RAS millimetres, e.g. -24,-20,-12")
    p.add_argument("--target", action="append", default=[], required=True, metavar="T",
                   help="a scan to search, or a folder of scans (batch); repeatable")
    p.add_argument("--out", "--output", dest="out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-self", action="store_true", help="do not write the source's self-similarity heatmap")
    p.add_argument("--context-mm", metavar="R1,R2,...", default=None,
                   help="ring radii (mm) compared around the point (default 12,20,30,40,50); 0: the point's "
                        "own voxel only (plain per-voxel cosine similarity)")
    _add_analysis_common(p)
    p.set_defaults(func=cmd_correspond)


def _add_fewshot(sub) -> None:
    p = sub.add_parser("fewshot", help="few-shot segmentation: train a head on painted voxels, apply it to scans",
                       description="Train a 1x1x1 head on frozen Brain-ID features from a few painted structures "
                                   "(train), then segment those structures on scans of any contrast (apply).")
    fs = p.add_subparsers(dest="fewshot_command", metavar="ACTION", parser_class=_Parser)
    t = fs.add_parser("train", help="train a head on painted label images",
                      description="Annotations: integer label images on their scan's grid, 0 = unpainted, k = "
                                  "segment k. Negatives: a label named 'background', else the unpainted voxels "
                                  "of the painted slices.")
    t.add_argument("--image", action="append", default=[], required=True, metavar="SCAN", help="a scan (repeatable)")
    t.add_argument("--annotation", action="append", default=[], required=True, metavar="LABELS",
                   help="its painted label image (one per --image, same order)")
    t.add_argument("--names", default=None, metavar="1=NAME,2=NAME",
                   help="segment names by label value; a label named 'background' marks explicit negatives")
    t.add_argument("--out", "--output", dest="out", required=True, metavar="HEAD.safetensors", help="the head file to write")
    t.add_argument("--name", default=None, help="the head's name (default: its segment names)")
    t.add_argument("--description", default="", help="a free-text description stored in the head")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default 300)")
    _add_analysis_common(t)
    t.set_defaults(func=cmd_fewshot_train)
    a = fs.add_parser("apply", help="segment scans with a trained head",
                      description="Writes OUTPUT/<scan>_<head name>.nii.gz (int16 labels on the scan's grid).")
    a.add_argument("--head", required=True, metavar="HEAD.safetensors", help="a head from `brainid fewshot train`")
    a.add_argument("--input", action="append", default=[], required=True, metavar="SCAN_OR_FOLDER",
                   help="a scan or a folder of scans (batch); repeatable")
    a.add_argument("--output", "--out", dest="output", required=True, metavar="DIR", help="output folder")
    a.add_argument("--model", metavar="NAME_OR_PATH", help="the backbone (default: the one the head names)")
    a.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    a.add_argument("--feature-cache", default="default", metavar="DIR|off")
    a.add_argument("--progress-format", default="bar", choices=("bar", "machine", "none"))
    a.set_defaults(func=cmd_fewshot_apply)
    p.set_defaults(func=lambda args: _fewshot_usage(p))


# ------------------------------------------------------------------------------------- helpers
def _input_path(args) -> Path:
    from .samples import sample_path

    if args.sample or (args.input in ("sample", "SAMPLE") and not Path(args.input).exists()):
        if args.sample and args.input and args.input.lower() != "sample":
            raise BrainIDError("give either INPUT or --sample, not both")
        return sample_path()
    if not args.input:
        raise BrainIDError("no input: give a NIfTI file (or --sample for the shipped sample volume)")
    path = Path(args.input).expanduser()
    if not path.exists():
        raise BrainIDError(f"input image not found: {path}")
    if path.is_dir():
        raise BrainIDError(f"{path} is a folder; give one NIfTI file (convert DICOM series with dcm2niix)")
    return path


def _read_input(path: Path):
    """The scan, read and checked (format, shape, affine, values) before any model is loaded."""
    from .volume import load_volume

    return load_volume(path)


def _call(fn, **kwargs):
    """Call fn with the keyword arguments its signature accepts (engine versions may differ)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _check_memory(args) -> None:
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise BrainIDError(f"--memory-gb must be a positive number of gigabytes, got {args.memory_gb}")


# ------------------------------------------------------------------------------------ commands
def cmd_predict(args) -> int:
    from .cohort import is_cohort_input, run_cohort
    from .devices import select_device
    from .inference import cpu_precision

    tasks = parse_tasks(args.task, OUTPUT_TASKS)
    _check_memory(args)
    if is_cohort_input(args):
        return run_cohort(args, tasks)
    input_path = _input_path(args)
    device = select_device(args.device)  # fail early on a missing GPU
    cpu_precision(args.precision, None, device)
    parse_heads(args.head)  # fail early on bad --head values
    check_writable(output_paths(args.output, input_path, ["x"])[1].parent, "--output")
    volume = _read_input(input_path)
    reporter = Reporter(args.progress_format)
    try:
        model, label = load_command_model(args.model, reporter, parse_heads(args.head))
        tasks = model_tasks(model, label, tasks)
        qc = qc_wanted(args, tasks)
        reporter.info(f"{describe(model, label)} on {device.type}; input {input_path}")
        from .inference import predict

        pred = _call(predict, image=volume, tasks=tuple(tasks), model=model, device=str(device),
                     on_1mm=args.on_1mm, mode=args.mode, memory_budget_gb=args.memory_gb, progress=reporter,
                     max_voxels=args.max_voxels, qc=qc, precision=args.precision, cleanup=not args.no_cleanup)
    finally:
        reporter.close()
    for message in getattr(pred, "messages", None) or []:
        if str(message) not in _NOTED:  # already printed as a note
            reporter.info(str(message))
    write_prediction(pred, model, label, input_path, args.output, args, reporter.output, reporter.info)
    return 0


def cmd_features(args) -> int:
    from .devices import select_device
    from .inference import cpu_precision

    _check_memory(args)
    input_path = _input_path(args)
    device = select_device(args.device)
    cpu_precision(args.precision, None, device)
    if args.pca is not None and args.pca < 1:
        raise BrainIDError("--pca needs a positive number of components (e.g. 3)")
    out = Path(os.path.expanduser(args.output))
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise BrainIDError(f"--output must be a .nii or .nii.gz file name, got {args.output!r}")
    check_writable(out.parent, "--output")
    volume = _read_input(input_path)
    reporter = Reporter(args.progress_format)
    try:
        model, label = load_command_model(args.model, reporter, parse_heads(args.head))
        reporter.info(f"{describe(model, label)} on {device.type}; input {input_path}")
        from .feature_maps import features

        img = _call(features, image=volume, model=model, device=str(device), pca=args.pca,
                    mode=args.mode, memory_budget_gb=args.memory_gb, progress=reporter, max_voxels=args.max_voxels,
                    precision=args.precision)
    finally:
        reporter.close()
    reporter.output("features", save_nifti(img, out))
    return 0


def _size_text(size: int | None) -> str:
    if not size:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


def cmd_models(args) -> int:
    from .registry import cache_dir, file_path, file_status, load_registry, model_status

    registry = load_registry()
    rows = []
    for m in registry.models:
        files = [{"filename": f.filename, "role": f.role, "path": str(file_path(m, f)),
                  "status": file_status(m, f, args.check), "sha256": f.sha256, "size": f.size,
                  "shipped": f.shipped, "downloadable": bool(f.urls), "verify": f.verify} for f in m.files]
        rows.append({"name": m.name, "default": m.name == registry.default, "status": model_status(m, args.check),
                     "tasks": list(m.tasks), "architecture": m.architecture, "description": m.description,
                     "licence": m.licence, "source": m.source, "verified": m.verified, "files": files})
    if args.json:
        print(json.dumps({"registry": str(registry.source), "cache": str(cache_dir()), "default": registry.default,
                          "models": rows}, indent=2))
        return 0
    print(f"registry: {registry.source}")
    print(f"cache:    {cache_dir()}  (set BRAINID_CACHE to change)")
    header = ("NAME", "STATUS", "TASKS", "ARCH", "SIZE", "CHECKSUM")
    table = [header]
    for r in rows:
        arch = r["architecture"]
        arch_text = f"{arch.get('f_maps', '?')}x{arch.get('levels', '?')}" if arch else "?"
        size = sum(f["size"] or 0 for f in r["files"]) or None
        table.append((r["name"] + (" (default)" if r["default"] else ""), r["status"], ",".join(r["tasks"]) or "-",
                      arch_text, _size_text(size), "sha256" if r["verified"] else "NONE (unverified)"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    for r, m in zip(rows, registry.models):
        print(f"{r['name']}: {r['description']}")
        for f in r["files"]:
            how = "shipped" if f["shipped"] else ("downloadable" if f["downloadable"] else "manual placement")
            state = f["status"] if f["status"] == how else f"{f['status']}; {how}"
            print(f"  {f['role']}: {f['path']} [{state}]")
        if not r["verified"]:
            print("  no published SHA-256: BrainID cannot verify this file (it is still loaded safely: "
                  "tensors only, strict key/shape checks)")
        if any(f["status"] in ("missing", "partial") for f in r["files"]):
            manual = not all(f["downloadable"] or f["shipped"] for f in r["files"])
            print(f"  get it: brainid download {r['name']}" + ("  (prints where to save it by hand)" if manual else ""))
        print(f"  licence: {r['licence']}")
    if registry.default is None:
        print("\nno default model in this registry: pass --model NAME_OR_PATH to `brainid predict`")
    return 0


def cmd_download(args) -> int:
    from .registry import (ManualDownloadRequired, file_path, file_status, load_registry, manual_instructions,
                           sha256_of)

    registry = load_registry()
    entry = registry.get(args.name)
    if entry is None:
        raise BrainIDError(f"no registered model named {args.name!r}; known models: {', '.join(registry.names())}")
    reporter = Reporter(args.progress_format)
    from .registry import download

    try:
        path = download(entry.name, progress=reporter.download, registry=registry, force=args.force)
    except ManualDownloadRequired:
        reporter.close()
        missing = [f for f in entry.files if file_status(entry, f) in ("missing", "partial")]
        for f in missing or entry.files:
            print(manual_instructions(entry, f), file=sys.stderr)
        raise
    finally:
        reporter.close()
    for f in entry.files:
        p = file_path(entry, f)
        if f.verify and f.sha256:
            print(f"{entry.name}: {p} (SHA-256 verified)")
        else:
            print(f"{entry.name}: {p} (no published checksum; this file's SHA-256 is {sha256_of(p)})")
    if args.progress_format == "machine":
        print(f"OUTPUT model {path}", flush=True)
    return 0


# ------------------------------------------------------------------ correspondence and few-shot
def _fewshot_usage(parser) -> int:
    raise BrainIDError("fewshot needs an action: `brainid fewshot train ...` or `brainid fewshot apply ...`")


def _parse_point(text: str):
    import numpy as np

    try:
        values = [float(v) for v in text.replace(";", ",").replace(" ", ",").split(",") if v != ""]
    except ValueError:
        values = []
    if len(values) != 3 or not all(np.isfinite(values)):
        raise BrainIDError(f"--point expects three numbers R,A,S in millimetres (e.g. -24,-20,-12), got {text!r}")
    return np.array(values, dtype=np.float64)


def _ras_text(p) -> str:
    return ",".join(f"{float(v):.2f}" for v in p)


def _parse_context(text: str | None):
    """--context-mm: None (the default rings), () for "0", or positive radii in mm."""
    if text is None:
        return None
    problem = BrainIDError(f"--context-mm expects ring radii in mm separated by commas (e.g. 12,20,30) or 0, got {text!r}")
    try:
        radii = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise problem from None
    if radii == (0.0,):
        return ()
    if not radii or any(not 0 < r <= 200 for r in radii):
        raise problem
    return radii


def cmd_correspond(args) -> int:
    from .correspondence import CONTEXT_MM, find_correspondence, similarity_map
    from .feature_maps import FeatureCache, compute_feature_map
    from .devices import select_device

    point = _parse_point(args.point)
    context = _parse_context(args.context_mm)
    source = scan_paths([args.source], "source")[0]
    targets = scan_paths(args.target, "target")
    device = select_device(args.device)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise BrainIDError(f"--out must be a folder; {out} is a file")
    check_writable(out, "--out")
    for scan in [source] + targets:
        _read_input(scan)
    cache = FeatureCache.from_setting(args.feature_cache)
    reporter = Reporter(args.progress_format)
    try:
        model, label = load_command_model(args.model, reporter)
        reporter.info(f"{describe(model, label)} on {device.type}; source {source}, {len(targets)} target(s)")
        src = compute_feature_map(str(source), model=model, device=str(device), cache=cache,
                                  progress=lambda f, m: reporter(f / (len(targets) + 1), f"source: {m}"))
        matches = find_correspondence(src, point, [str(t) for t in targets], model=model, device=str(device), cache=cache,
                                      progress=lambda f, m: reporter((1 + f * len(targets)) / (len(targets) + 1), m),
                                      context_mm=context)
        self_map = None
        if not args.no_self:  # the source among the targets already has its heatmap
            self_map = next((m.heatmap for t, m in zip(targets, matches) if t.resolve() == source.resolve()), None)
            if self_map is None:
                self_map = similarity_map(src, point, src, context_mm=context, device=str(device))
    finally:
        reporter.close()
    taken: set[str] = set()
    src_stem = unique_stems([source], taken)[0]
    others = [t for t in targets if t.resolve() != source.resolve()]
    other_stems = iter(unique_stems(others, taken))
    stems = [src_stem if t.resolve() == source.resolve() else next(other_stems) for t in targets]
    record = {"source": str(source), "point_ras": [float(v) for v in point], "model": label,
              "context_mm": list(CONTEXT_MM if context is None else context), "matches": []}
    if self_map is not None:
        path = save_nifti(self_map, out / f"{src_stem}_similarity.nii.gz")
        record["source_heatmap"] = str(path)
        reporter.output("heatmap", path)
    for target, stem, m in zip(targets, stems, matches):
        path = out / f"{stem}_similarity.nii.gz"
        if stem != src_stem or self_map is None:  # the source among the targets: its heatmap is written once
            path = save_nifti(m.heatmap, path)
            reporter.output("heatmap", path)
        record["matches"].append({"target": str(target), "point_ras": [float(v) for v in m.point_ras],
                                  "similarity": float(m.similarity), "heatmap": str(path)})
        line = f"match {target.name}: {_ras_text(m.point_ras)} (RAS mm), similarity {m.similarity:.3f}"
        if args.progress_format == "machine":
            print(f"INFO {line}", flush=True)
        else:
            print(line, flush=True)
    from .files import atomic_write

    json_path = atomic_write(out / "correspondence.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    reporter.output("correspondence", json_path)
    return 0


def _parse_names(text: str | None) -> dict[int, str] | None:
    if not text:
        return None
    names = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            label = int(key.strip())
        except ValueError:
            label = None
        if not sep or label is None or not value.strip():
            raise BrainIDError(f"--names expects LABEL=NAME pairs separated by commas (e.g. 1=Hippocampus,2=Amygdala), "
                               f"got {item!r}")
        names[label] = value.strip()
    return names


def cmd_fewshot_train(args) -> int:
    from .devices import select_device
    from .feature_maps import FeatureCache
    from .fewshot import DEFAULT_STEPS, train_head

    images = scan_paths(args.image, "image")
    annotations = scan_paths(args.annotation, "annotation")
    if len(images) != len(annotations):
        raise BrainIDError(f"{len(images)} --image but {len(annotations)} --annotation; give one annotation per image")
    names = _parse_names(args.names)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise BrainIDError(f"--out must be a file name (HEAD.safetensors), {out} is a folder")
    if not out.name.endswith(".safetensors"):
        out = out.with_name(out.name + ".safetensors")
    check_writable(out.parent, "--out")
    for scan in images:
        _read_input(scan)
    device = select_device(args.device)
    cache = FeatureCache.from_setting(args.feature_cache)
    reporter = Reporter(args.progress_format)
    try:
        model, label = load_command_model(args.model, reporter)
        reporter.info(f"{describe(model, label)} on {device.type}; {len(images)} painted scan(s)")
        head = train_head([str(p) for p in images], [str(p) for p in annotations], names=names, model=model,
                          device=str(device), cache=cache, steps=args.steps or DEFAULT_STEPS, progress=reporter,
                          name=args.name, description=args.description)
    finally:
        reporter.close()
    reporter.info(head.summary())
    t = head.training
    reporter.info(f"trained on {t.get('voxels')} voxels in {t.get('fit_seconds')} s (features {t.get('feature_seconds')} s), "
                  f"balanced training accuracy {t.get('train_accuracy')}")
    reporter.output("head", head.save(out))
    return 0


def cmd_fewshot_apply(args) -> int:
    from .devices import select_device
    from .feature_maps import FeatureCache
    from .fewshot import FewShotHead, segment

    head = FewShotHead.load(args.head)
    inputs = scan_paths(args.input, "input")
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise BrainIDError(f"--output must be a folder; {out} is a file")
    check_writable(out, "--output")
    for scan in inputs:
        _read_input(scan)
    device = select_device(args.device)
    cache = FeatureCache.from_setting(args.feature_cache)
    reporter = Reporter(args.progress_format)
    written = []
    try:
        model, label = load_command_model(args.model or head.backbone.get("name"), reporter)
        head.check_backbone(model)
        reporter.info(f"{head.summary()}; {describe(model, label)} on {device.type}; {len(inputs)} scan(s)")
        n = len(inputs)
        stems = unique_stems(inputs, set())
        for i, (scan, stem) in enumerate(zip(inputs, stems)):
            seg = segment(str(scan), head, model=model, device=str(device), cache=cache,
                          progress=lambda f, m, i=i: reporter((i + f) / n, f"{i + 1}/{n}: {m}"))
            written.append(save_nifti(seg, out / f"{stem}_{safe_name(head.name)}.nii.gz"))
            reporter.output("segmentation", written[-1])
    finally:
        reporter.close()
    return 0


# ---------------------------------------------------------------------------------------- main
_NOTED: list[str] = []  # warnings printed as notes during this run


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (NaN voxels replaced, GPU fallbacks, library notices) as one clean line, no source path."""
    text = one_line(message)
    if text not in _NOTED:
        _NOTED.append(text)
        print(f"{PROG}: note: {text}", file=sys.stderr, flush=True)


def _glue_points(argv: list[str]) -> list[str]:
    """`--point -24,-20,-12` -> `--point=-24,-20,-12` (argparse takes a leading '-' for an option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--point" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--point={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class _LibraryLogNotes:
    """nibabel's header fixes ("sform_code 32767 not valid; setting to 0") as notes, for one run."""

    def __enter__(self):
        import logging

        import nibabel.imageglobals  # noqa: F401 - installs its handler, replaced here

        class Handler(logging.Handler):
            def emit(self, record):
                _note(record.getMessage(), None, None, None)

        self.logger = logging.getLogger("nibabel.global")
        self.saved = self.logger.handlers[:]
        self.logger.handlers = [Handler()]
        return self

    def __exit__(self, *exc):
        self.logger.handlers = self.saved


def _import_torch_holding_ctrl_c() -> None:
    """`import torch` with Ctrl-C held until it is done, then raised: a KeyboardInterrupt raised inside
    one of torch's C++ extension initialisers aborts the interpreter (an uncaught pybind11
    error_already_set, exit -6) instead of ending with "interrupted"."""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `brainid` console script; returns the exit status."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _terminate(signum, frame):
            raise KeyboardInterrupt

        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except (ValueError, OSError):
            previous = None
    _NOTED.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = _note
            parser = build_parser()
            args = parser.parse_args(_glue_points(sys.argv[1:] if argv is None else list(argv)))
            if not getattr(args, "func", None):
                parser.print_help(sys.stderr)
                return EXIT_ERROR
            if args.func in (cmd_predict, cmd_features, cmd_correspond, cmd_fewshot_train, cmd_fewshot_apply):
                _import_torch_holding_ctrl_c()
            with _LibraryLogNotes():
                return int(args.func(args) or 0)
    except BrainIDError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"{PROG}: error: out of memory; try --mode tiled with a smaller --memory-gb, or --device cpu",
              file=sys.stderr, flush=True)
        return EXIT_ERROR
    except OSError as e:  # writing outputs or the cache: a full disk, a folder removed meanwhile...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{PROG}: error: {one_line(e.strerror or e)}{where}; check the path and free space",
              file=sys.stderr, flush=True)
        return EXIT_ERROR
    except Exception as e:
        torch = sys.modules.get("torch")
        oom_types = () if torch is None else tuple(
            t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
            if t is not None)
        if oom_types and isinstance(e, oom_types):
            print(f"{PROG}: error: the GPU ran out of memory; try --mode tiled with a smaller --memory-gb, "
                  "or --device cpu", file=sys.stderr, flush=True)
            return EXIT_ERROR
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
