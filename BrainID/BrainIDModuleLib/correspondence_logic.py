"""Anatomical correspondence in Slicer: a point on one volume -> the best-matching point and a
cosine-similarity heatmap of Brain-ID features on the same and any other volume (any contrast).

Console use (blocking; features are cached per logic, so a second click on the same volumes is fast):

    import BrainID
    logic = BrainID.BrainIDLogic()
    match, heatmaps = logic.findCorrespondence(getNode("T1"), getNode("F"), [getNode("FLAIR")],
                                               model="brainid-lite", device="auto")
    # match: point list "BrainID match" (one point per volume, labelled "<volume> <similarity>")
    # heatmaps: one "<volume> BrainID similarity" volume per searched volume (source first)

GUI use: `job = logic.startCorrespondence(...)` runs `brainid correspond` in a child process
(progress, cancel), then `logic.finish(job)` imports the heatmaps and the match points.
Part of `BrainIDLogic` (mixed in); relies on its `log`, `_python_cmd`, `_start_job`, `model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MATCH_NODE_NAME = "BrainID match"
HEATMAP_SUFFIX = "BrainID similarity"


class CorrespondenceMixin:
    # Heatmap display range (cosine similarity of point descriptors; -1 in the air). With
    # brainid-lite, half the brain is below ~0.1, 90% below ~0.4 and the best match ~0.6-0.8, so
    # from 0.3 the best-matching region stands out; the Volumes module can change it.
    heatmapWindow = (0.3, 1.0)

    # ------------------------------------------------------------ helpers
    def _correspondence_lib(self):
        lib = getattr(self, "_correspondence", None)
        if lib is None:
            from BrainIDLib import correspondence as lib
        return lib

    @property
    def featureCache(self):
        """The session's FeatureCache (created on first use): repeated matches on the same volumes
        reuse their features instead of running the network again."""
        if getattr(self, "_feature_cache", None) is None:
            self._feature_cache = self._correspondence_lib().FeatureCache()
        return self._feature_cache

    @featureCache.setter
    def featureCache(self, cache):
        self._feature_cache = cache

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

        images = self.__dict__.setdefault("_images", {})
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
        from BrainIDModuleLib.logic import ensure_importable

        ensure_importable()
        point_ras = self.pointRAS(point, pointIndex)
        targets = self.correspondenceTargets(sourceVolumeNode, targetVolumeNodes, includeSource)
        lib = self._correspondence_lib()
        report = progress or (lambda f, m: self.log(f"BrainID {100 * f:3.0f}% {m}"))
        try:
            matches = lib.find_correspondence(self._image_of(sourceVolumeNode), point_ras,
                                              [self._image_of(t) for t in targets],
                                              model=model if model is not None else self.model, device=device,
                                              cache=self.featureCache, progress=report, cancel=cancel)
        finally:
            self._release(device)
        found = [(np.asarray(m.point_ras, np.float64), float(m.similarity), np.asanyarray(m.heatmap.dataobj))
                 for m in sorted(matches, key=lambda m: m.target_index)]
        return self.importCorrespondence(sourceVolumeNode, point_ras, targets, found, matchNode, show)

    def importCorrespondence(self, sourceVolumeNode, point_ras, targets, found, matchNode=None, show=True):
        """found: [(point RAS, similarity, heatmap array (i, j, k) on the target grid)] per target."""
        from BrainIDLib import slicer_adapter as sa

        heatmaps, labels = [], []
        known = self.__dict__.setdefault("_heatmap_ids", {})
        for target, (_, similarity, heat) in zip(targets, found):
            old = sa.scene().GetNodeByID(known.get(target.GetID(), ""))
            node = sa.add_heatmap_volume(heat, f"{target.GetName()} {HEATMAP_SUFFIX}", target, node=old,
                                         window=self.heatmapWindow)
            known[target.GetID()] = node.GetID()
            heatmaps.append(node)
            labels.append(f"{target.GetName()} {similarity:.2f}")
        if matchNode is None:
            matchNode = sa.scene().GetNodeByID(getattr(self, "_match_id", "") or "")
        matchNode = sa.add_markups_points([p for p, _, _ in found], labels, MATCH_NODE_NAME, node=matchNode)
        self._match_id = matchNode.GetID()
        self.lastMatches = [{"volume": t, "point_ras": p, "similarity": s, "heatmap": h}
                            for t, (p, s, _), h in zip(targets, found, heatmaps)]
        for m in self.lastMatches:
            r, a, s = m["point_ras"]
            self.log(f"BrainID match on {m['volume'].GetName()}: R {r:.1f} A {a:.1f} S {s:.1f} "
                     f"(similarity {m['similarity']:.3f})")
        if show:
            # show the first other volume (the interesting one), else the source, centred on its match
            i = next((k for k, t in enumerate(targets) if t is not sourceVolumeNode), 0)
            sa.show_heatmap(targets[i], heatmaps[i], found[i][0])
        return matchNode, heatmaps

    # ------------------------------------------------------------ non-blocking (CLI child process)
    def correspondenceCommand(self, source_path, point_ras, target_paths, out_dir, model=None, device="auto"):
        r, a, s = (float(v) for v in point_ras)
        cmd = self._python_cmd() + ["correspond", "--source", str(source_path), f"--point={r:.6g},{a:.6g},{s:.6g}"]
        for path in target_paths:
            cmd += ["--target", str(path)]
        cmd += ["--out", str(out_dir)] + self._cli_common(model, device)
        return cmd

    def startCorrespondence(self, sourceVolumeNode, point, targetVolumeNodes=None, model=None, device="auto",
                            includeSource=True, pointIndex=-1, workdir=None):
        import nibabel as nib

        point_ras = self.pointRAS(point, pointIndex)
        targets = self.correspondenceTargets(sourceVolumeNode, targetVolumeNodes, includeSource)
        workdir, own = self._workdir(workdir)
        source_path = workdir / "source.nii"
        nib.save(self._image_of(sourceVolumeNode), str(source_path))
        paths = []
        for i, target in enumerate(targets):
            if target is sourceVolumeNode:
                paths.append(source_path)
                continue
            path = workdir / f"target{i}.nii"
            nib.save(self._image_of(target), str(path))
            paths.append(path)
        out = workdir / "outputs"
        out.mkdir(exist_ok=True)
        cmd = self.correspondenceCommand(source_path, point_ras, paths, out, model, device)
        context = {"source": sourceVolumeNode.GetID(), "targets": [t.GetID() for t in targets],
                   "paths": [str(p) for p in paths], "point_ras": point_ras.tolist()}
        return self._start_job("correspond", [cmd], sourceVolumeNode, workdir, out, own, context)

    def _finish_correspond(self, job, show=True) -> dict:
        import nibabel as nib

        from BrainIDLib import slicer_adapter as sa
        from BrainIDLib.errors import BrainIDError

        ctx = job.context
        source = sa.scene().GetNodeByID(ctx["source"])
        targets = [sa.scene().GetNodeByID(i) for i in ctx["targets"]]
        if source is None or any(t is None for t in targets):
            raise BrainIDError("a volume was removed from the scene while BrainID was running")
        reported = json.loads((job.outputs_dir / "correspondence.json").read_text(encoding="utf-8"))["matches"]
        by_path = {str(Path(m["target"]).resolve()): m for m in reported if m.get("target")}
        found = []
        for k, path in enumerate(ctx["paths"]):
            m = by_path.get(str(Path(path).resolve())) or (reported[k] if k < len(reported) else None)
            if m is None:
                raise BrainIDError(f"brainid correspond reported no match for {targets[k].GetName()}")
            heat = Path(m["heatmap"])
            if not heat.is_absolute():
                heat = job.outputs_dir / heat
            found.append((np.asarray(m["point_ras"], np.float64), float(m["similarity"]),
                          np.asanyarray(nib.load(str(heat)).dataobj)))
        match, heatmaps = self.importCorrespondence(source, np.asarray(ctx["point_ras"]), targets, found, show=show)
        return {"match": match, **{h.GetName(): h for h in heatmaps}}
