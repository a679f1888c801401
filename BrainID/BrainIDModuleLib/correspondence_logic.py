"""Anatomical correspondence in Slicer: a point on one volume -> the best-matching point and a
cosine-similarity heatmap of Brain-ID features on the same and any other volume (any contrast).

Console use (blocking; features are cached per logic, so a second click on the same volumes is fast):

    import BrainID
    logic = BrainID.BrainIDLogic().correspondence
    match, heatmaps = logic.findCorrespondence(getNode("T1"), getNode("F"), [getNode("FLAIR")],
                                               model="brainid-lite", device="auto")
    # match: point list "BrainID match" (one point per volume, labelled "<volume> <similarity>")
    # heatmaps: one "<volume> BrainID similarity" volume per searched volume (source first)

GUI use: `job = logic.startCorrespondence(...)` runs `brainid correspond` in a child process
(progress, cancel), then `job.finish()` imports the heatmaps and the match points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from BrainIDModuleLib import views
from BrainIDModuleLib.jobs import JobLauncher, cli_options

MATCH_NODE_NAME = "BrainID match"
HEATMAP_SUFFIX = "BrainID similarity"


class CorrespondenceLogic:
    """`engine`: BrainIDLib's public correspondence API (`find_correspondence`, `FeatureCache`) unless
    injected; `model`: the default model for in-process calls; `featureCacheDir`: the child
    processes' on-disk feature cache (None: the CLI's default)."""

    # Heatmap display range (cosine similarity of point descriptors; -1 in the air). With
    # brainid-lite, half the brain is below ~0.1, 90% below ~0.4 and the best match ~0.6-0.8, so
    # from 0.3 the best-matching region stands out; the Volumes module can change it.
    heatmapWindow = (0.3, 1.0)

    def __init__(self, launcher: JobLauncher | None = None, engine=None, log=print, model=None, featureCacheDir=None):
        self.launcher = launcher or JobLauncher()
        self._engine = engine
        self.log = log
        self.model = model
        self.featureCacheDir = featureCacheDir
        self._cache = None
        self._images = {}
        self._heatmapIDs = {}
        self._matchID = ""
        self.lastMatches = []

    # ------------------------------------------------------------ helpers
    @property
    def engine(self):
        if self._engine is None:
            import BrainIDLib as bid

            self._engine = bid  # find_correspondence and FeatureCache are public there
        return self._engine

    @property
    def featureCache(self):
        """The session's FeatureCache (created on first use; few-shot shares it): repeated runs on the
        same volumes reuse their features instead of running the network again."""
        if self._cache is None:
            self._cache = self.engine.FeatureCache()
        return self._cache

    @staticmethod
    def pointRAS(point, pointIndex: int = -1) -> np.ndarray:
        """World RAS of a markups node's point (default: the last placed one) or of an (R, A, S) triple."""
        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        if hasattr(point, "IsA"):
            return sa.markup_point_ras(point, pointIndex)
        p = np.asarray(point, dtype=np.float64).reshape(-1)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise BrainIDError("the point must be a markups node or three RAS coordinates (R, A, S)")
        return p

    @staticmethod
    def correspondenceTargets(sourceVolumeNode, targetVolumeNodes=None, includeSource=True) -> list:
        """Volumes to search, the source first (when included), no duplicates."""
        from BrainIDLib.errors import BrainIDError

        if sourceVolumeNode is None:
            raise BrainIDError("select the source volume (the one the point is placed on)")
        if targetVolumeNodes is not None and hasattr(targetVolumeNodes, "IsA"):
            targetVolumeNodes = [targetVolumeNodes]
        out = [sourceVolumeNode] if includeSource else []
        for node in targetVolumeNodes or ():
            if node is not None and all(node is not n for n in out):
                out.append(node)
        if not out:
            raise BrainIDError("select at least one volume to search")
        return out

    def _image_of(self, node):
        """The node as an in-memory NIfTI, kept while the node is unchanged (so cache keys stay stable)."""
        from BrainIDLib import slicer_adapter as sa

        images = self._images
        key = node.GetID()
        stamp = (node.GetMTime(), node.GetImageData().GetMTime() if node.GetImageData() else 0,
                 sa.world_ijk_to_ras(node).tobytes())
        hit = images.get(key)
        if hit is None or hit[0] != stamp:
            hit = images[key] = (stamp, sa.volume_to_nifti(node, world=True))
        return hit[1]

    # ------------------------------------------------------------ blocking
    def findCorrespondence(self, sourceVolumeNode, point, targetVolumeNodes=None, model=None, device="auto",
                           includeSource=True, pointIndex=-1, matchNode=None, show=True, progress=None,
                           cancel=None):
        """Find where the point on the source lies on each volume. Returns (match point-list node,
        [heatmap volume node per searched volume]); also kept in `self.lastMatches`."""
        point_ras = self.pointRAS(point, pointIndex)
        targets = self.correspondenceTargets(sourceVolumeNode, targetVolumeNodes, includeSource)
        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        matches = self.engine.find_correspondence(self._image_of(sourceVolumeNode), point_ras,
                                                  [self._image_of(t) for t in targets],
                                                  model=model if model is not None else self.model, device=device,
                                                  cache=self.featureCache, progress=report, cancel=cancel)
        found = [(np.asarray(m.point_ras, np.float64), float(m.similarity), np.asanyarray(m.heatmap.dataobj))
                 for m in sorted(matches, key=lambda m: m.target_index)]
        return self.importCorrespondence(sourceVolumeNode, point_ras, targets, found, matchNode, show)

    def importCorrespondence(self, sourceVolumeNode, point_ras, targets, found, matchNode=None, show=True):
        """found: [(point RAS, similarity, heatmap array (i, j, k) on the target grid)] per target."""
        from BrainIDLib import slicer_adapter as sa

        heatmaps, labels = [], []
        known = self._heatmapIDs
        for target, (_, similarity, heat) in zip(targets, found):
            old = sa.scene().GetNodeByID(known.get(target.GetID(), ""))
            node = sa.add_heatmap_volume(heat, f"{target.GetName()} {HEATMAP_SUFFIX}", target, node=old,
                                         window=self.heatmapWindow)
            known[target.GetID()] = node.GetID()
            heatmaps.append(node)
            labels.append(f"{target.GetName()} {similarity:.2f}")
        if matchNode is None:
            matchNode = sa.scene().GetNodeByID(self._matchID)
        matchNode = sa.add_markups_points([p for p, _, _ in found], labels, MATCH_NODE_NAME, node=matchNode)
        self._matchID = matchNode.GetID()
        self.lastMatches = [{"volume": t, "point_ras": p, "similarity": s, "heatmap": h}
                            for t, (p, s, _), h in zip(targets, found, heatmaps)]
        for m in self.lastMatches:
            r, a, s = m["point_ras"]
            self.log(f"BrainID match on {m['volume'].GetName()}: R {r:.1f} A {a:.1f} S {s:.1f} "
                     f"(similarity {m['similarity']:.3f})")
        if show:
            # show the first other volume (the interesting one), else the source, centred on its match
            i = next((k for k, t in enumerate(targets) if t is not sourceVolumeNode), 0)
            views.show_heatmap(targets[i], heatmaps[i], found[i][0])
        return matchNode, heatmaps

    # ------------------------------------------------------------ non-blocking (CLI child process)
    def correspondenceCommand(self, source_path, point_ras, target_paths, out_dir, model=None, device="auto"):
        r, a, s = (float(v) for v in point_ras)
        args = ["correspond", "--source", source_path, f"--point={r:.6g},{a:.6g},{s:.6g}"]
        for path in target_paths:
            args += ["--target", path]
        args += ["--out", out_dir] + cli_options(model, device, self.featureCacheDir)
        return self.launcher.command("BrainIDLib.cli", *args)

    def startCorrespondence(self, sourceVolumeNode, point, targetVolumeNodes=None, model=None, device="auto",
                            includeSource=True, pointIndex=-1, workdir=None):
        """`brainid correspond` in a child process; the job's `finish()` imports what `findCorrespondence` does."""
        import nibabel as nib

        point_ras = self.pointRAS(point, pointIndex)
        targets = self.correspondenceTargets(sourceVolumeNode, targetVolumeNodes, includeSource)
        workdir, own = self.launcher.workdir(workdir)
        paths = []
        for i, target in enumerate(targets):
            path = workdir / ("source.nii" if target is sourceVolumeNode else f"target{i}.nii")
            nib.save(self._image_of(target), str(path))
            paths.append(path)
        if targets[0] is not sourceVolumeNode:  # the point's scan is written even when not searched
            nib.save(self._image_of(sourceVolumeNode), str(workdir / "source.nii"))
        out = workdir / "outputs"
        out.mkdir(exist_ok=True)
        cmd = self.correspondenceCommand(workdir / "source.nii", point_ras, paths, out, model, device)
        ids = (sourceVolumeNode.GetID(), [t.GetID() for t in targets])
        return self.launcher.start([cmd], lambda job: self._finish(out, ids, paths, point_ras), workdir, own)

    def _finish(self, out: Path, ids, paths, point_ras) -> dict:
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        source = sa.scene().GetNodeByID(ids[0])
        targets = [sa.scene().GetNodeByID(i) for i in ids[1]]
        if source is None or any(t is None for t in targets):
            raise BrainIDError("a volume was removed from the scene while BrainID was running")
        reported = json.loads((out / "correspondence.json").read_text(encoding="utf-8"))["matches"]
        by_path = {str(Path(m["target"]).resolve()): m for m in reported if m.get("target")}
        found = []
        for k, path in enumerate(paths):
            m = by_path.get(str(Path(path).resolve())) or (reported[k] if k < len(reported) else None)
            if m is None:
                raise BrainIDError(f"brainid correspond reported no match for {targets[k].GetName()}")
            heat = Path(m["heatmap"])
            if not heat.is_absolute():
                heat = out / heat
            found.append((np.asarray(m["point_ras"], np.float64), float(m["similarity"]),
                          np.asanyarray(nib.load(str(heat)).dataobj)))
        match, heatmaps = self.importCorrespondence(source, np.asarray(point_ras), targets, found)
        return {"match": match, **{h.GetName(): h for h in heatmaps}}
