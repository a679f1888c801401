"""The one bridge between MRML (3D Slicer, or the Qt-free `slicer-core` wheel) and BrainIDLib.

BrainIDLib works on numpy arrays in (i, j, k) order with a 4x4 voxel-to-RAS affine, exactly what
nibabel calls `img.affine`. A Slicer volume node stores its voxels in (k, j, i) order and its
geometry as an IJKToRAS matrix (also RAS; files on disk are LPS, but the storage node converts).
So, in memory:

    array_ijk = arrayFromVolume(node).transpose(2, 1, 0)        affine = node IJKToRAS

Volumes move between the two as arrays + matrices, never through files, so no NIfTI qform/sform
ambiguity can creep in. Where a file must be written (to run the engine in another process),
`volume_to_nifti` stores the node's matrix as BOTH qform and sform (code 1), so ITK/Slicer and
nibabel read back the same geometry. Note for users: for a file whose qform and sform differ,
Slicer (ITK) uses the sform only when sform_code is 1 (scanner) and it is consistent with the
voxel sizes, else the qform; nibabel always uses the sform when sform_code > 0. Inside Slicer,
BrainID follows what Slicer shows (the node's IJKToRAS), so results always overlay the input.

Every result is created on the input's exact grid (its IJKToRAS, and its parent transform if
any), in the input's subject-hierarchy folder (study).

MRML nodes in and out only: what the views show and reading/writing files through storage nodes
belong to the Slicer module (BrainID/BrainIDModuleLib/views.py, storage.py). Segments carry
standard terminology codes (Resources/labels/terminology.json). Nothing else in BrainIDLib
imports `slicer`.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

import slicer
import vtk

from .errors import BrainIDError

RGB_COMPONENTS = 3

# ---------------------------------------------------------------- scene / logics


def scene():
    s = getattr(slicer, "mrmlScene", None)
    if s is None:
        raise BrainIDError("no MRML scene: run inside 3D Slicer, or call slicer_adapter.init_headless_scene()")
    return s


def init_headless_scene():
    """A fresh MRML scene with the module logics Slicer would create (for slicer-core, tests, scripts)."""
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    logics = []
    for cls in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSubjectHierarchyModuleLogic, slicer.vtkSlicerVolumesLogic,
                slicer.vtkSlicerSegmentationsModuleLogic):
        logic = cls()
        logic.SetMRMLScene(s)
        logics.append(logic)
    s._brainid_logics = logics  # keep them alive with the scene
    return s


# ---------------------------------------------------------------- geometry


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def set_ijk_to_ras(node, affine: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(affine[r, c]))
    node.SetIJKToRASMatrix(m)


def world_ijk_to_ras(node) -> np.ndarray:
    """IJK -> world RAS, including a linear parent transform; non-linear transforms must be hardened first."""
    affine = ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return affine
    if not parent.IsTransformToWorldLinear():
        raise BrainIDError(
            f"'{node.GetName()}' is under a non-linear transform; harden the transform "
            "(Data module: right-click > Harden transform) and run BrainID again"
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    to_world = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return to_world @ affine


def array_from_volume(node, world: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(array in (i, j, k) order, float32 copy; 4x4 IJK->RAS) from a scalar volume node."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise BrainIDError("select a scalar volume (an image) as input")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise BrainIDError(f"'{node.GetName()}' holds no voxels; load an image first")
    if image.GetNumberOfScalarComponents() != 1:
        raise BrainIDError(f"'{node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                           "BrainID needs a single-channel (grey-scale) image")
    kji = slicer.util.arrayFromVolume(node)
    array = np.ascontiguousarray(kji.transpose(2, 1, 0), dtype=np.float32)
    affine = world_ijk_to_ras(node) if world else ijk_to_ras(node)
    return array, affine


def volume_to_nifti(node, world: bool = True):
    """An in-memory NIfTI (RAS affine in both qform and sform, code 1) of a scalar volume node."""
    import nibabel as nib

    array, affine = array_from_volume(node, world=world)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _copy_placement(node, reference) -> None:
    if reference is None:
        return
    parent = reference.GetParentTransformNode()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    place_in_study(node, reference)


def _check_grid(array_ijk: np.ndarray, reference, what: str) -> None:
    if reference is None:
        return
    dims = reference.GetImageData().GetDimensions()
    if tuple(array_ijk.shape[:3]) != tuple(dims):
        raise BrainIDError(f"{what} has shape {tuple(array_ijk.shape[:3])} but the input has {tuple(dims)}; "
                           "results must be on the input grid")


def add_scalar_volume(array_ijk: np.ndarray, name: str, reference=None, affine: np.ndarray | None = None,
                      class_name: str = "vtkMRMLScalarVolumeNode", node=None):
    """A volume node from an (i, j, k[, c]) array on the reference's exact geometry (or `affine`)."""
    array_ijk = np.asarray(array_ijk)
    _check_grid(array_ijk, reference, name)
    if array_ijk.ndim == 4:
        kji = np.ascontiguousarray(array_ijk.transpose(2, 1, 0, 3))
    elif array_ijk.ndim == 3:
        kji = np.ascontiguousarray(array_ijk.transpose(2, 1, 0))
    else:
        raise BrainIDError(f"{name}: expected a 3D or 4D array, got shape {array_ijk.shape}")
    if kji.dtype == np.float64:
        kji = kji.astype(np.float32)
    if kji.dtype == np.int64:
        kji = kji.astype(np.int32)
    if node is None:
        node = scene().AddNewNodeByClass(class_name, scene().GenerateUniqueName(name))
    geometry = ijk_to_ras(reference) if reference is not None else (affine if affine is not None else np.eye(4))
    set_ijk_to_ras(node, geometry)
    slicer.util.updateVolumeFromArray(node, kji)
    node.CreateDefaultDisplayNodes()
    _copy_placement(node, reference)
    return node


