"""Render docs/images/slicer-result.png: the shipped sample with a segmentation overlay, offscreen.

Everything goes through real MRML (slicer-core) and BrainID's adapter: the sample volume is read
with a Slicer storage node, the label map becomes a segmentation node (FreeSurfer names/colours),
the segmentation is exported back to a label map with the segments' colours, and Slicer's own
slice pipeline (vtkMRMLSliceLogic: background + label layer blending) produces the axial, coronal
and sagittal images, which VTK lays out in an offscreen (EGL) render window.

With --predict (how the README's picture is made) the labels are the default model's segmentation of
the sample; with --labels, any FreeSurfer-label NIfTI on the sample grid; with neither, tissue classes
thresholded from nilearn's MNI152 GM/WM/CSF maps (no model needed). The caption says which.

    VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow PYTHONPATH=. python docs/make_screenshot.py --predict
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "BrainID"))  # BrainIDModuleLib.storage: reading files through MRML storage nodes
OUT = REPO / "docs" / "images" / "slicer-result.png"
SAMPLE = REPO / "Resources" / "SampleData" / "MNI152-brain-1.5mm.nii.gz"
VIEW = 360  # pixels per slice view


def tissue_labels(reference_affine: np.ndarray, shape) -> np.ndarray:
    """FreeSurfer ids from nilearn's MNI152 tissue maps on the sample grid (nearest sampling)."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    try:
        from nilearn.datasets import load_mni152_csf_template
    except ImportError:  # older nilearn
        load_mni152_csf_template = None
    from scipy import ndimage

    maps = [load_mni152_gm_template(resolution=1), load_mni152_wm_template(resolution=1)]
    if load_mni152_csf_template is not None:
        maps.append(load_mni152_csf_template(resolution=1))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ reference_affine[:3, :3].T + reference_affine[:3, 3]
    probs = []
    for m in maps:
        vox = (ras - m.affine[:3, 3]) @ np.linalg.inv(m.affine[:3, :3]).T
        probs.append(ndimage.map_coordinates(np.asarray(m.dataobj, np.float32), vox.T, order=1).reshape(shape))
    probs = np.stack(probs, -1)
    cls = probs.argmax(-1)
    fg = probs.max(-1) > 0.35
    left = (ras[:, 0] < 0).reshape(shape)  # RAS: negative x is the subject's left
    lab = np.zeros(shape, np.int16)
    lab[fg & (cls == 0)] = np.where(left, 3, 42)[fg & (cls == 0)]  # cerebral cortex
    lab[fg & (cls == 1)] = np.where(left, 2, 41)[fg & (cls == 1)]  # cerebral white matter
    if probs.shape[-1] > 2:
        lab[fg & (cls == 2)] = 24  # CSF
    return lab


def slice_images(scene, app_logic, background, labelmap) -> list[tuple[str, np.ndarray]]:
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    images = []
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        node = logic.AddSliceNode(name)
        node.SetOrientation(orientation)
        node.SetDimensions(VIEW, VIEW, 1)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetLabelVolumeID(labelmap.GetID())
        composite.SetLabelOpacity(0.45)
        logic.FitSliceToAll()
        logic.SetSliceOffset(logic.GetSliceOffset() + {"Axial": 8.0, "Coronal": 0.0, "Sagittal": -28.0}[orientation])
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        img = producer.GetOutputDataObject(0)
        w, h, _ = img.GetDimensions()
        rgba = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
        images.append((orientation, rgba[::-1].copy()))  # VTK rows go bottom-up
    return images


