"""The MRML adapter against a real MRML scene (slicer-core): geometry, segmentations with standard
terminology, tables; files through the module's storage helpers."""

from __future__ import annotations

import numpy as np
import pytest

from slicer_helpers import require_slicer

slicer = require_slicer()

import nibabel as nib  # noqa: E402

from BrainIDLib import slicer_adapter as sa  # noqa: E402
from BrainIDLib.errors import BrainIDError  # noqa: E402
from BrainIDLib.labels import SEGMENTATION_LABELS, label_color, label_name  # noqa: E402
from BrainIDModuleLib import storage, views  # noqa: E402


@pytest.fixture(autouse=True)
def scene():
    return sa.init_headless_scene()


def rotation(ax, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def geometry(kind):
    a = np.eye(4)
    if kind == "lps":  # typical DICOM-derived orientation: i -> left, j -> posterior
        a[:3, :3] = np.diag([-0.9, -0.9, 1.2])
    elif kind == "oblique":
        a[:3, :3] = rotation(0, 17) @ rotation(2, -31) @ np.diag([1.1, 0.8, 1.0])
    elif kind == "anisotropic":
        a[:3, :3] = np.diag([0.5, 0.6, 5.0])[:, [2, 0, 1]]  # thick slices, permuted axes
    a[:3, 3] = [12.5, -30.0, 7.25]
    return a


@pytest.mark.parametrize("kind", ["lps", "oblique", "anisotropic"])
def test_volume_roundtrip_keeps_geometry_and_values(kind, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((11, 9, 7)).astype(np.float32) * 100
    affine = geometry(kind)
    node = sa.add_scalar_volume(data, "in", affine=affine)
    arr, aff = sa.array_from_volume(node)
    assert arr.shape == data.shape and np.array_equal(arr, data)
    np.testing.assert_allclose(aff, affine, atol=1e-12)
    # voxel (i,j,k) -> RAS agrees with slicer's own mapping
    ras = [0.0, 0.0, 0.0, 1.0]
    m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else None
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint((3, 2, 1, 1))
    np.testing.assert_allclose(ras[:3], (affine @ [3, 2, 1, 1])[:3], atol=1e-9)

    # a result made from these arrays lands on exactly the same grid
    out = sa.add_scalar_volume(arr * 2, "out", reference=node)
    np.testing.assert_array_equal(sa.ijk_to_ras(out), sa.ijk_to_ras(node))
    np.testing.assert_array_equal(sa.array_from_volume(out)[0], data * 2)

    # through files: Slicer writes (LPS on disk), nibabel reads the same RAS geometry, and back
    path = tmp_path / f"{kind}.nii.gz"
    storage.save_volume_file(node, path)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(np.asanyarray(img.dataobj), data, atol=1e-5)
    back = storage.load_volume_file(path)
    np.testing.assert_allclose(sa.ijk_to_ras(back), affine, atol=1e-5)
    np.testing.assert_allclose(sa.array_from_volume(back)[0], data, atol=1e-5)

    # the in-memory NIfTI handed to the engine carries the same affine in qform and sform
    nii = sa.volume_to_nifti(node)
    np.testing.assert_allclose(nii.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(nii.get_sform(), affine, atol=1e-12)
    assert np.array_equal(np.asanyarray(nii.dataobj), data)


@pytest.mark.parametrize("sform_code,slicer_uses", [(1, "sform"), (2, "qform"), (4, "qform")])
def test_qform_sform_disagreement(sform_code, slicer_uses, tmp_path):
    """Documented behaviour: nibabel always takes the sform (code > 0); Slicer/ITK takes it only for
    code 1 (scanner), else the qform. BrainID inside Slicer follows the node (what Slicer shows), and
    any file it writes for the engine has qform == sform, so both readers then agree."""
    data = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    q = np.diag([2.0, 3.0, 4.0, 1.0])
    q[:3, 3] = [10, 20, 30]
    s = q.copy()
    s[:3, 3] = [-5, 6, 7]
    img = nib.Nifti1Image(data, s)
    img.set_qform(q, code=1)
    img.set_sform(s, code=sform_code)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, str(path))

    node = storage.load_volume_file(path)
    expected = s if slicer_uses == "sform" else q
    np.testing.assert_allclose(sa.ijk_to_ras(node), expected)
    np.testing.assert_allclose(nib.load(str(path)).affine, s)  # nibabel: sform

    # what BrainID hands to the engine follows the node, and a written copy is unambiguous
    nii = sa.volume_to_nifti(node)
    np.testing.assert_allclose(nii.affine, expected)
    nib.save(nii, str(tmp_path / "engine_input.nii.gz"))
    np.testing.assert_allclose(nib.load(str(tmp_path / "engine_input.nii.gz")).affine, expected, atol=1e-5)
    again = storage.load_volume_file(tmp_path / "engine_input.nii.gz")
    np.testing.assert_allclose(sa.ijk_to_ras(again), expected, atol=1e-5)


def test_linear_parent_transform_is_followed_and_copied():
    node = sa.add_scalar_volume(np.ones((4, 5, 6), np.float32), "in", affine=geometry("lps"))
    tnode = sa.scene().AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    world = sa.world_ijk_to_ras(node)
    np.testing.assert_allclose(world[:3, 3], geometry("lps")[:3, 3] + [5, 0, 0])
    out = sa.add_scalar_volume(np.zeros((4, 5, 6)), "out", reference=node)
    assert out.GetParentTransformNode() is tnode
    lab = np.zeros((4, 5, 6), np.int16)
    lab[1:3, 1:4, 2:5] = 17
    seg = sa.add_segmentation(lab, "seg", node)
    assert seg.GetParentTransformNode() is tnode
    np.testing.assert_array_equal(sa.segmentation_to_labels(seg, node), lab)


def labelled_volume(shape=(20, 18, 16)):
    lab = np.zeros(shape, np.int16)
    lab[2:8, 3:9, 2:7] = 17  # Left-Hippocampus
    lab[10:16, 3:9, 2:7] = 53  # Right-Hippocampus
    lab[4:15, 10:16, 8:14] = 2  # Left-Cerebral-White-Matter
    lab[1, 1, 1] = 24  # CSF
    return lab


def test_segmentation_names_colours_and_export(tmp_path):
    lab = labelled_volume()
    ref = sa.add_scalar_volume(np.random.rand(*lab.shape), "T1", affine=geometry("oblique"))
    seg = sa.add_segmentation(lab, "T1 segmentation", ref)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(sa.segment_tag(segment, "FreeSurferLabel"))
        assert segment.GetName() == label_name(value)
        np.testing.assert_allclose(segment.GetColor(), np.array(label_color(value)) / 255.0)
    np.testing.assert_array_equal(sa.segmentation_to_labels(seg, ref), lab)

    # storage node round trip (.seg.nrrd), names/colours/labels survive
    path = tmp_path / "seg.seg.nrrd"
    storage.save_segmentation_file(seg, path)
    again = storage.load_segmentation_file(path)
    names = sorted(again.GetSegmentation().GetNthSegment(i).GetName() for i in range(4))
    assert names == sorted(label_name(v) for v in (2, 17, 24, 53))
    np.testing.assert_array_equal(sa.segmentation_to_labels(again, ref), lab)


# SNOMED CT codes of the structures, as Slicer's DICOM master terminology and DICOM CID 7140 give them
# (Resources/labels/terminology.json states the source of each); the few DICOM-coded (DCM) structures
# have no SNOMED CT code.
EXPECTED_TYPES = {"Hippocampus": "5366008", "Amygdala": "4958002", "Thalamus": "42695009", "Caudate": "11000004",
                  "Putamen": "89278009", "Pallidum": "14738005", "Lateral-Ventricle": "66720007",
                  "Cerebral-White-Matter": "68523003", "Cerebral-Cortex": "40146001", "Brain-Stem": "119238007",
                  "3rd-Ventricle": "49841001", "4th-Ventricle": "35918002", "Cerebellum-Cortex": "25991003",
                  "Cerebellum-White-Matter": "33060004", "Accumbens-area": "427667007", "CSF": "65216001",
                  "Optic-Chiasm": "244453006", "VentralDC": "110700", "WM-hypointensities": "110701"}
SIDES = {"Left": ("7771000", "Left"), "Right": ("24028007", "Right")}


def test_every_predicted_segment_carries_standard_terminology_codes():
    """Every structure of the 33-class segmentation, through a real MRML segmentation node, and each
    entry parsed back by Slicer's own terminology logic."""
    structures = [v for v in SEGMENTATION_LABELS if v]
    lab = np.zeros((len(structures), 3, 3), np.int16)
    for i, value in enumerate(structures):
        lab[i] = value
    ref = sa.add_scalar_volume(np.ones(lab.shape, np.float32), "T1")
    seg = sa.add_segmentation(lab, "T1 segmentation", ref)
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(structures) == 32
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        name = segment.GetName()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(sa.segment_tag(segment, segment.GetTerminologyEntryTagName()), entry)
        category, kind, modifier = entry.GetCategoryObject(), entry.GetTypeObject(), entry.GetTypeModifierObject()
        assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
        assert category.GetCodingSchemeDesignator() == "SCT" and category.GetCodeValue() in ("123037004", "49755003")
        side = next((s for s in SIDES if name.startswith(s + "-")), None)
        base = name[len(side) + 1:] if side else name
        assert kind.GetCodeValue() == EXPECTED_TYPES[base], name
        assert kind.GetCodingSchemeDesignator() == ("DCM" if base in ("VentralDC", "WM-hypointensities") else "SCT")
        assert kind.GetCodeMeaning(), name
        if side:  # left and right modifiers the right way round
            assert (modifier.GetCodingSchemeDesignator(), modifier.GetCodeValue(), modifier.GetCodeMeaning()) == \
                ("SCT", *SIDES[side]), name
        else:
            assert not modifier.GetCodeValue(), name
    assert sa.terminology_entry(31) is None  # choroid plexus: no standard code in the sources (the JSON says so)


def test_freesurfer_colours_match_freesurfer_lut():
    # Spot checks against FreeSurferColorLUT.txt (the table Slicer's FreeSurferLabels node loads).
    known = {2: (245, 245, 245), 4: (120, 18, 134), 17: (220, 216, 20), 53: (220, 216, 20), 10: (0, 118, 14)}
    for value, rgb in known.items():
        assert tuple(label_color(value)) == rgb
    assert label_name(17) == "Left-Hippocampus"
    assert len(SEGMENTATION_LABELS) == 33


def test_volumes_table_roundtrip():
    rows = [(17, "Left-Hippocampus", 3.5), (53, "Right-Hippocampus", 3.25)]
    table = sa.add_volumes_table(rows, "vols")
    assert sa.table_rows(table) == rows
    assert table.GetTable().GetColumnName(2) == "Volume [mL]"


def test_rgb_volume():
    ref = sa.add_scalar_volume(np.zeros((5, 6, 7)), "ref", affine=geometry("anisotropic"))
    pca = np.random.default_rng(0).normal(size=(5, 6, 7, 3))
    node = sa.add_rgb_volume(sa.pca_to_rgb(pca), "pca", ref)
    assert node.IsA("vtkMRMLVectorVolumeNode")
    assert node.GetImageData().GetNumberOfScalarComponents() == 3
    np.testing.assert_array_equal(sa.ijk_to_ras(node), sa.ijk_to_ras(ref))
    kji = slicer.util.arrayFromVolume(node)
    np.testing.assert_array_equal(kji.transpose(2, 1, 0, 3), sa.pca_to_rgb(pca))


def test_subject_hierarchy_study_placement():
    sh = sa.scene().GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    ref = sa.add_scalar_volume(np.zeros((4, 4, 4)), "ref")
    # Slicer's GUI creates items for new nodes; slicer-core does not, so make the input's item here
    if sh.GetItemByDataNode(ref):
        sh.SetItemParent(sh.GetItemByDataNode(ref), study)
    else:
        sh.CreateItem(study, ref)
    out = sa.add_scalar_volume(np.zeros((4, 4, 4)), "out", reference=ref)
    seg = sa.add_segmentation(labelled_volume((4, 4, 4)) * 0 + 17, "seg", ref)
    table = sa.add_volumes_table([], "t", ref)
    for node in (out, seg, table):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_bad_inputs_give_clear_messages():
    empty = sa.scene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(BrainIDError, match="holds no voxels"):
        sa.array_from_volume(empty)
    with pytest.raises(BrainIDError, match="scalar volume"):
        sa.array_from_volume(None)
    ref = sa.add_scalar_volume(np.zeros((4, 5, 6)), "ref")
    with pytest.raises(BrainIDError, match="input grid"):
        sa.add_scalar_volume(np.zeros((4, 5, 7)), "wrong", reference=ref)
    grid = sa.scene().AddNewNodeByClass("vtkMRMLGridTransformNode")
    ref.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(BrainIDError, match="harden"):
        sa.world_ijk_to_ras(ref)


def test_show_results_without_gui_is_harmless():
    ref = sa.add_scalar_volume(np.zeros((4, 4, 4)), "ref")
    seg = sa.add_segmentation(np.full((4, 4, 4), 17, np.int16), "seg", ref)
    assert views.show_results(ref, seg) is False
    assert seg.GetDisplayNode().GetVisibility()