def add_rgb_volume(rgb_ijk: np.ndarray, name: str, reference=None):
    """A vector (RGB, uint8) volume node, e.g. a 3-component feature PCA."""
    rgb_ijk = np.asarray(rgb_ijk)
    if rgb_ijk.ndim != 4 or rgb_ijk.shape[3] != RGB_COMPONENTS:
        raise BrainIDError(f"{name}: an RGB volume needs shape (I, J, K, 3), got {rgb_ijk.shape}")
    return add_scalar_volume(rgb_ijk.astype(np.uint8), name, reference, class_name="vtkMRMLVectorVolumeNode")


def pca_to_rgb(pca: np.ndarray, percentiles=(1.0, 99.0)) -> np.ndarray:
    """(I, J, K, >=3) float components -> (I, J, K, 3) uint8, each channel stretched between percentiles."""
    out = np.zeros(pca.shape[:3] + (3,), np.uint8)
    for c in range(min(3, pca.shape[3])):
        ch = pca[..., c].astype(np.float32)
        lo, hi = np.percentile(ch, percentiles)
        out[..., c] = np.clip((ch - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------- subject hierarchy


def place_in_study(node, reference) -> None:
    """Put `node` in the same subject-hierarchy folder (study) as `reference`."""
    sh = scene().GetSubjectHierarchyNode()
    if sh is None:
        return
    ref_item = sh.GetItemByDataNode(reference)
    if not ref_item:
        return
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if not item:
        sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)


# ---------------------------------------------------------------- segmentation


@lru_cache(maxsize=1)
def _terminology() -> dict:
    from .resources import resource_path

    return json.loads(resource_path("labels", "terminology.json").read_text(encoding="utf-8"))


def terminology_entry(label: int) -> str | None:
    """Slicer's terminology string (context~category~type~modifier~anatomic context~region~region
    modifier; codes "scheme^value^meaning") with standard codes (SNOMED CT, DICOM) for a FreeSurfer
    label, from Resources/labels/terminology.json; None for a label without a standard code."""
    table = _terminology()
    entry = table["structures"].get(str(int(label)))
    if entry is None or entry["type"] is None:
        return None
    code = "^".join
    category = table["categories"][entry.get("category", "anatomical")]
    modifier = table["modifiers"][entry["modifier"]] if "modifier" in entry else ("", "", "")
    return "~".join((table["context"], code(category), code(entry["type"]), code(modifier),
                     table["anatomic_context"], "^^", "^^"))


def label_table(labels) -> list[tuple[int, str, tuple[int, int, int]]]:
    from .labels import label_color, label_name

    return [(int(v), label_name(v), tuple(label_color(v))) for v in labels]


def add_segmentation(label_ijk: np.ndarray, name: str, reference, labels=None):
    """A segmentation node (one segment per non-zero label present) named, coloured and coded
    from FreeSurfer's table, with the reference volume's geometry.

    Segment ids are the FreeSurfer names; `labels` restricts/orders the segments (default: all
    non-zero values present, ascending).
    """
    label_ijk = np.asarray(label_ijk)
    _check_grid(label_ijk, reference, name)
    present = [int(v) for v in np.unique(label_ijk) if v != 0]
    wanted = present if labels is None else [int(v) for v in labels if int(v) in set(present)]
    table = label_table(wanted)

    colors = scene().AddNewNodeByClass("vtkMRMLColorTableNode", scene().GenerateUniqueName(name + " colors"))
    colors.SetTypeToUser()
    colors.SetHideFromEditors(True)
    colors.SetNumberOfColors(max(wanted, default=0) + 1)
    for i in range(colors.GetNumberOfColors()):
        colors.SetColor(i, "", 0.0, 0.0, 0.0, 0.0)
    for value, label_name_, rgb in table:
        colors.SetColor(value, label_name_, rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 1.0)

    kept = np.where(np.isin(label_ijk, wanted), label_ijk, 0).astype(np.int16)
    labelmap = add_scalar_volume(kept, name + " labelmap", reference, class_name="vtkMRMLLabelMapVolumeNode")
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())

    seg = scene().AddNewNodeByClass("vtkMRMLSegmentationNode", scene().GenerateUniqueName(name))
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference if reference is not None else labelmap)
    if reference is not None and reference.GetParentTransformNode() is not None:
        seg.SetAndObserveTransformNodeID(reference.GetParentTransformNode().GetID())  # like the labelmap
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    scene().RemoveNode(labelmap)
    scene().RemoveNode(colors)
    if not ok:
        raise BrainIDError("could not import the label map into a segmentation")

    segmentation = seg.GetSegmentation()
    by_value = {value: (n, rgb) for value, n, rgb in table}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(segment.GetLabelValue())
        if value not in by_value:
            continue
        seg_name, rgb = by_value[value]
        segment.SetName(seg_name)
        segment.SetColor(rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
        entry = terminology_entry(value)
        if entry is not None:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
        segment.SetTag("FreeSurferLabel", str(value))
    if reference is not None:
        place_in_study(seg, reference)
    return seg


def add_labelled_segmentation(label_ijk: np.ndarray, name: str, reference, table, tag: str = "BrainIDLabel"):
    """A segmentation node from a label array with a custom table [(value, name, (r, g, b) 0..255)]:
    one segment per table entry present in the array, in table order, named and coloured from it
    (few-shot heads). Each segment keeps its value in the `tag` tag."""
    label_ijk = np.asarray(label_ijk)
    _check_grid(label_ijk, reference, name)
    present = {int(v) for v in np.unique(label_ijk) if v != 0}
    table = [(int(v), str(n), tuple(c)) for v, n, c in table]
    wanted = [v for v, _, _ in table if v in present]
    seg = scene().AddNewNodeByClass("vtkMRMLSegmentationNode", scene().GenerateUniqueName(name))
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    if reference.GetParentTransformNode() is not None:
        seg.SetAndObserveTransformNodeID(reference.GetParentTransformNode().GetID())
    if wanted:
        labelmap = add_scalar_volume(np.where(np.isin(label_ijk, wanted), label_ijk, 0).astype(np.int16),
                                     name + " labelmap", reference, class_name="vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg):
                raise BrainIDError("could not import the label map into a segmentation")
        finally:
            scene().RemoveNode(labelmap)
    by_value = {v: (n, c) for v, n, c in table}
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(segment.GetLabelValue())
        if value in by_value:
            seg_name, rgb = by_value[value]
            segment.SetName(seg_name)
            segment.SetColor(*(float(c) / 255.0 for c in rgb[:3]))
            segment.SetTag(tag, str(value))
    place_in_study(seg, reference)
    return seg


def segments_of(seg) -> list[tuple[str, str, tuple[float, float, float]]]:
    """[(segment id, name, (r, g, b) 0..1)] of a segmentation node, in its order."""
    segmentation = seg.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        out.append((sid, segment.GetName(), tuple(float(c) for c in segment.GetColor())))
    return out


def segments_to_annotation(seg, reference, segment_ids, values) -> np.ndarray:
    """An (i, j, k) int16 array on the reference grid: 0 where none of `segment_ids` is painted, values[n]
    where segment_ids[n] is (a voxel painted in several segments gets the last one's value)."""
    if len(segment_ids) != len(values):
        raise ValueError("one value per segment id")
    dims = reference.GetImageData().GetDimensions() if reference.GetImageData() is not None else None
    if dims is None:
        raise BrainIDError(f"'{reference.GetName()}' holds no voxels")
    out = np.zeros(tuple(dims), np.int16)
    known = set(seg_id for seg_id, _, _ in segments_of(seg))
    for sid, value in zip(segment_ids, values):
        if sid not in known:
            raise BrainIDError(f"'{seg.GetName()}' has no segment '{sid}'")
        labelmap = scene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, reference):
                raise BrainIDError("could not export the segmentation to a label map")
            mask = slicer.util.arrayFromVolume(labelmap).transpose(2, 1, 0) != 0
            if mask.shape != out.shape:
                raise BrainIDError(f"segment '{sid}' exported on a grid {mask.shape}, not the volume's {out.shape}")
            out[mask] = int(value)
        finally:
            scene().RemoveNode(labelmap)
    return out


def set_segment_mask(seg, segment_id: str, mask_ijk: np.ndarray, reference) -> None:
    """Paint a segment: its voxels become the non-zero voxels of an (i, j, k) mask on the reference
    grid (what the Segment Editor does; slicer.util's version needs the Slicer application)."""
    mask_ijk = np.asarray(mask_ijk)
    _check_grid(mask_ijk, reference, "mask")
    labelmap = add_scalar_volume((mask_ijk != 0).astype(np.uint8), "__brainid_mask__", reference,
                                 class_name="vtkMRMLLabelMapVolumeNode")
    try:
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
        mode = slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, segment_id, mode):
            raise BrainIDError(f"could not paint segment '{segment_id}'")
    finally:
        scene().RemoveNode(labelmap)


