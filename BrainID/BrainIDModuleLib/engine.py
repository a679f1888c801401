"""The module's one engine call, the same in Slicer's process (console `process()`) and in the
child process Apply starts (`python -m BrainIDModuleLib.engine`): one model load, one network
pass. The feature PCA view comes from that pass (`predict(keep_features=True)`), not a second run.
No slicer, no Qt: arrays in, arrays out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from BrainIDLib import tasks as task_list
from BrainIDLib.errors import BrainIDError

FLIP_AVERAGE = {"auto": None, "on": True, "off": False}  # auto: as the model's metadata says


@dataclass
class EngineResult:
    outputs: dict = field(default_factory=dict)  # key -> (I, J, K[, C]) array on the input grid
    qc: dict | None = None  # BrainIDLib.qc.QCReport.to_dict()
    messages: list = field(default_factory=list)  # the engine's notes (GPU fallbacks, ...)


def check_options(tasks, flipAverage="auto") -> list[str]:
    """The canonical task names; a clear BrainIDError for no task, an unknown one or a bad flipAverage."""
    tasks = task_list.parse(tasks)
    if not tasks:
        raise BrainIDError("select at least one task")
    if flipAverage not in FLIP_AVERAGE:
        raise BrainIDError(f"flip averaging is one of {', '.join(FLIP_AVERAGE)}, not {flipAverage!r}")
    return tasks


def run(image, tasks, model=None, device="auto", mode="auto", qc=True, flipAverage="auto", progress=None,
        cancel=None) -> EngineResult:
    """Run the tasks (BrainIDLib.tasks names, 'features_pca' included) on a NIfTI image or path."""
    import BrainIDLib as bid

    tasks = check_options(tasks, flipAverage)
    heads = [t for t in tasks if t in task_list.OUTPUT_TASKS]
    pca = "features_pca" in tasks
    result = EngineResult()
    if not heads:  # the PCA view alone: one features pass
        rgb = bid.features(image, model=model, device=device, pca=3, mode=mode, progress=progress, cancel=cancel)
        result.outputs["features_pca"] = np.asanyarray(rgb.dataobj)
        return result
    scan, owned = None, False
    if pca:  # keep the prepared scan: it maps the features back to the input grid
        from BrainIDLib.inference import prepare_scan

        model, owned = _loaded(model)
        image = scan = prepare_scan(image, model)
    try:
        prediction = bid.predict(image, tasks=tuple(heads), model=model, device=device, mode=mode, progress=progress,
                                 cancel=cancel, qc=qc and "segmentation" in heads, keep_features=pca,
                                 flip_average=FLIP_AVERAGE[flipAverage])
    finally:
        if owned:  # hand the GPU memory back, as predict does for models it loads itself
            from BrainIDLib.devices import release_memory, select_device

            model.to("cpu")
            release_memory(select_device(device))
    result.outputs = {k: np.asanyarray(v.dataobj) for k, v in prediction.outputs.items()}
    result.messages = [str(m) for m in prediction.messages or ()]
    if prediction.qc is not None:
        result.qc = prediction.qc.to_dict()
        result.outputs["uncertainty"] = np.asanyarray(prediction.uncertainty.dataobj)
    if scan is not None:
        result.outputs["features_pca"] = _pca_on_input_grid(prediction.features_1mm, scan)
    return result


def _loaded(model) -> tuple[object, bool]:
    """(BrainIDModel, loaded here) from a model, registry name, weights file or None (the default)."""
    import BrainIDLib as bid

    if model is None or isinstance(model, (str, Path)):
        from BrainIDLib.registry import default_model, how_to_get_weights

        if model is None:
            entry = default_model()
            if entry is None:
                raise BrainIDError(how_to_get_weights())
            model = entry.name
        return bid.load_model(str(model)), True
    return model, False


def _pca_on_input_grid(features_1mm, scan) -> np.ndarray:
    """The features' first three principal components (each scaled to [0, 1]), resampled from the
    model grid to the input grid like every other output."""
    import torch

    from BrainIDLib.feature_maps import pca_channels

    feats = torch.from_numpy(np.moveaxis(np.asarray(features_1mm.dataobj, dtype=np.float32), -1, 0))
    rgb = pca_channels(feats, 3)
    cropped = scan.prepared.unpadded()  # features_1mm is already cropped
    return np.moveaxis(cropped.to_input_grid(rgb).numpy(), 0, -1)


# ---------------------------------------------------------------- child process


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m BrainIDModuleLib.engine", description=__doc__.splitlines()[0])
    p.add_argument("input", help="the scan (NIfTI)")
    p.add_argument("output", help="folder for <key>.nii.gz and qc.json")
    p.add_argument("--task", required=True, help="comma-separated tasks")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", default="auto")
    p.add_argument("--no-qc", dest="qc", action="store_false")
    p.add_argument("--flip-average", default="auto", choices=sorted(FLIP_AVERAGE))
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run, write every output, and speak the runner's protocol (PROGRESS / INFO / OUTPUT lines)."""
    import nibabel as nib

    args = _arguments(argv)
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        affine = nib.load(args.input).affine
        result = run(args.input, args.task, model=args.model, device=args.device, mode=args.mode, qc=args.qc,
                     flipAverage=args.flip_average, progress=lambda f, m="": say(f"PROGRESS {f:.4f} {m}"))
    except BrainIDError as e:
        say(f"brainid: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for note in result.messages:
        say(f"INFO {note}")
    for key, array in result.outputs.items():
        path = out / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
        say(f"OUTPUT {key} {path}")
    if result.qc is not None:
        (out / "qc.json").write_text(json.dumps(result.qc), encoding="utf-8")
        say(f"OUTPUT qc {out / 'qc.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
