"""Downstream adaptation: one 1x1x1 head per task on (by default frozen) Brain-ID features.

With a frozen backbone the features are computed under no_grad through the model's low-memory
path and only the heads (a few hundred parameters each) are trained and checkpointed; with
adapt.freeze_backbone=false the whole network is fine-tuned and exported as a model file too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from BrainIDLib.registry import sha256_of
import BrainIDLib
from BrainIDLib.errors import BrainIDError
from BrainIDLib.labels import SEGMENTATION_LABELS, label_name
from BrainIDLib.model import BrainIDModel
from BrainIDLib.weights import atomic_write, save_head, save_model

from . import losses
from .config import Config, size3
from .data import GeneratorSteps, NiftiSteps, step_loader
from .distributed import DistInfo
from .engine import Job

OUT_CHANNELS = {"segmentation": len(SEGMENTATION_LABELS), "anatomy": 1, "super_resolution": 1, "bias_field": 1}
DESCRIPTIONS = {
    "segmentation": "33-class FreeSurfer segmentation head (1x1x1 conv on Brain-ID features)",
    "anatomy": "T1-weighted anatomy synthesis head (1x1x1 conv on Brain-ID features)",
    "super_resolution": "super-resolution head (1x1x1 conv on Brain-ID features and the input image)",
    "bias_field": "bias field head predicting log-bias (1x1x1 conv on Brain-ID features and the input image)",
}
NEEDS = {"segmentation": "segmentation", "anatomy": "target_t1", "super_resolution": "clean", "bias_field": "bias_field"}


class AdaptNet(nn.Module):
    """The trainable part: the task heads, plus the backbone when fine-tuning.

    A frozen backbone is kept outside the module's parameters (not checkpointed, not in DDP) and
    run under no_grad on its low-memory path."""

    def __init__(self, model: BrainIDModel, tasks: list[str], fine_tune: bool, low_memory: bool = True):
        super().__init__()
        self.tasks = list(tasks)
        self.fine_tune = fine_tune
        self.low_memory = low_memory
        self.heads = nn.ModuleDict({t: model.heads[t] for t in tasks})
        if fine_tune:
            self.backbone = model.backbone
        else:
            self._frozen = [model.backbone]  # a list hides it from nn.Module registration
            for p in model.backbone.parameters():
                p.requires_grad_(False)

    def frozen_backbone(self):
        return None if self.fine_tune else self._frozen[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fine_tune:
            feats = self.backbone(x)
        else:
            backbone = self._frozen[0]
            with torch.no_grad():
                feats = backbone.forward_low_memory(x) if self.low_memory else backbone(x)
        return {t: self.heads[t](feats, x) for t in self.tasks}


def provenance(what: str, init, sha256: str | None) -> str:
    """The `source` of a file trained here: BrainID made it, on the named backbone (never that
    backbone's own label, e.g. "official Brain-ID release")."""
    return f"{what} by BrainID on {Path(str(init)).name}" + (f" (sha256 {sha256})" if sha256 else "")


def load_backbone(cfg: Config) -> BrainIDModel:
    init = cfg["model"]["init"]
    if not init:
        raise BrainIDError("adaptation needs a pretrained model: set model.init to a weights file or registry name "
                           "(e.g. --set model.init=runs/pretrain/model.safetensors)")
    heads = {t: f for t, f in (cfg["adapt"]["heads"] or {}).items()}
    model = BrainIDLib.load_model(init, heads=heads or None)
    for task in cfg["adapt"]["tasks"]:
        if task not in heads:  # a fresh head, even if the pretrained file carries one for this task
            model.add_head(task, OUT_CHANNELS[task])
    return model


def adapt_loss(cfg: Config, dist: DistInfo):
    tasks = list(cfg["adapt"]["tasks"])
    lc = cfg["loss"]

    def loss_fn(module: nn.Module, batch: dict, step: int):
        device = dist.device
        for t in tasks:
            if NEEDS[t] not in batch:
                raise BrainIDError(f"the {t} task needs '{NEEDS[t]}' in its training data "
                                   f"(for data.source=nifti give each subject {'labels' if t == 'segmentation' else 't1'})")
        inputs = batch["inputs"].to(device).float()
        per = inputs.shape[0] // int(batch["subjects"])
        outs = module(inputs)
        total, parts = 0.0, {}
        for t in tasks:
            if t == "segmentation":
                l, p = losses.segmentation_loss(outs[t], batch["segmentation"].to(device).repeat_interleave(per, 0),
                                                 style=lc["segmentation_style"])
            elif t == "anatomy":
                l, p = losses.anatomy_loss(outs[t], batch["target_t1"].to(device).repeat_interleave(per, 0),
                                           lc["anatomy_l1"], lc["anatomy_grad"])
            elif t == "super_resolution":
                l, p = losses.image_loss(outs[t], batch["clean"].to(device), lc["anatomy_l1"], lc["anatomy_grad"])
            else:
                mask = batch.get("mask")
                if mask is None:
                    mask = batch["segmentation"] > 0
                mask = mask.to(device)[:, None].repeat_interleave(per, 0)
                l, p = losses.bias_field_loss(outs[t], batch["bias_field"].to(device), mask)
            total = total + l
            parts.update(p)
        return total, parts

    return loss_fn


def use_low_memory(cfg: Config, model: BrainIDModel) -> bool:
    """adapt.low_memory_features: auto = the low-memory path only when a plain no_grad forward of
    one step's inputs would need more than adapt.plain_forward_gb (the plain forward keeps about a
    dozen feature-sized maps alive at its peak; the low-memory path is a little slower, ~1.2x for
    the lite model at 64^3 on 2 CPU threads, and runs the samples one by one)."""
    choice = cfg["adapt"]["low_memory_features"]
    if choice != "auto":
        return bool(choice)
    d = cfg["data"]
    samples = d["subjects_per_step"] * (max(1, d["mild"]) if d["source"] == "nifti" else d["mild"] + d["severe"])
    voxels = int(np.prod(size3(d["size"])))
    estimate_gb = 12 * voxels * model.arch.f_maps * 4 * samples / 1e9
    return estimate_gb > float(cfg["adapt"]["plain_forward_gb"])


def make_job(cfg: Config, dist: DistInfo) -> Job:
    ac = cfg["adapt"]
    model = load_backbone(cfg)
    fine_tune = not ac["freeze_backbone"]
    net = AdaptNet(model, ac["tasks"], fine_tune, use_low_memory(cfg, model))
    if not fine_tune:
        model.backbone.to(dist.device).eval()
    seed = int(cfg["run"]["seed"])
    if cfg["data"]["source"] == "nifti":
        data = NiftiSteps(cfg["data"], seed, dist.rank, dist.world_size, ac["corruption"],
                          (model.metadata or {}).get("input", {}).get("normalisation"))
    else:
        data = GeneratorSteps(cfg["data"], seed, dist.rank, dist.world_size)

    def train_mode(net: AdaptNet):
        net.train()
        if net.frozen_backbone() is not None:
            net.frozen_backbone().eval()

    def export(net: AdaptNet, run_dir: Path, step: int) -> dict:
        model.cpu()
        backbone_file = None
        try:
            from BrainIDLib.registry import resolve_weights

            backbone_file = Path(resolve_weights(cfg["model"]["init"]))
        except Exception:  # noqa: BLE001 - informative only
            pass
        outputs, entries = {}, []
        sha = sha256_of(backbone_file) if backbone_file else None
        head_source = provenance("head trained", cfg["model"]["init"], sha)
        if fine_tune:
            outputs["model"] = save_model(model, run_dir / "model.safetensors",
                                          {"name": cfg["run"]["name"], "description": f"Brain-ID fine-tuned for {', '.join(ac['tasks'])}",
                                           "source": provenance("fine-tuned", cfg["model"]["init"], sha)})
        for task in ac["tasks"]:
            info = {"out_channels": OUT_CHANNELS[task], "description": ac["description"] or DESCRIPTIONS[task]}
            if task == "segmentation":
                info["labels"] = list(SEGMENTATION_LABELS)
                info["label_names"] = [label_name(x) for x in SEGMENTATION_LABELS]
            model.metadata.setdefault("heads", {})[task] = info
            path = save_head(model, task, run_dir / f"{task}_head.safetensors", {
                "name": f"{cfg['run']['name']}-{task}", "description": info["description"],
                "source": head_source,
                "backbone": {"init": str(cfg["model"]["init"]), "sha256": sha, "fine_tuned": fine_tune},
                "training": {"command": "adapt", "steps": step, "data": cfg["data"]["source"],
                             "corruption": ac["corruption"]}})
            outputs[f"{task}_head"] = path
            entries.append({"name": f"{cfg['run']['name']}-{task}", "kind": "head", "task": task,
                            "file": path.name, "sha256": sha256_of(path), "size_bytes": path.stat().st_size,
                            "description": info["description"], "backbone": str(cfg["model"]["init"]),
                            "source": head_source,
                            **({"labels": info["labels"]} if task == "segmentation" else {})})
        entry_path = run_dir / "models_json_entries.json"
        atomic_write(entry_path, lambda tmp: Path(tmp).write_text(json.dumps(entries, indent=2)))
        outputs["models_json_entries"] = entry_path
        return outputs

    return Job(net=net, batches=lambda start: step_loader(data, start, int(cfg["run"]["max_steps"]), int(cfg["data"]["num_workers"])),
               loss=adapt_loss(cfg, dist), export=export, train_mode=train_mode,
               info={"tasks": list(ac["tasks"]), "fine_tune": fine_tune, "low_memory_features": net.low_memory, "architecture": model.arch.to_dict()})