def reference_volume_of(seg):
    """The volume a segmentation was painted on (the Segment Editor's source volume), or None."""
    node = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
    return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None


def segment_tag(segment, tag: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def segmentation_to_labels(seg, reference) -> np.ndarray:
    """Back to an (i, j, k) array of FreeSurfer ids on the reference grid (uses each segment's tag)."""
    labelmap = scene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        seg.GetSegmentation().GetSegmentIDs(ids)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, reference)
        if not ok:
            raise BrainIDError("could not export the segmentation to a label map")
        index = slicer.util.arrayFromVolume(labelmap).transpose(2, 1, 0)
        out = np.zeros(index.shape, np.int16)
        for i in range(ids.GetNumberOfValues()):
            segment = seg.GetSegmentation().GetSegment(ids.GetValue(i))
            tag = segment_tag(segment, "FreeSurferLabel")
            value = int(tag) if tag else i + 1
            out[index == i + 1] = value
        return out
    finally:
        scene().RemoveNode(labelmap)


# ---------------------------------------------------------------- tables


QC_MARKS = ("\U0001F7E2 good", "\U0001F7E1 fair", "\U0001F534 low")  # green, amber, red
ABSENT_MARK = "\u26AA absent"  # nothing labelled, and normal scans may lack it (BrainIDLib.qc.StructureQC.absent)


