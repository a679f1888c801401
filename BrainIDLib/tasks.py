"""The one list of Brain-ID tasks: names, aliases, display names and parsing.

Every front end (Python API, CLI, cohort mode, Slicer) reads tasks from here, so a task is added
or renamed in one place. Pure Python: importing it does not import torch.
"""

from __future__ import annotations

from .errors import BrainIDError

# The four 1x1x1 heads on the frozen features, in the official order.
HEAD_TASKS = ("anatomy", "segmentation", "super_resolution", "bias_field")
# What `predict` can write: the heads plus the scan divided by its estimated bias field.
OUTPUT_TASKS = HEAD_TASKS + ("bias_corrected",)
# Views of the features themselves (no head): the first three principal components as RGB.
FEATURE_TASKS = ("features_pca",)
ALL_TASKS = OUTPUT_TASKS + FEATURE_TASKS

ALIASES = {
    "anat": "anatomy", "t1": "anatomy", "t1_synthesis": "anatomy", "synthesis": "anatomy",
    "reconstruction": "anatomy",
    "seg": "segmentation",
    "sr": "super_resolution", "superresolution": "super_resolution",
    "bias": "bias_field", "bf": "bias_field",
    "pca": "features_pca", "features": "features_pca",
}

# How results are named where people see them (Slicer node names, report headings).
DISPLAY_NAMES = {
    "segmentation": "segmentation",
    "anatomy": "synthetic T1",
    "super_resolution": "super-resolved",
    "bias_field": "bias field",
    "bias_corrected": "bias-corrected",
    "features_pca": "features PCA",
    "uncertainty": "QC uncertainty",
}


def canonical(name: str, allowed=ALL_TASKS) -> str:
    """The task a name or alias means ('T1', 'super-resolution' and 'sr' all work)."""
    key = str(name).strip().lower().replace("-", "_")
    task = ALIASES.get(key, key)
    if task not in allowed:
        raise BrainIDError(f"unknown task {name!r}; choose from {', '.join(allowed)}")
    return task


def parse(values, allowed=ALL_TASKS) -> list[str]:
    """Canonical task names, in order and without repeats, from names, aliases or comma/space lists."""
    if isinstance(values, str):
        values = [values]
    tasks: list[str] = []
    for value in values or ():
        for item in str(value).replace(",", " ").split():
            task = canonical(item, allowed)
            if task not in tasks:
                tasks.append(task)
    return tasks


def head_of(task: str) -> str | None:
    """The head a task needs: bias correction uses the bias-field head; feature views need none."""
    if task == "bias_corrected":
        return "bias_field"
    return task if task in HEAD_TASKS else None


def outputs_of(tasks) -> list[str]:
    """The outputs a list of tasks writes, in order: the bias field also writes the scan divided by it."""
    outputs = list(dict.fromkeys(tasks))
    if "bias_field" in outputs and "bias_corrected" not in outputs:
        outputs.append("bias_corrected")
    return outputs


def heads_for(tasks) -> list[str]:
    """The heads a list of tasks needs, in order, without repeats."""
    return list(dict.fromkeys(h for h in map(head_of, tasks) if h is not None))
