"""The module's state in the scene: a typed parameter node (saved with the scene, bound to the
widgets whose SlicerParameterName property names a field; see BrainID.ui)."""

from typing import Annotated

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

from BrainIDLib.devices import DEVICES  # the one device vocabulary (auto = CUDA, then Apple MPS, then CPU)
from BrainIDModuleLib import engine

TASK_FIELDS = {"segmentation": "segmentation", "anatomy": "anatomy", "super_resolution": "superResolution",
               "bias_field": "biasField", "features_pca": "featuresPca"}  # BrainIDLib.tasks name -> field


@parameterNodeWrapper
class BrainIDParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: bool = True
    anatomy: bool = False
    superResolution: bool = False
    biasField: bool = False
    featuresPca: bool = False
    modelName: str = ""  # a registry name or weights file; empty: the registry's default
    device: Annotated[str, Choice(DEVICES)] = "auto"
    qc: bool = True
    flipAverage: Annotated[str, Choice(tuple(engine.FLIP_AVERAGE))] = "auto"  # auto: as the model says
    points: vtkMRMLMarkupsFiducialNode
    showHeatmap: bool = True
    headName: str = "few-shot"

    def tasks(self) -> list:
        return [task for task, field in TASK_FIELDS.items() if getattr(self, field)]
