"""BrainID module logic: run Brain-ID on a volume node and put the results into the scene.

Console use (blocking):

    import BrainID
    results = BrainID.BrainIDLogic().process(getNode("MRHead"), tasks=["segmentation", "anatomy"],
                                             model="brainid-lite", device="auto")
    results["segmentation"]  # vtkMRMLSegmentationNode; also "volumes" (table), "anatomy", ...

GUI use (non-blocking): `job = logic.start(...)` runs `python -m BrainIDLib.cli` in a child
process (PythonSlicer under Slicer), `job.poll()` from a timer, `job.cancel()` kills the process
tree, and `logic.finish(job)` imports the outputs. All engine access is injectable
(`predict`, `features`, `runner_factory`, `python`) so the logic is tested with slicer-core.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from BrainIDModuleLib.correspondence_logic import CorrespondenceMixin
from BrainIDModuleLib.fewshot_logic import FewShotMixin

# Tasks the module offers: the engine's four heads plus the feature PCA view.
TASKS = ("segmentation", "anatomy", "super_resolution", "bias_field", "features_pca")
ENGINE_TASKS = ("segmentation", "anatomy", "super_resolution", "bias_field")
OUTPUT_NAMES = {
    "segmentation": "segmentation",
    "anatomy": "synthetic T1",
    "super_resolution": "super-resolved",
    "bias_field": "bias field",
    "bias_corrected": "bias-corrected",
    "features_pca": "features PCA",
    "uncertainty": "QC uncertainty",
}
DEVICES = ("auto", "gpu", "cpu")


def repo_or_install_root() -> Path:
    """The folder that holds BrainIDLib (beside the module when installed, the checkout root in dev)."""
    here = Path(__file__).resolve().parent.parent  # .../BrainID
    for candidate in (here, here.parent):
        if (candidate / "BrainIDLib" / "__init__.py").is_file():
            return candidate
    return here


def resources_dir() -> Path:
    """BrainID's Resources (models.json, SampleData, labels) without importing BrainIDLib (and torch)."""
    root = repo_or_install_root()
    for candidate in (root / "BrainIDLib" / "resources", root / "Resources"):
        if candidate.is_dir():
            return candidate
    return root / "Resources"


def sample_entries() -> list[dict]:
    """Shipped samples from Resources/SampleData/samples.json, with absolute paths and file:// URIs."""
    import json

    folder = resources_dir() / "SampleData"
    try:
        samples = json.loads((folder / "samples.json").read_text(encoding="utf-8"))["samples"]
    except (OSError, ValueError, KeyError):
        return []
    out = []
    for s in samples:
        path = (folder / s["filename"]).resolve()
        out.append({**s, "path": str(path), "uri": path.as_uri(), "checksum": f"SHA256:{s['sha256']}"})
    return out


def model_choices() -> list[dict]:
    """[{name, description, tasks, status}] for the model selector: BrainIDLib.registry when it can be
    imported (status included), else the raw models.json (status unknown until torch is installed)."""
    try:
        ensure_importable()
        from BrainIDLib.registry import load_registry, model_status

        reg = load_registry()
        return [{"name": m.name, "description": m.description, "tasks": list(m.tasks), "status": model_status(m),
                 "default": m.name == reg.default} for m in reg.models]
    except ImportError:
        import json

        data = json.loads((resources_dir() / "models.json").read_text(encoding="utf-8"))
        return [{"name": m["name"], "description": m.get("description", ""), "tasks": m.get("tasks", []),
                 "status": "unknown", "default": m["name"] == data.get("default")} for m in data.get("models", [])]


def ensure_importable() -> None:
    root = str(repo_or_install_root())
    if root not in sys.path:
        sys.path.insert(0, root)


def normalise_tasks(tasks) -> list[str]:
    from BrainIDLib.errors import BrainIDError

    if isinstance(tasks, str):
        tasks = [t for t in tasks.replace(",", " ").split() if t]
    aliases = {"t1": "anatomy", "t1_synthesis": "anatomy", "sr": "super_resolution", "bias": "bias_field",
               "pca": "features_pca", "features": "features_pca", "seg": "segmentation"}
    out = []
    for t in tasks or ():
        t = aliases.get(str(t).lower(), str(t).lower())
        if t not in TASKS:
            raise BrainIDError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        if t not in out:
            out.append(t)
    if not out:
        raise BrainIDError("select at least one task")
    return out


