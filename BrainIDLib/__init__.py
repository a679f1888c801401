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

import importlib

from .errors import BrainIDError
from .tasks import HEAD_TASKS as TASKS  # the four task heads (BrainIDLib.tasks has the rest)

__version__ = "0.1.0"

# Public names and the module defining each. They need torch, so they are imported on first use:
# `import BrainIDLib` stays light, `brainid --version` / `--help` stay fast and Ctrl-C during
# start-up reaches the CLI's handler.
_LAZY = {
    "Architecture": "model", "BrainIDModel": "model",
    "load_model": "loader",
    "predict": "inference",
    "features": "feature_maps", "compute_feature_map": "feature_maps", "FeatureCache": "feature_maps",
    "find_correspondence": "correspondence", "similarity_map": "correspondence",
    "train_head": "fewshot", "segment": "fewshot", "FewShotHead": "fewshot",
    "volumes_table": "volumes",
    "Volume": "volume", "load_volume": "volume",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'BrainIDLib' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["BrainIDError", "TASKS", "__version__", *_LAZY]