def qc_mark(score: float, threshold: float, good_from: float) -> str:
    """The table's coloured Trust cell: good (>= good_from), fair (>= threshold) or low (flagged)."""
    if score >= good_from:
        return QC_MARKS[0]
    return QC_MARKS[1] if score >= threshold else QC_MARKS[2]


def add_volumes_table(rows, name: str, reference=None, qc: dict | None = None):
    """A table node with one row per structure: Label, Structure, Volume [mL]; with `qc` (a QC report
    as a dict: BrainIDLib.qc.QCReport.to_dict, the CLI's _qc.json) also QC and Trust (a coloured
    mark; structures below the report's threshold read "low", unflagged ones with nothing labelled "absent")."""
    table = scene().AddNewNodeByClass("vtkMRMLTableNode", scene().GenerateUniqueName(name))
    t = table.GetTable()
    cols = [vtk.vtkIntArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray()]
    titles = ["Label", "Structure", "Volume [mL]"]
    scores = {s["label"]: s for s in qc["structures"]} if qc else None
    if scores is not None:
        cols += [vtk.vtkDoubleArray(), vtk.vtkStringArray()]
        titles += ["QC", "Trust"]
    for col, title in zip(cols, titles):
        col.SetName(title)
        t.AddColumn(col)
    for label, struct, ml in rows:
        r = table.AddEmptyRow()
        t.SetValue(r, 0, vtk.vtkVariant(int(label)))
        t.SetValue(r, 1, vtk.vtkVariant(str(struct)))
        t.SetValue(r, 2, vtk.vtkVariant(float(ml)))
        s = scores.get(int(label)) if scores is not None else None
        if s is not None:
            t.SetValue(r, 3, vtk.vtkVariant(round(float(s["score"]), 3)))
            mark = (ABSENT_MARK if s.get("absent")
                    else qc_mark(float(s["score"]), float(qc["threshold"]), float(qc["good_from"])))
            t.SetValue(r, 4, vtk.vtkVariant(mark))
    table.Modified()
    if reference is not None:
        place_in_study(table, reference)
    return table