def structure_volumes(labels_ijk: np.ndarray, affine: np.ndarray, labels=None) -> list[tuple[int, str, float]]:
    """(label, name, mL) per structure, the same rows as the CLI's volumes CSV (background excluded;
    with `labels`, every one of them, absent ones at 0 mL)."""
    from BrainIDLib.volumes import volumes_table

    return [(r.label, r.name, r.ml) for r in volumes_table((labels_ijk, affine), labels=labels)]


@dataclass
class BrainIDJob:
    """A run in a child process: poll it, cancel it, then hand it to `BrainIDLogic.finish`."""

    input_node_id: str
    tasks: list
    workdir: Path
    runner: object
    outputs_dir: Path = field(default=None)
    own_workdir: bool = True
    kind: str = "predict"  # or "correspond", "fewshot-train", "fewshot-apply"
    context: dict = field(default_factory=dict)

    def poll(self) -> str:
        return self.runner.poll()

    def cancel(self) -> None:
        self.runner.cancel()

    @property
    def state(self) -> str:
        return self.runner.state

    @property
    def fraction(self) -> float:
        return self.runner.fraction

    @property
    def message(self) -> str:
        return self.runner.message

    def cleanup(self) -> None:
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class BrainIDLogic(CorrespondenceMixin, FewShotMixin):
    """Blocking `process()` for scripts; `start()`/`finish()` for the GUI. Results go into the scene.

    Also `findCorrespondence`/`startCorrespondence` (correspondence_logic) and `trainFewShotHead`,
    `applyFewShotHead`, `saveHead`, `loadHead`, `startFewShotTrain`/`startFewShotApply` (fewshot_logic).
    `model`: default model (registry name, weights file or a BrainIDModel) for those in-process calls.
    """

    def __init__(self, predict=None, features=None, runner_factory=None, python=None, log=print, model=None,
                 correspondence=None, fewshot=None, featureCache=None):
        self._predict = predict
        self._features = features
        self._runner_factory = runner_factory
        self._python = python
        self.log = log
        self.model = model
        self._correspondence = correspondence  # BrainIDLib.correspondence unless injected
        self._fewshot = fewshot  # BrainIDLib.fewshot unless injected
        self._feature_cache = featureCache
        self.featureCacheDir = None  # for the child processes; None: the CLI's default on-disk cache

    # ------------------------------------------------------------ blocking
    def process(self, inputVolumeNode, tasks=("segmentation",), model=None, device="auto", mode="auto",
                progress=None, cancel=None, show=True) -> dict:
        """Run the tasks in this process and return {output key: MRML node} (plus 'volumes')."""
        ensure_importable()
        from BrainIDLib import slicer_adapter as sa

        tasks = normalise_tasks(tasks)
        image = sa.volume_to_nifti(inputVolumeNode, world=True)
        predict = self._predict
        if predict is None:
            from BrainIDLib.inference import predict
        engine_tasks = [t for t in tasks if t in ENGINE_TASKS]
        outputs, qc = {}, None
        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        try:
            if engine_tasks:
                prediction = predict(image, tasks=tuple(engine_tasks), model=model, device=device, mode=mode,
                                     progress=report, cancel=cancel, qc="segmentation" in engine_tasks)
                for note in getattr(prediction, "messages", None) or ():
                    self.log(f"BrainID: {note}")  # e.g. GPU out of memory -> tiled / CPU fallback
                outputs.update({k: np.asanyarray(v.dataobj) for k, v in prediction.outputs.items()})
                quality = getattr(prediction, "qc", None)
                if quality is not None:
                    qc = quality.to_dict()
                    outputs["uncertainty"] = np.asanyarray(prediction.uncertainty.dataobj)
            if "features_pca" in tasks:
                features = self._features
                if features is None:
                    from BrainIDLib.feature_maps import features
                pca = features(image, model=model, device=device, pca=3)
                outputs["features_pca"] = np.asanyarray(pca.dataobj)
        finally:
            self._release(device)
        return self.import_results(inputVolumeNode, outputs, show=show, qc=qc)

    def _release(self, device) -> None:
        try:
            from BrainIDLib.devices import release_memory, select_device

            release_memory(select_device(device))
        except Exception:  # noqa: BLE001 - best effort; never hide the run's own error
            pass

    # ------------------------------------------------------------ non-blocking
    def download_command(self, model: str) -> list[str]:
        python = self._python
        if python is None:
            from BrainIDLib.runner import python_executable

            python = python_executable()
        return [python, "-m", "BrainIDLib.cli", "download", str(model), "--progress-format", "machine"]

    def start_download(self, model: str):
        """Download a registered model in a child process (poll/cancel like a job)."""
        ensure_importable()
        env = dict(os.environ)
        root = str(repo_or_install_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        factory = self._runner_factory
        if factory is None:
            from BrainIDLib.runner import ProcessRunner as factory
        return factory([self.download_command(model)], env=env).start()

    def cli_commands(self, input_path: Path, outputs_dir: Path, tasks, model=None, device="auto", mode="auto"):
        """The child-process command lines (one per CLI sub-command)."""
        python = self._python
        if python is None:
            from BrainIDLib.runner import python_executable

            python = python_executable()
        common = ["--device", str(device), "--progress-format", "machine"]
        if model:
            common += [f"--model={model}"]  # one argument: a value starting with "-" is not an option
        commands = []
        engine_tasks = [t for t in tasks if t in ENGINE_TASKS]
        if engine_tasks:
            commands.append([python, "-m", "BrainIDLib.cli", "predict", str(input_path),
                             "--output", str(outputs_dir) + os.sep, "--task", ",".join(engine_tasks),
                             "--mode", str(mode), "--no-volumes"]
                            + (["--uncertainty"] if "segmentation" in engine_tasks else []) + common)
        if "features_pca" in tasks:
            commands.append([python, "-m", "BrainIDLib.cli", "features", str(input_path), "--output",
                             str(outputs_dir / "features_pca.nii.gz"), "--pca", "3"] + common)
        return commands

    def _python_cmd(self) -> list[str]:
        python = self._python
        if python is None:
            from BrainIDLib.runner import python_executable

            python = python_executable()
        return [python, "-m", "BrainIDLib.cli"]

    def _cli_common(self, model=None, device="auto") -> list[str]:
        """Options shared by `brainid correspond` and `brainid fewshot`: features are cached on disk
        (`featureCacheDir`, default the CLI's $BRAINID_CACHE/features) so repeated runs skip the network."""
        out = ["--device", str(device), "--progress-format", "machine"]
        if self.featureCacheDir:
            out += ["--feature-cache", str(self.featureCacheDir)]
        if model:
            out += [f"--model={model}"]
        return out

    @staticmethod
    def _workdir(workdir=None) -> tuple[Path, bool]:
        own = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="BrainID-")) if own else Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir, own

    def _start_job(self, kind, commands, node, workdir, outputs_dir, own, context=None, tasks=()) -> BrainIDJob:
        env = dict(os.environ)
        root = str(repo_or_install_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        factory = self._runner_factory
        if factory is None:
            from BrainIDLib.runner import ProcessRunner as factory
        runner = factory(commands, env=env)
        runner.start()
        return BrainIDJob(node.GetID() if node is not None else "", list(tasks), workdir, runner, outputs_dir, own,
                          kind, context or {})

    def start(self, inputVolumeNode, tasks=("segmentation",), model=None, device="auto", mode="auto",
              workdir=None) -> BrainIDJob:
        """Write the input to a temporary NIfTI and start the CLI in a child process."""
        ensure_importable()
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa

        tasks = normalise_tasks(tasks)
        workdir, own = self._workdir(workdir)
        outputs_dir = workdir / "outputs"
        outputs_dir.mkdir(parents=True, exist_ok=True)
        input_path = workdir / "input.nii"  # uncompressed: faster to write and read for large scans
        nib.save(sa.volume_to_nifti(inputVolumeNode, world=True), str(input_path))
        commands = self.cli_commands(input_path, outputs_dir, tasks, model, device, mode)
        return self._start_job("predict", commands, inputVolumeNode, workdir, outputs_dir, own, tasks=tasks)

    def finish(self, job: BrainIDJob, show=True) -> dict:
        """Import a finished job's outputs ({name: node or head}); raises BrainIDError for failed or
        cancelled jobs."""
        from BrainIDLib.errors import BrainIDError

        try:
            if job.state != "succeeded":
                raise BrainIDError(f"BrainID {job.state}: {job.runner.error or job.message}")
            return getattr(self, "_finish_" + job.kind.replace("-", "_"))(job, show)
        finally:
            job.cleanup()

    def _finish_predict(self, job: BrainIDJob, show=True) -> dict:
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        node = sa.scene().GetNodeByID(job.input_node_id)
        if node is None:
            raise BrainIDError("the input volume was removed from the scene while BrainID was running")
        outputs = {}
        reported = {("features_pca" if k == "features" else k): v for k, v in getattr(job.runner, "outputs", {}).items()}
        for key in OUTPUT_NAMES:
            path = reported.get(key) or self.find_output(job.outputs_dir, key)
            if path is not None:
                outputs[key] = np.asanyarray(nib.load(str(path)).dataobj)
        qc_file = reported.get("qc") or next(iter(sorted(Path(job.outputs_dir).glob("*_qc.json"))), None)
        qc = json.loads(Path(qc_file).read_text(encoding="utf-8")) if qc_file else None
        return self.import_results(node, outputs, show=show, qc=qc)

    @staticmethod
    def find_output(folder: Path, key: str) -> Path | None:
        """The output file for `key` (e.g. input_segmentation.nii.gz or segmentation.nii.gz)."""
        hits = sorted(p for p in Path(folder).rglob("*.nii*")
                      if p.name.split(".")[0] == key or p.name.split(".")[0].endswith("_" + key)
                      or p.name.split(".")[0].endswith("-" + key))
        return hits[0] if hits else None

    # ------------------------------------------------------------ results into MRML
    def import_results(self, inputVolumeNode, outputs: dict, show=True, qc: dict | None = None) -> dict:
        """Arrays in (i, j, k[, c]) order on the input grid -> nodes on the input's exact geometry.
        qc: the QC report as a dict (BrainIDLib.qc.QCReport.to_dict, the CLI's _qc.json): QC and
        Trust columns in the volumes table, and a summary line in the log."""
        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.labels import SEGMENTATION_LABELS

        base = inputVolumeNode.GetName()
        nodes = {}
        for key, array in outputs.items():
            name = f"{base} {OUTPUT_NAMES.get(key, key)}"
            if key == "segmentation":
                labels = np.asarray(array).astype(np.int16)
                nodes["segmentation"] = sa.add_segmentation(labels, name, inputVolumeNode)
                listed = set(SEGMENTATION_LABELS) | set(np.unique(labels).tolist())  # absent structures at 0 mL
                rows = structure_volumes(labels, sa.world_ijk_to_ras(inputVolumeNode), labels=listed)
                nodes["volumes"] = sa.add_volumes_table(rows, f"{base} structure volumes", inputVolumeNode, qc)
            elif key == "uncertainty":
                nodes[key] = sa.add_heatmap_volume(array, name, inputVolumeNode)
            elif key == "features_pca":
                arr = np.asarray(array)
                if arr.ndim == 5:  # (I, J, K, 1, C) from some NIfTI writers
                    arr = arr[:, :, :, 0, :]
                nodes[key] = sa.add_rgb_volume(sa.pca_to_rgb(arr), name, inputVolumeNode)
            else:
                nodes[key] = sa.add_scalar_volume(np.asarray(array, dtype=np.float32), name, inputVolumeNode)
        if qc:
            low = ", ".join(qc["flagged"]) or "none"
            self.log(f"BrainID QC: whole-scan score {qc['scan_score']:.2f}; structures below {qc['threshold']:g}: {low}")
        if show:
            sa.show_results(inputVolumeNode, nodes.get("segmentation"))
        return nodes
