"""What the `brainid` commands share: progress and messages on the console, loading the model and
checking tasks from arguments, and where and how a prediction's files are written.

Single-scan commands (cli.py) and cohort mode (cohort.py) both build on this module, and neither
imports the other's internals.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .errors import BrainIDError
from .files import nifti_stem, save_nifti
from .tasks import OUTPUT_TASKS, canonical, head_of, heads_for

PROG = "brainid"


class Reporter:
    """Progress to tqdm bars on stderr, machine-readable lines on stdout, or nothing."""

    def __init__(self, fmt: str = "bar"):
        self.fmt = fmt
        self._bar = None
        self._bytes_bar = None

    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        message = " ".join(str(message).split())
        if self.fmt == "machine":
            print(f"PROGRESS {fraction:.3f} {message}".rstrip(), flush=True)
        elif self.fmt == "bar":
            from tqdm import tqdm

            if self._bar is None:
                self._bar = tqdm(total=100, file=sys.stderr, unit="%", dynamic_ncols=True, mininterval=0.2,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            self._bar.set_description_str(message or "working", refresh=False)
            self._bar.n = round(100 * fraction, 1)
            self._bar.refresh()

    def download(self, done: int, total: int | None, name: str) -> None:
        if self.fmt == "machine":
            if total:
                print(f"PROGRESS {done / total:.3f} downloading {name}", flush=True)
        elif self.fmt == "bar":
            from tqdm import tqdm

            if self._bytes_bar is None:
                self._bytes_bar = tqdm(total=total, file=sys.stderr, unit="B", unit_scale=True,
                                       unit_divisor=1024, desc=f"downloading {name}", initial=done)
            self._bytes_bar.n = done
            self._bytes_bar.refresh()

    def info(self, message: str) -> None:
        if self.fmt == "machine":
            print(f"INFO {message}", flush=True)
        elif self.fmt == "bar":
            self._write(message)

    def output(self, kind: str, path: Path) -> None:
        if self.fmt == "machine":
            print(f"OUTPUT {kind} {path}", flush=True)
        else:
            print(f"wrote {kind}: {path}", flush=True)

    def _write(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        for bar in (self._bar, self._bytes_bar):
            if bar is not None:
                bar.close()
        self._bar = self._bytes_bar = None


def parse_heads(values: list[str]) -> dict[str, Path]:
    """{head task: file} from --head TASK=FILE values (task names and aliases as everywhere)."""
    heads = {}
    for value in values:
        task, sep, file = value.partition("=")
        if not sep or not file:
            raise BrainIDError(f"--head expects TASK=FILE, got {value!r}")
        task = head_of(canonical(task, OUTPUT_TASKS))
        path = Path(file).expanduser()
        if not path.is_file():
            raise BrainIDError(f"head file not found: {path}")
        heads[task] = path
    return heads


def check_writable(folder: Path, what: str) -> None:
    """Fail before any compute when `folder` cannot take the outputs: a temporary file is created and
    removed in it, or in its nearest existing parent (the folder itself is created only to write)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise BrainIDError(f"{what}: {probe} is a file, so {folder} cannot be a folder; choose another output path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".brainid-write-check-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BrainIDError(f"{what}: cannot write in {probe} ({e.strerror or type(e).__name__}); "
                           "choose a folder you can write to") from None


def like_input(img, input_path: Path):
    """An output with the input's shape when the input is a 4D file with one volume (X, Y, Z, 1)."""
    import nibabel as nib

    shape = tuple(nib.load(str(input_path)).shape)
    if len(shape) > 3 and len(img.shape) == 3 and tuple(img.shape) == shape[:3]:
        import numpy as np

        return nib.Nifti1Image(np.asarray(img.dataobj).reshape(shape), img.affine, img.header)
    return img


def load_command_model(name: str | None, reporter: Reporter, heads: dict | None = None):
    """(model, label) for --model NAME (empty: the registry default) plus heads, through the one
    resolver (BrainIDLib.loader), with download progress; never random weights."""
    from .loader import resolve

    loaded = resolve(name or None, heads, reporter.download)
    return loaded.model, loaded.label


def output_paths(output: str, input_path: Path, keys: list[str]) -> tuple[dict[str, Path], Path]:
    """({output key: NIfTI path}, volumes CSV path) from --output (folder, prefix or file)."""
    out = Path(os.path.expanduser(output))
    is_file = output.lower().endswith((".nii", ".nii.gz"))
    if output.endswith(("/", os.sep)) or out.is_dir():
        base = out / nifti_stem(input_path)
    elif is_file and len(keys) == 1:
        return {keys[0]: out}, out.with_name(nifti_stem(out) + "_volumes.csv")
    elif is_file:
        base = out.with_name(nifti_stem(out))
    else:
        base = out
    paths = {k: base.with_name(f"{base.name}_{k}.nii.gz") for k in keys}
    return paths, base.with_name(f"{base.name}_volumes.csv")


def write_volumes_csv(seg_img, path: Path, labels=None, qc=None) -> Path:
    """Structure volumes (label, FreeSurfer name, voxels, mL, and QC with a QC report; background
    excluded), written atomically."""
    from .volumes import volumes_table, write_volumes_csv as write_rows

    return write_rows(volumes_table(seg_img, labels=labels), path, qc=qc)


def qc_wanted(args, tasks: list[str]) -> bool:
    """--qc (default on with segmentation), --uncertainty and --report checked against the tasks."""
    asked = [o for o, on in (("--qc", args.qc), ("--uncertainty", args.uncertainty), ("--report", args.report)) if on]
    if asked and "segmentation" not in tasks:
        raise BrainIDError(f"{' and '.join(asked)} need the segmentation task; add --task segmentation")
    if args.uncertainty and args.qc is False:
        raise BrainIDError("--uncertainty comes from QC; drop --no-qc")
    return "segmentation" in tasks and args.qc is not False


def describe(model, label: str) -> str:
    """One line naming the model, its size and heads, for the run's first message."""
    arch = model.arch
    return f"model {label} (f_maps {arch.f_maps}, {arch.levels} levels; heads: {', '.join(model.tasks) or 'none'})"


def model_tasks(model, label: str, tasks: list[str]) -> list[str]:
    """The tasks to run: those asked for (every head the model has if none), each with its head."""
    if not tasks:
        tasks = list(model.tasks)
        if not tasks:
            raise BrainIDError(f"{label} has no task heads; add one with --head TASK=FILE")
    missing = [t for t in heads_for(tasks) if t not in model.tasks]
    if missing:
        raise BrainIDError(f"{label} has no head for {', '.join(missing)} (it has: {', '.join(model.tasks) or 'none'}); "
                           f"add one with --head {missing[0]}=FILE or choose another --model")
    return tasks


def write_prediction(pred, model, label: str, input_path: Path, output: str, args, report, info) -> None:
    """Every output of `pred` at the paths `output` names (NIfTIs, volumes CSV, QC, report, as args
    ask); report(kind, path) for each file, info(text) for the QC line."""
    outputs = dict(pred.outputs)
    quality = getattr(pred, "qc", None)
    if args.uncertainty and getattr(pred, "uncertainty", None) is not None:
        outputs["uncertainty"] = pred.uncertainty
    if args.on_1mm:
        outputs.update({f"{k}_1mm": v for k, v in (getattr(pred, "outputs_1mm", None) or {}).items()})
    paths, csv_path = output_paths(output, input_path, list(outputs))
    for key, img in outputs.items():
        report(key, save_nifti(img if key.endswith("_1mm") else like_input(img, input_path), paths[key]))
    labels = list(getattr(pred, "labels", None) or ()) or \
        model.metadata.get("heads", {}).get("segmentation", {}).get("labels")
    if "segmentation" in outputs and not args.no_volumes:
        report("volumes", write_volumes_csv(outputs["segmentation"], csv_path, labels, quality))
    sibling = csv_path.with_name(csv_path.name[: -len("_volumes.csv")])
    if quality is not None:
        from .qc import write_json

        report("qc", write_json(quality, sibling.with_name(sibling.name + "_qc.json")))
        low = ", ".join(s.name for s in quality.flagged()) or "none"
        info(f"QC: whole-scan score {quality.scan_score:.2f}; structures below {quality.threshold:g}: {low}")
    if args.report and "segmentation" in outputs:
        from .report import write_report

        report("report", write_report(sibling.with_name(sibling.name + "_report.html"), input_path, pred,
                                      label, model.metadata.get("description", ""), labels))


def unique_stems(paths: list[Path], taken: set[str]) -> list[str]:
    """Output names for scans, `scan`, `scan_2`, ... so two scans with one file name never overwrite."""
    stems = []
    for p in paths:
        stem = base = nifti_stem(p)
        i = 2
        while stem in taken:
            stem, i = f"{base}_{i}", i + 1
        taken.add(stem)
        stems.append(stem)
    return stems


def one_line(message: str) -> str:
    """An error or warning as one clean line (no newlines or control characters, bounded length)."""
    from .validate import clean

    return clean(message, 2000) or "unknown error"
