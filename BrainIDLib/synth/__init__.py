"""Synthetic training data from brain label maps (Brain-ID's mild-to-severe generator).

    from BrainIDLib.synth import SubjectGenerator
    gen = SubjectGenerator(preset="brainid", size=(128, 128, 128), device="cpu")
    draw = gen(labels, t1=None, seed=0)
    # draw["inputs"] (N,1,*size) in [0,1], draw["target_t1"] (1,*size), draw["segmentation"] (*size),
    # draw["labels"], draw["bias_field"] (N,1,*size), draw["clean"] (N,1,*size), draw["severity"] (N,)
"""

from __future__ import annotations

from .generator import PRESETS, SubjectGenerator
from .tables import LabelTable, default_table, render_t1, to_segmentation


def __getattr__(name):  # the dataset pulls in nibabel: load it on first use
    if name in ("LabelMapDataset", "load_label_map"):
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'BrainIDLib.synth' has no attribute {name!r}")


__all__ = ["SubjectGenerator", "PRESETS", "LabelTable", "default_table", "render_t1", "to_segmentation",
           "LabelMapDataset", "load_label_map"]