def render_png(images, legend, path: Path, source: str) -> None:
    """Lay out the slice images side by side in an offscreen VTK window, with titles and a legend."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    n = len(images)
    legend_h = 70
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetSize(VIEW * n, VIEW + legend_h)
    for i, (title, rgba) in enumerate(images):
        data = vtk.vtkImageData()
        h, w = rgba.shape[:2]
        data.SetDimensions(w, h, 1)
        data.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(rgba[::-1, :, :3]).reshape(-1, 3), deep=True))
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputData(data)
        ren = vtk.vtkRenderer()
        ren.SetViewport(i / n, legend_h / (VIEW + legend_h), (i + 1) / n, 1.0)
        ren.AddActor(actor)
        text = vtk.vtkTextActor()
        text.SetInput(title)
        text.GetTextProperty().SetFontSize(18)
        text.GetTextProperty().SetColor(1, 1, 0.6)
        text.SetPosition(8, VIEW - 28)
        ren.AddViewProp(text)
        ren.ResetCamera()
        cam = ren.GetActiveCamera()
        cam.ParallelProjectionOn()
        cam.SetParallelScale(h / 2.0)
        win.AddRenderer(ren)
    ren = vtk.vtkRenderer()
    ren.SetViewport(0, 0, 1, legend_h / (VIEW + legend_h))
    ren.SetBackground(0.1, 0.1, 0.12)
    x = 10
    for name, rgb in legend:
        swatch = vtk.vtkTextActor()
        swatch.SetInput("   ")
        swatch.GetTextProperty().SetFontSize(14)
        swatch.GetTextProperty().SetBackgroundColor(*[c / 255.0 for c in rgb])
        swatch.GetTextProperty().SetBackgroundOpacity(1.0)
        swatch.SetPosition(x, 40)
        ren.AddViewProp(swatch)
        label = vtk.vtkTextActor()
        label.SetInput(name)
        label.GetTextProperty().SetFontSize(14)
        label.SetPosition(x + 22, 40)
        ren.AddViewProp(label)
        x += 26 + 8 * len(name) + 10
    note = vtk.vtkTextActor()
    note.SetInput(f"BrainID in MRML (slicer-core): sample volume + segmentation overlay ({source})")
    note.GetTextProperty().SetFontSize(13)
    note.GetTextProperty().SetColor(0.8, 0.8, 0.8)
    note.SetPosition(10, 10)
    ren.AddViewProp(note)
    win.AddRenderer(ren)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.Update()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", help="a FreeSurfer-label NIfTI on the sample grid (e.g. a BrainID prediction)")
    parser.add_argument("--predict", action="store_true", help="segment the sample with the default model")
    parser.add_argument("--output", default=str(OUT))
    args = parser.parse_args(argv)

    import nibabel as nib
    import slicer

    from BrainIDLib import slicer_adapter as sa
    from BrainIDLib.labels import label_color, label_name
    from BrainIDModuleLib.storage import load_volume_file

    scene = sa.init_headless_scene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    volume = load_volume_file(SAMPLE, "MNI152 sample")
    _, affine = sa.array_from_volume(volume)
    if args.predict:
        import BrainIDLib
        from BrainIDLib.registry import default_model

        pred = BrainIDLib.predict(SAMPLE, tasks=("segmentation",), device="cpu")
        labels = np.asarray(pred.outputs["segmentation"].dataobj).astype(np.int16)
        source = f"segmentation: BrainID's default model, {default_model().name}"
    elif args.labels:
        labels = np.asarray(nib.load(args.labels).dataobj).astype(np.int16)
        source = f"labels: {Path(args.labels).name}"
    else:
        labels = tissue_labels(affine, volume.GetImageData().GetDimensions())
        source = "labels: MNI152 tissue classes, not a model prediction"
    seg = sa.add_segmentation(labels, "MNI152 sample segmentation", volume)

    # Segmentation -> label map coloured from the segments (what Slicer's label layer shows).
    back = sa.segmentation_to_labels(seg, volume)
    assert np.array_equal(back, labels), "segmentation round trip changed the labels"
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "segment colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(int(back.max()) + 1)
    for i in range(colors.GetNumberOfColors()):
        colors.SetColor(i, "", 0, 0, 0, 0)
    present = [int(v) for v in np.unique(back) if v]
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(sa.segment_tag(segment, "FreeSurferLabel"))
        colors.SetColor(value, segment.GetName(), *segment.GetColor(), 1.0)
    labelmap = sa.add_scalar_volume(back, "overlay", volume, class_name="vtkMRMLLabelMapVolumeNode")
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())

    images = slice_images(scene, app_logic, volume, labelmap)
    render_png(images, [(label_name(v), label_color(v)) for v in present], Path(args.output), source)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
