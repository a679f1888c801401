"""`brainid-train adapt --config adapt_fewshot`: a few-shot head from painted label images, headless.

A config with a `fewshot:` section runs BrainIDLib.fewshot.train_head (a 1x1x1 head on frozen
features, seconds on a CPU) instead of the generator/NIfTI adaptation loop of training/adapt.py,
and optionally applies the head to a folder of scans. Same as `brainid fewshot train/apply`;
this form keeps the inputs in a versionable YAML file.

    brainid-train adapt --config training/configs/adapt_fewshot.yaml \
        --set fewshot.model=brainid-lite --set fewshot.out=runs/fewshot/hippocampus.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from BrainIDLib.errors import BrainIDError

from .config import parse_override, resolve_config_path

DEFAULTS = {"model": None, "name": None, "description": "", "names": None, "steps": 300, "device": "auto",
            "out": "runs/fewshot/head.safetensors", "feature_cache": "off"}


def fewshot_config(path, overrides=()) -> dict | None:
    """The config as a dict when it is a few-shot config (has a `fewshot:` section), else None."""
    if path is None:
        return None
    p = resolve_config_path(path)
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or "fewshot" not in data:
        return None
    for text in overrides or []:
        _merge(data, parse_override(text))
    unknown = set(data["fewshot"] or {}) - set(DEFAULTS)
    if unknown:
        raise BrainIDError(f"unknown fewshot key(s) {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    data["fewshot"] = {**DEFAULTS, **(data["fewshot"] or {})}
    data["_base"] = str(p.parent)
    return data


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def run_fewshot(cfg: dict) -> dict:
    from BrainIDLib.feature_maps import FeatureCache
    from BrainIDLib.fewshot import segment, train_head
    from BrainIDLib.files import save_nifti

    fs = cfg["fewshot"]
    subjects = (cfg.get("data") or {}).get("subjects") or []
    if not subjects or not all(isinstance(s, dict) and "image" in s and "labels" in s for s in subjects):
        raise BrainIDError("a few-shot config needs data.subjects: a list of {image: SCAN, labels: PAINTED_LABELS}")
    if not fs["model"]:
        raise BrainIDError("set fewshot.model to a registry name or weights file (e.g. --set fewshot.model=brainid-lite)")
    cache = FeatureCache.from_setting(fs["feature_cache"])
    names = {int(k): str(v) for k, v in (fs["names"] or {}).items()} or None
    head = train_head([s["image"] for s in subjects], [s["labels"] for s in subjects], names=names, model=fs["model"],
                      device=fs["device"], cache=cache, steps=int(fs["steps"]), name=fs["name"],
                      description=fs["description"])
    out = head.save(fs["out"])
    result = {"head": str(out), "labels": dict(zip(head.labels, head.names)), "training": head.training}
    apply = cfg.get("apply") or {}
    if apply.get("input"):
        from BrainIDLib.files import nifti_stem, safe_name, scan_paths

        written = []
        for scan in scan_paths([apply["input"]], "apply.input"):
            seg = segment(str(scan), head, model=fs["model"], device=fs["device"], cache=cache)
            written.append(str(save_nifti(seg, Path(apply.get("output") or Path(out).parent) /
                                          f"{nifti_stem(scan)}_{safe_name(head.name)}.nii.gz")))
        result["segmentations"] = written
    print(json.dumps(result, indent=2))
    return result
