"""`brainid predict` over a cohort: a folder of scans or a list file (one path per line).

    brainid predict scans/ --output out/                # or scans.txt
    torchrun --nproc_per_node 4 -m BrainIDLib.cli predict scans.txt --output out/

The model loads once; a background thread reads and resamples the next scan while the current one
computes (torch and zlib release the GIL). Each scan writes `OUT/<scan>_<task>.nii.gz` and
`<scan>_volumes.csv` as a single `predict` does, and `OUT/cohort_volumes.csv` (one row per scan:
status, error, seconds and one column per structure in mL) is rewritten atomically as scans
finish. A scan whose outputs all exist is skipped (`--overwrite` redoes it), so a stopped run
resumes; a bad scan is noted and recorded, and the others go on. Exit status: 0 when every scan
succeeded, 1 when some failed, 2 for usage errors (checked before the model loads).

Under torchrun, rank r takes scans r, r+N, r+2N...; torch.distributed (gloo) serves only to know
the rank and world size and to gather every rank's rows into the summary on rank 0.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from .console import (PROG, Reporter, check_writable, describe, load_command_model, model_tasks, one_line, output_paths,
                      parse_heads, qc_wanted, unique_stems, write_prediction)
from .errors import BrainIDError
from .files import atomic_write, scan_paths
from .labels import label_name
from .tasks import outputs_of

LIST_SUFFIXES = (".txt", ".lst", ".list")
SUMMARY_NAME = "cohort_volumes.csv"
STATUS_COLUMNS = ("scan", "output", "status", "error", "seconds")
# A scan's own problems (unreadable, out of memory, torch errors): recorded without a traceback.
USER_ERRORS = (BrainIDError, OSError, MemoryError, RuntimeError)
# The final gather waits for the slowest rank: a cohort may keep ranks apart for days.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass
class Scan:
    index: int  # position in the cohort list
    path: Path
    stem: str  # output name: OUT/<stem>_<task>.nii.gz (unique in the cohort)


@dataclass
class Row:
    """One scan's line in the summary."""

    index: int
    scan: str
    output: str
    status: str  # ok, skipped (outputs existed) or failed
    error: str = ""
    seconds: float | None = None
    volumes_ml: dict = field(default_factory=dict)  # label -> mL


# ------------------------------------------------------------------------------------ the list
def is_cohort_input(args) -> bool:
    """A folder or a list file (.txt/.lst/.list) as predict's INPUT."""
    if args.sample or not args.input:
        return False
    path = Path(args.input).expanduser()
    return path.is_dir() or (path.is_file() and path.name.lower().endswith(LIST_SUFFIXES))


def read_scan_list(source: Path) -> list[Path]:
    """The scans of a folder (its NIfTI files, sorted) or of a list file (one path per line; blank
    lines and '#' comments ignored; relative paths are relative to the list's folder). Scans named
    twice count once; missing scans stay in the list (they fail on their own, not the cohort)."""
    if source.is_dir():
        paths = scan_paths([str(source)], "input")
    else:
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BrainIDError(f"cannot read the scan list {source} ({type(e).__name__}); give a text file "
                               "with one NIfTI path per line") from None
        paths = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                paths.append(path if path.is_absolute() else source.parent / path)
        if not paths:
            raise BrainIDError(f"the scan list {source} names no scan; write one NIfTI path per line")
    unique = {}
    for p in paths:
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values())


def _expected_outputs(out: Path, scan: Scan, tasks: list[str], args) -> tuple[list[Path], Path | None]:
    """(every file a finished scan has, its volumes CSV or None) under OUT."""
    keys = outputs_of(tasks)
    if args.on_1mm:
        keys += [f"{k}_1mm" for k in keys]
    qc = qc_wanted(args, tasks)
    if qc and args.uncertainty:
        keys.append("uncertainty")
    paths, csv_path = output_paths(str(out / scan.stem), scan.path, keys)
    volumes = csv_path if "segmentation" in tasks and not args.no_volumes else None
    base = out / scan.stem
    extra = [base.with_name(base.name + "_qc.json")] if qc else []
    if args.report and "segmentation" in tasks:
        extra.append(base.with_name(base.name + "_report.html"))
    return list(paths.values()) + ([volumes] if volumes else []) + extra, volumes