def table_rows(table) -> list[tuple[int, str, float]]:
    t = table.GetTable()
    return [(int(t.GetValue(r, 0).ToInt()), t.GetValue(r, 1).ToString(), float(t.GetValue(r, 2).ToDouble()))
            for r in range(t.GetNumberOfRows())]


# ---------------------------------------------------------------- markups (points)


def markup_point_ras(node, index: int = -1) -> np.ndarray:
    """World RAS (parent transforms applied) of one control point of a markups node; index -1 = the
    last placed one."""
    if node is None or not node.IsA("vtkMRMLMarkupsNode"):
        raise BrainIDError("select a markups point list (place a point on the source volume first)")
    n = node.GetNumberOfControlPoints()
    if n == 0:
        raise BrainIDError(f"'{node.GetName()}' has no points; place a point on the source volume")
    if index < 0:  # count from the end among placed points (not one still being placed)
        defined = [i for i in range(n) if node.GetNthControlPointPositionStatus(i) == node.PositionDefined]
        if len(defined) < -index:
            raise BrainIDError(f"'{node.GetName()}' has no placed point; place a point on the source volume")
        index = defined[index]
    if not 0 <= index < n:
        raise BrainIDError(f"'{node.GetName()}' has no point number {index + 1}")
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, p)
    return np.array(p, dtype=np.float64)


def add_markups_points(points_ras, labels=None, name: str = "BrainID match", node=None, color=(1.0, 0.9, 0.1)):
    """Control points at world RAS positions in a point-list node (new, or `node` with its points replaced)."""
    if node is None:
        node = scene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene().GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetSelectedColor(*color)
    node.RemoveAllControlPoints()
    for i, p in enumerate(points_ras):
        p = [float(v) for v in np.asarray(p, dtype=np.float64).reshape(3)]
        index = node.AddControlPoint(p, labels[i] if labels else "")
        node.SetNthControlPointPositionWorld(index, p)  # world, even if the node is under a transform
        node.SetNthControlPointLocked(index, True)
    return node


# ---------------------------------------------------------------- heatmaps

# Colour maps for similarity heatmaps, first found wins (Inferno ships with Slicer; slicer-core has PET-Heat).
HEATMAP_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat",
                     "vtkMRMLColorTableNodeIron")


def heatmap_color_node():
    for cid in HEATMAP_COLOR_IDS:
        node = scene().GetNodeByID(cid)
        if node is not None:
            return node
    return None


def add_heatmap_volume(array_ijk: np.ndarray, name: str, reference, node=None, window=(0.0, 1.0)):
    """A float32 volume on the reference's exact grid, shown with a heat colour map and fixed
    window/level over `window` (cosine similarity: 0..1 by default; negative values clip to black)."""
    node = add_scalar_volume(np.asarray(array_ijk, dtype=np.float32), name, reference, node=node)
    display = node.GetDisplayNode()
    color = heatmap_color_node()
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    return node
