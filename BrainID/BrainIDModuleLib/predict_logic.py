"""Run Brain-ID's tasks on a volume node and put the results into the scene.

Blocking (`process`, for the Python console and the self-test) or in a child process (`start`,
for Apply; one process, one model load, one network pass). Both run BrainIDModuleLib.engine, so
they give the same results. The engine call and the job launcher are injectable for tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from BrainIDLib import tasks as task_list
from BrainIDModuleLib import engine as default_engine
from BrainIDModuleLib import views
from BrainIDModuleLib.jobs import Job, JobLauncher


class PredictLogic:
    """`process()` blocks; `start()` returns a Job whose `finish()` imports the same results."""

    def __init__(self, launcher: JobLauncher | None = None, engine=default_engine, log=print):
        self.launcher = launcher or JobLauncher()
        self.engine = engine
        self.log = log

    def process(self, inputVolumeNode, tasks=("segmentation",), model=None, device="auto", mode="auto", qc=True,
                flipAverage="auto", progress=None, cancel=None, show=True) -> dict:
        """Run the tasks here and return {output key: MRML node} (plus "volumes", the table)."""
        from BrainIDLib import slicer_adapter as sa

        image = sa.volume_to_nifti(inputVolumeNode, world=True)
        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        result = self.engine.run(image, tasks, model=model, device=device, mode=mode, qc=qc, flipAverage=flipAverage,
                                 progress=report, cancel=cancel)
        for note in result.messages:
            self.log(f"BrainID: {note}")  # e.g. GPU out of memory -> tiled / CPU fallback
        return self.importResults(inputVolumeNode, result.outputs, result.qc, show)

    def start(self, inputVolumeNode, tasks=("segmentation",), model=None, device="auto", mode="auto", qc=True,
              flipAverage="auto", workdir=None) -> Job:
        """Write the input to a temporary NIfTI and run the engine on it in a child process."""
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa

        tasks = self.engine.check_options(tasks, flipAverage)  # bad options fail here, not in the child
        folder, own = self.launcher.workdir(workdir)
        source, outputs = folder / "input.nii", folder / "outputs"  # uncompressed: faster for large scans
        nib.save(sa.volume_to_nifti(inputVolumeNode, world=True), str(source))
        args = [source, outputs, "--task", ",".join(tasks), "--device", device, "--mode", mode,
                "--flip-average", flipAverage] + ([] if qc else ["--no-qc"]) + ([f"--model={model}"] if model else [])
        nodeID = inputVolumeNode.GetID()
        return self.launcher.start([self.launcher.command("BrainIDModuleLib.engine", *args)],
                                   lambda job: self._finish(job, nodeID, outputs), folder, own)

    def _finish(self, job: Job, nodeID: str, outputs: Path) -> dict:
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        node = sa.scene().GetNodeByID(nodeID)
        if node is None:
            raise BrainIDError("the input volume was removed from the scene while BrainID was running")
        arrays = {p.name[: -len(".nii.gz")]: np.asanyarray(nib.load(str(p)).dataobj)
                  for p in sorted(outputs.glob("*.nii.gz"))}
        qc_file = outputs / "qc.json"
        qc = json.loads(qc_file.read_text(encoding="utf-8")) if qc_file.is_file() else None
        return self.importResults(node, arrays, qc)

    def startDownload(self, model: str) -> Job:
        """Fetch a registered model into the cache in a child process (SHA-256 checked by the CLI)."""
        command = self.launcher.command("BrainIDLib.cli", "download", model, "--progress-format", "machine")
        return self.launcher.start([command], lambda job: {})

    def importResults(self, inputVolumeNode, outputs: dict, qc: dict | None = None, show=True) -> dict:
        """Arrays in (i, j, k[, c]) order on the input grid -> nodes on the input's exact geometry.
        qc (QCReport.to_dict): QC and Trust columns in the volumes table, a summary line in the log."""
        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.labels import SEGMENTATION_LABELS
        from BrainIDLib.volumes import volumes_table

        base = inputVolumeNode.GetName()
        nodes = {}
        for key, array in outputs.items():
            name = f"{base} {task_list.DISPLAY_NAMES.get(key, key)}"
            if key == "segmentation":
                labels = np.asarray(array).astype(np.int16)
                nodes[key] = sa.add_segmentation(labels, name, inputVolumeNode)
                listed = set(SEGMENTATION_LABELS) | set(np.unique(labels).tolist())  # absent structures at 0 mL
                rows = [(r.label, r.name, r.ml) for r in
                        volumes_table((labels, sa.world_ijk_to_ras(inputVolumeNode)), labels=listed)]
                nodes["volumes"] = sa.add_volumes_table(rows, f"{base} structure volumes", inputVolumeNode, qc)
            elif key == "uncertainty":
                nodes[key] = sa.add_heatmap_volume(array, name, inputVolumeNode)
            elif key == "features_pca":
                nodes[key] = sa.add_rgb_volume(sa.pca_to_rgb(np.asarray(array)), name, inputVolumeNode)
            else:
                nodes[key] = sa.add_scalar_volume(np.asarray(array, dtype=np.float32), name, inputVolumeNode)
        if qc:
            low = ", ".join(qc["flagged"]) or "none"
            self.log(f"BrainID QC: whole-scan score {qc['scan_score']:.2f}; structures below {qc['threshold']:g}: {low}")
        if show:
            views.show_results(inputVolumeNode, nodes.get("segmentation"))
        return nodes