def _read_volumes(path: Path | None) -> dict:
    """label -> mL from a scan's volumes CSV (None: no CSV expected)."""
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(r["label"]): float(r["volume_ml"]) for r in csv.DictReader(f)}


def _finished_row(out: Path, scan: Scan, tasks: list[str], args) -> Row | None:
    """The summary row of a scan whose outputs all exist (atomic writes: existing = complete)."""
    files, volumes = _expected_outputs(out, scan, tasks, args)
    if not all(p.is_file() and p.stat().st_size > 0 for p in files):
        return None
    try:
        ml = _read_volumes(volumes)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged CSV: run the scan again
    return Row(scan.index, str(scan.path), scan.stem, "skipped", volumes_ml=ml)


# ----------------------------------------------------------------------------------- summary
def write_summary(path: Path, rows: list[Row], labels: list[int]) -> Path:
    """The cohort table, one row per scan in list order, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(STATUS_COLUMNS) + [f"{label_name(lab)}_mL" for lab in labels])
    for r in sorted(rows, key=lambda r: r.index):
        seconds = "" if r.seconds is None else f"{r.seconds:.1f}"
        ml = ["" if lab not in r.volumes_ml else f"{r.volumes_ml[lab]:.4f}" for lab in labels]
        w.writerow([r.scan, r.output, r.status, r.error, seconds] + ml)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


# ------------------------------------------------------------------------------- distribution
def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (WORLD_SIZE > 1), joining a gloo group; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def _gather(rows: list[Row], world: int) -> list[Row]:
    """Every rank's rows, on every rank (then the group is closed)."""
    if world == 1:
        return rows
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.destroy_process_group()
    return [r for part in gathered for r in part]


class _Prefetcher:
    """Reads and prepares scan i+1 on one background thread while scan i computes."""

    def __init__(self, scans: list[Scan], load):
        self.scans, self.load = scans, load
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="brainid-prefetch")
        self.pending: dict = {}

    def get(self, i: int):
        """Scan i prepared (or its error raised); starts preparing scan i+1."""
        future = self.pending.pop(i, None) or self.pool.submit(self.load, self.scans[i])
        if i + 1 < len(self.scans):
            self.pending[i + 1] = self.pool.submit(self.load, self.scans[i + 1])
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ the run
def _check_output(args) -> Path:
    out = Path(args.output).expanduser()
    if args.output.lower().endswith((".nii", ".nii.gz")) or (out.exists() and not out.is_dir()):
        raise BrainIDError(f"for a cohort, --output must be a folder (outputs are OUT/<scan>_<task>.nii.gz), "
                           f"not {args.output}")
    check_writable(out, "--output")
    return out


