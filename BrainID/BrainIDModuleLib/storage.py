"""Reading and writing volumes and segmentations through MRML storage nodes (what Slicer itself
uses; slicer.util's loaders need the application). For scripts, tests and slicer-core."""

from __future__ import annotations

from BrainIDLib.errors import BrainIDError
from BrainIDLib.slicer_adapter import scene


def load_volume_file(path, name: str | None = None):
    return _read(path, name or "", "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", "")


def load_segmentation_file(path, name: str = "Segmentation"):
    return _read(path, name, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", "the segmentation ")


def _read(path, name: str, node_class: str, storage_class: str, what: str):
    """A new node of `node_class` read from `path` by a storage node; nothing left in the scene on failure."""
    node = scene().AddNewNodeByClass(node_class, name)
    storage = scene().AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene().RemoveNode(node)
        scene().RemoveNode(storage)
        raise BrainIDError(f"Slicer could not read {what}{path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def _write(node, path, storage_class: str) -> None:
    storage = scene().AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    try:
        if not storage.WriteData(node):
            raise BrainIDError(f"Slicer could not write {path}")
    finally:
        scene().RemoveNode(storage)


def save_volume_file(node, path) -> None:
    _write(node, path, "vtkMRMLVolumeArchetypeStorageNode")


def save_segmentation_file(seg, path) -> None:
    _write(seg, path, "vtkMRMLSegmentationStorageNode")
