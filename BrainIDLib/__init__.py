"""BrainIDLib: contrast-agnostic brain MRI features (Brain-ID, ECCV 2024) and their task heads.

    import BrainIDLib as bid
    model = bid.load_model("brainid-lite")            # registry name or a weights file
    f = model.features(x)                             # (B,1,D,H,W) -> (B,C,D,H,W)
    y = model.head_output(x, "segmentation")
    pred = bid.predict("t1.nii.gz", tasks=("segmentation", "anatomy"))
    match, = bid.find_correspondence("t1.nii.gz", (-24, -20, -12), ["flair.nii.gz"])
    head = bid.train_head(["t1.nii.gz"], ["painted.nii.gz"], names={1: "Hippocampus"}); head.save("hippo.safetensors")
    seg = bid.segment("t2.nii.gz", head)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import BrainIDError  # noqa: E402

from .tasks import HEAD_TASKS as TASKS  # noqa: E402 - the four task heads (BrainIDLib.tasks has the rest)

_MODEL = ("Architecture", "BrainIDModel")  # torch-backed: imported on first use, so that
# `brainid --version` / `--help` stay fast and Ctrl-C during start-up reaches the CLI's handler


_CORRESPONDENCE = ("find_correspondence", "similarity_map", "compute_feature_map", "FeatureCache")
_FEWSHOT = ("train_head", "segment", "FewShotHead")


def __getattr__(name):  # keep `import BrainIDLib` light: heavy parts load on first use
    if name in _MODEL:
        from . import model

        return getattr(model, name)
    if name == "load_model":
        from .loader import load_model

        return load_model
    if name in ("predict", "features"):
        from . import inference

        return getattr(inference, name)
    if name == "volumes_table":
        from .volumes import volumes_table

        return volumes_table
    if name in _CORRESPONDENCE:
        from . import correspondence

        return getattr(correspondence, name)
    if name in _FEWSHOT:
        from . import fewshot

        return getattr(fewshot, name)
    if name in ("Volume", "load_volume"):
        from . import volume

        return getattr(volume, name)
    raise AttributeError(f"module 'BrainIDLib' has no attribute {name!r}")


__all__ = ["BrainIDError", "BrainIDModel", "Architecture", "TASKS", "load_model", "predict", "features", "volumes_table",
           "Volume", "load_volume", *_CORRESPONDENCE, *_FEWSHOT, "__version__"]