def run_cohort(args, tasks: list[str]) -> int:
    """`brainid predict FOLDER_OR_LIST --output OUT`: see the module docstring."""
    from .devices import select_device
    from .inference import segmentation_labels, cpu_precision, predict, prepare_scan

    source = Path(args.input).expanduser()
    paths = read_scan_list(source)
    out = _check_output(args)
    device = select_device(args.device)
    cpu_precision(args.precision, None, device)
    parse_heads(args.head)
    scans = [Scan(i, p, stem) for i, (p, stem) in enumerate(zip(paths, unique_stems(paths, set())))]

    loading = Reporter(args.progress_format)  # a model download shows its progress
    try:
        model, label = load_command_model(args.model, loading, parse_heads(args.head))
    finally:
        loading.close()
    tasks = model_tasks(model, label, tasks)
    qc = qc_wanted(args, tasks)
    rank, world = _rank_and_world()
    if device.type == "cuda" and world > 1:
        import torch

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    labels = [lab for lab in segmentation_labels(model) if lab != 0] \
        if "segmentation" in tasks and not args.no_volumes else []
    mine = scans[rank::world]
    fmt = args.progress_format if rank == 0 else "none"
    reporter = Reporter(fmt)
    reporter.info(f"{describe(model, label)} on {device.type}; {len(scans)} scans from {source}")
    if world > 1:  # every rank says its share (torchrun gathers the logs)
        print(f"{PROG}: rank {rank} of {world}: {len(mine)} of {len(scans)} scans", file=sys.stderr, flush=True)

    summary = out / SUMMARY_NAME if world == 1 else out / f".{SUMMARY_NAME}.rank{rank}"
    rows: list[Row] = []
    todo: list[Scan] = []
    for scan in mine:
        row = None if args.overwrite else _finished_row(out, scan, tasks, args)
        if row:
            rows.append(row)
        else:
            todo.append(scan)

    bar = None
    if fmt == "bar":
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(rows), desc="scans", unit="scan", file=sys.stderr,
                   dynamic_ncols=True)

    def note(message: str) -> None:
        line = f"{PROG}: note: {one_line(message)}"
        (bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr, flush=True))

    def emit(kind, path):
        if fmt == "machine":
            reporter.output(kind, path)

    prefetch = _Prefetcher(todo, lambda s: prepare_scan(s.path, model, args.max_voxels))
    try:
        if rows:
            write_summary(summary, rows, labels)
            note(f"{len(rows)} scan(s) already have every output: skipped (--overwrite runs them again)")
        for k, scan in enumerate(todo):
            start = time.perf_counter()
            if bar is not None:
                bar.set_postfix_str(scan.path.name, refresh=True)
            step = (lambda f, m, done=len(rows), name=scan.stem: reporter((done + f) / len(mine), f"{name}: {m}")) \
                if fmt == "machine" else None
            try:
                prepared = prefetch.get(k)
                pred = predict(prepared, tasks=tuple(tasks), model=model, device=str(device), on_1mm=args.on_1mm,
                               mode=args.mode, memory_budget_gb=args.memory_gb, progress=step, qc=qc,
                               precision=args.precision, cleanup=not args.no_cleanup)
                write_prediction(pred, model, label, scan.path, str(out / scan.stem), args, emit, lambda text: None)
                row = Row(scan.index, str(scan.path), scan.stem, "ok", seconds=time.perf_counter() - start,
                          volumes_ml=_read_volumes(_expected_outputs(out, scan, tasks, args)[1]))
            except Exception as e:  # noqa: BLE001 - one bad scan must not stop the cohort
                message = one_line(e) if str(e) else type(e).__name__
                if not isinstance(e, USER_ERRORS):  # a bug: keep its traceback visible, go on with the others
                    message = f"{type(e).__name__}: {message} (a BrainID bug? please report it)"
                    traceback.print_exc(file=sys.stderr)
                row = Row(scan.index, str(scan.path), scan.stem, "failed", message, time.perf_counter() - start)
                note(f"{scan.path} failed: {message}")
            rows.append(row)
            write_summary(summary, rows, labels)
            if bar is not None:
                bar.update(1)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
    everything = _gather(rows, world)
    if world > 1:
        summary.unlink(missing_ok=True)
    failed = sum(r.status == "failed" for r in everything)
    if rank == 0:
        path = write_summary(out / SUMMARY_NAME, everything, labels)
        done = sum(r.status == "ok" for r in everything)
        skipped = sum(r.status == "skipped" for r in everything)
        text = f"{len(everything)} scans: {done} done, {skipped} skipped (outputs existed), {failed} failed; summary: {path}"
        if fmt == "machine":
            reporter.info(text)
            reporter.output("summary", path)
        else:
            print(text, flush=True)
    return 1 if failed else 0
