"""What the slice views show after a run: view decisions belong to the module, not the MRML adapter.
Each function does nothing (and returns False) without the Slicer application, e.g. under slicer-core."""

from __future__ import annotations

import slicer


def has_gui() -> bool:
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None


def show_results(background, segmentation=None) -> bool:
    """The input in the slice views with the segmentation overlaid (half-transparent fill)."""
    if segmentation is not None and segmentation.GetDisplayNode() is not None:
        segmentation.GetDisplayNode().SetVisibility(True)
        segmentation.GetDisplayNode().SetOpacity2DFill(0.5)
    if not has_gui():
        return False
    slicer.util.setSliceViewerLayers(background=background, foreground=None, label=None, fit=True)
    return True


def show_heatmap(background, heatmap, point_ras=None, opacity: float = 0.5) -> bool:
    """The heatmap over its volume, slices centred on `point_ras`."""
    if not has_gui():
        return False
    slicer.util.setSliceViewerLayers(background=background, foreground=heatmap, foregroundOpacity=opacity,
                                     label=None, fit=point_ras is None)
    if point_ras is not None:
        slicer.modules.markups.logic().JumpSlicesToLocation(*[float(v) for v in point_ras], True)
    return True


def hide_foreground() -> bool:
    if not has_gui():
        return False
    slicer.util.setSliceViewerLayers(foreground=None)
    return True
