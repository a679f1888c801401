"""Few-shot segmentation in Slicer: paint a few structures in the Segment Editor on one or more
scans, train a 1x1x1 head on the frozen Brain-ID features of the painted voxels, and segment the
same structures on other scans of any contrast. Heads are small files: save, share, reload.

Console use (blocking):

    import BrainID
    logic = BrainID.BrainIDLogic().fewShot
    head = logic.trainFewShotHead(getNode("Segmentation"), name="ventricles", model="brainid-lite")
    logic.saveHead(head, "/tmp/ventricles.safetensors")
    head = logic.loadHead("/tmp/ventricles.safetensors")
    seg = logic.applyFewShotHead(getNode("FLAIR"), head)   # segments named and coloured from the head

Several annotated scans: `trainFewShotHead([segA, segB], [scanA, scanB])`; segments with the same
name on different scans are the same structure. By default each segmentation's volume is the one
it was painted on (Segment Editor's source volume). `segments=` restricts to some segment names/ids.

GUI use: `startFewShotTrain(...)` / `startFewShotApply(...)` run `brainid fewshot train|apply` in a
child process (progress, cancel); `job.finish()` returns {"head": head} or {"segmentation": node}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from BrainIDModuleLib import views
from BrainIDModuleLib.jobs import JobLauncher, cli_options


def _rgb255(color) -> tuple[int, int, int]:
    c = [float(v) for v in list(color)[:3]]
    if all(v <= 1.0 for v in c):
        c = [v * 255.0 for v in c]
    return tuple(int(round(min(max(v, 0.0), 255.0))) for v in c)


def head_table(head) -> list[tuple[int, str, tuple[int, int, int]]]:
    """[(label value, name, (r, g, b) 0..255)] of a few-shot head (names/colors as lists or dicts)."""
    from BrainIDLib.labels import label_color

    labels = [int(v) for v in head.labels if int(v) != 0]
    names = getattr(head, "names", None) or {}
    colors = getattr(head, "colors", None) or {}
    out = []
    for i, value in enumerate(labels):
        name = names.get(value, names.get(str(value))) if isinstance(names, dict) else (
            names[i] if i < len(names) else None)
        color = colors.get(value, colors.get(str(value))) if isinstance(colors, dict) else (
            colors[i] if i < len(colors) else None)
        out.append((value, str(name or f"structure {value}"),
                    _rgb255(color) if color is not None else tuple(label_color(value))))
    return out


def head_name(head) -> str:
    return str(getattr(head, "name", None) or "few-shot")


class FewShotLogic:
    """`engine`: BrainIDLib's public few-shot API (`train_head`, `segment`, `FewShotHead`) unless
    injected; `featureCache`: a zero-argument function giving the FeatureCache to share (the
    correspondence logic's), None for none; `model`, `featureCacheDir` as in CorrespondenceLogic."""

    def __init__(self, launcher: JobLauncher | None = None, engine=None, log=print, model=None, featureCache=None,
                 featureCacheDir=None):
        self.launcher = launcher or JobLauncher()
        self._engine = engine
        self.log = log
        self.model = model
        self._featureCache = featureCache or (lambda: None)
        self.featureCacheDir = featureCacheDir
        self.fewShotHead = None  # the current head (last trained or loaded)

    @property
    def engine(self):
        if self._engine is None:
            import BrainIDLib as bid

            self._engine = bid  # train_head, segment and FewShotHead are public there
        return self._engine

    # ------------------------------------------------------------ annotations from segmentations
    def fewShotAnnotations(self, segmentationNodes, volumeNodes=None, segments=None):
        """Painted segments -> ([(volume node, int16 annotation on its grid)], names, colors 0..255).

        Label k (1, 2, ...) is the k-th distinct segment name (in order of appearance), the same on
        every scan; 0 = not painted. `segments`: names or ids to use (default: all)."""
        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        segs = [segmentationNodes] if hasattr(segmentationNodes, "IsA") else list(segmentationNodes or ())
        if not segs:
            raise BrainIDError("select a segmentation with painted structures")
        if volumeNodes is None or hasattr(volumeNodes, "IsA"):
            volumeNodes = [volumeNodes] * len(segs)
        if len(volumeNodes) != len(segs):
            raise BrainIDError("give one volume per segmentation (the scan it was painted on)")
        wanted = None if segments is None else [str(s) for s in ([segments] if isinstance(segments, str) else segments)]
        names, colors, per_seg = [], [], []
        for seg in segs:
            chosen = [(sid, n, c) for sid, n, c in sa.segments_of(seg) if wanted is None or sid in wanted or n in wanted]
            for _, n, c in chosen:
                if n not in names:
                    names.append(n)
                    colors.append(_rgb255(c))
            per_seg.append(chosen)
        if not names:
            raise BrainIDError("the segmentation has no segments to learn from; paint at least one structure")
        out = []
        for seg, volume, chosen in zip(segs, volumeNodes, per_seg):
            volume = volume or sa.reference_volume_of(seg)
            if volume is None:
                raise BrainIDError(f"no volume for '{seg.GetName()}': select the scan it was painted on")
            if not chosen:
                continue
            ann = sa.segments_to_annotation(seg, volume, [sid for sid, _, _ in chosen],
                                            [names.index(n) + 1 for _, n, _ in chosen])
            if not ann.any():
                raise BrainIDError(f"'{seg.GetName()}' has no painted voxels on '{volume.GetName()}'")
            out.append((volume, ann))
        return out, names, colors

    def _annotated_images(self, segmentationNodes, volumeNodes, segments):
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa

        pairs, names, colors = self.fewShotAnnotations(segmentationNodes, volumeNodes, segments)
        images, annotations = [], []
        for volume, ann in pairs:
            img = sa.volume_to_nifti(volume, world=True)
            images.append(img)
            annotations.append(nib.Nifti1Image(ann.astype(np.int16), img.affine))
        return images, annotations, names, colors

    # ------------------------------------------------------------ blocking
    def trainFewShotHead(self, segmentationNodes, volumeNodes=None, segments=None, name="few-shot", model=None,
                         device="auto", steps=None, progress=None, cancel=None):
        """Train a head on the painted segments; it becomes `self.fewShotHead` and is returned."""
        images, annotations, names, colors = self._annotated_images(segmentationNodes, volumeNodes, segments)
        kwargs = {} if steps is None else {"steps": int(steps)}
        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        head = self.engine.train_head(images, annotations, names=dict(enumerate(names, 1)),
                                      colors=dict(enumerate(colors, 1)), model=model if model is not None else self.model,
                                      device=device, cache=self._featureCache(), progress=report, cancel=cancel,
                                      name=name or "few-shot", **kwargs)
        self.fewShotHead = head
        self.log(f"BrainID: trained head '{head_name(head)}' ({', '.join(n for _, n, _ in head_table(head))})")
        return head

    def saveHead(self, head=None, path=None) -> Path:
        from BrainIDLib.errors import BrainIDError

        if isinstance(head, (str, Path)) and path is None:
            head, path = None, head
        head = head or self.fewShotHead
        if head is None:
            raise BrainIDError("no few-shot head: train or load one first")
        if not path:
            raise BrainIDError("choose a file to save the head to")
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        head.save(path)
        self.log(f"BrainID: saved head '{head_name(head)}' to {path}")
        return path

    def loadHead(self, path):
        head = self.engine.FewShotHead.load(str(path))
        self.fewShotHead = head
        return head

    def applyFewShotHead(self, volumeNode, head=None, model=None, device="auto", progress=None, cancel=None,
                         show=True):
        """Segment the head's structures on `volumeNode`: a new segmentation node, one segment per
        structure found, named and coloured from the head."""
        from BrainIDLib import slicer_adapter as sa

        head = self._head(head)

        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        model = model if model is not None else self.model
        kwargs = {} if model is None else {"model": model}  # None: the backbone the head names
        result = self.engine.segment(sa.volume_to_nifti(volumeNode, world=True), head, device=device,
                                     cache=self._featureCache(), progress=report, cancel=cancel, **kwargs)
        return self.importFewShotSegmentation(volumeNode, head, np.asanyarray(result.dataobj), show)

    def _head(self, head):
        from BrainIDLib.errors import BrainIDError

        if isinstance(head, (str, Path)):
            return self.loadHead(head)
        head = head or self.fewShotHead
        if head is None:
            raise BrainIDError("no few-shot head: train or load one first")
        return head

    def importFewShotSegmentation(self, volumeNode, head, labels_ijk, show=True):
        from BrainIDLib import slicer_adapter as sa

        seg = sa.add_labelled_segmentation(np.asarray(labels_ijk).astype(np.int16),
                                           f"{volumeNode.GetName()} {head_name(head)}", volumeNode, head_table(head))
        if show:
            views.show_results(volumeNode, seg)
        return seg

    # ------------------------------------------------------------ non-blocking (CLI child process)
    def startFewShotTrain(self, segmentationNodes, volumeNodes=None, segments=None, name="few-shot", model=None,
                          device="auto", steps=None, workdir=None):
        """`brainid fewshot train` in a child process; the job's `finish()` returns {"head": head}."""
        import nibabel as nib

        images, annotations, names, colors = self._annotated_images(segmentationNodes, volumeNodes, segments)
        workdir, own = self.launcher.workdir(workdir)
        args = ["fewshot", "train"]
        for i, (img, ann) in enumerate(zip(images, annotations)):
            nib.save(img, str(workdir / f"scan{i}.nii"))
            nib.save(ann, str(workdir / f"scan{i}_annotation.nii.gz"))
            args += ["--image", workdir / f"scan{i}.nii", "--annotation", workdir / f"scan{i}_annotation.nii.gz"]
        head_path = workdir / "head.safetensors"
        args += ["--names", ",".join(f"{k}={n.replace(',', ' ')}" for k, n in enumerate(names, 1)),
                 "--out", head_path, "--name", name or "few-shot"] + cli_options(model, device, self.featureCacheDir)
        if steps:
            args += ["--steps", int(steps)]
        command = self.launcher.command("BrainIDLib.cli", *args)
        return self.launcher.start([command], lambda job: self._finishTrain(head_path, colors), workdir, own)

    def _finishTrain(self, head_path: Path, colors) -> dict:
        head = self.loadHead(head_path)
        painted = {k: tuple(c) for k, c in enumerate(colors, 1)}
        head.colors = [painted.get(int(v), tuple(c)) for v, c in zip(head.labels, head.colors)]  # CLI: names only
        return {"head": head}

    def startFewShotApply(self, volumeNode, head=None, model=None, device="auto", workdir=None):
        """`brainid fewshot apply` in a child process; the job's `finish()` returns {"segmentation": node}."""
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa

        head = self._head(head)
        workdir, own = self.launcher.workdir(workdir)
        scan, head_path, out = workdir / "scan.nii", workdir / "head.safetensors", workdir / "outputs"
        out.mkdir(exist_ok=True)
        nib.save(sa.volume_to_nifti(volumeNode, world=True), str(scan))
        head.save(head_path)
        command = self.launcher.command("BrainIDLib.cli", "fewshot", "apply", "--head", head_path, "--input", scan,
                                        "--output", out, *cli_options(model, device, self.featureCacheDir))
        nodeID = volumeNode.GetID()
        return self.launcher.start([command], lambda job: self._finishApply(nodeID, head, out), workdir, own)

    def _finishApply(self, nodeID: str, head, out: Path) -> dict:
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        volume = sa.scene().GetNodeByID(nodeID)
        if volume is None:
            raise BrainIDError("the volume was removed from the scene while BrainID was running")
        files = sorted(out.rglob("*.nii*"))
        if not files:
            raise BrainIDError("brainid fewshot apply wrote no segmentation")
        labels = np.asanyarray(nib.load(str(files[0])).dataobj)
        return {"segmentation": self.importFewShotSegmentation(volume, head, labels)}
