"""`brainid-train export --official`: a trained model and its heads as official Brain-ID files.

The pretrained file is a torch file {"model": {backbone.*, head.final_conv_image.*}} (the layout of
the released brain_id_pretrained.pth) and each task head a torch file {"model": {final_conv_<name>.*}}
(the official downstream layout, no `head.` prefix), so that the official code and BrainID's own
loader read them strictly. Files hold tensors only (they load with weights_only=True) and are
written atomically. The key mapping is BrainIDLib.weights' (official_state, official_head_state).
"""

from __future__ import annotations

from pathlib import Path

from BrainIDLib.errors import BrainIDError
from BrainIDLib.model import BrainIDModel
from BrainIDLib.weights import official_head_state, official_state, save_official

from .config import ConfigError


def export_official(model: BrainIDModel, out_dir: str | Path, name: str, heads_only: bool = False) -> dict[str, Path]:
    """<out>/<name>_pretrained.pth (backbone + anatomy head) unless heads_only, and
    <out>/<name>_<task>_head.pth for every head of the model."""
    out_dir = Path(out_dir)
    if not heads_only and "anatomy" not in model.heads:
        raise BrainIDError("the official pretrained file needs an anatomy head and this model has none; "
                           "add --heads-only to export its task heads alone")
    if heads_only and not model.heads:
        raise BrainIDError("the model has no task heads to export; give them with --head TASK=FILE")
    written = {}
    if not heads_only:
        written["model"] = save_official(official_state(model), out_dir / f"{name}_pretrained.pth")
    for task in model.tasks:
        written[f"{task}_head"] = save_official(official_head_state(model, task), out_dir / f"{name}_{task}_head.pth")
    return written


def export_command(args) -> dict[str, Path]:
    """The CLI: the model and heads that --run / --weights / --head name (as for evaluate)."""
    if not args.official:
        raise ConfigError("export writes the official Brain-ID layout: add --official "
                           "(runs already write BrainID's own safetensors files)")
    if not args.out:
        raise ConfigError("export needs --out FOLDER")
    from .evaluate import model_and_heads, run_config

    cfg, run_dir = run_config(args)
    model, weights, _ = model_and_heads(cfg, args, run_dir)
    name = args.name or (run_dir.name if run_dir is not None else Path(weights).stem)
    return export_official(model, args.out, name, heads_only=args.heads_only)
