"""Brain-ID pretraining: generator -> U-Net -> anatomy loss (+ optional contrastive / segmentation)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from BrainIDLib.labels import SEGMENTATION_LABELS
from BrainIDLib.model import CONTRAST_DEPENDENT, Architecture, BrainIDModel
from BrainIDLib.normalize import MINMAX, ROBUST
from BrainIDLib.weights import save_model

from . import losses
from .config import Config
from .data import GeneratorSteps, generator_normalisation, seed_for, step_loader
from .distributed import DistInfo
from .engine import Job


class PretrainNet(nn.Module):
    """Backbone + heads in one forward (what DDP wraps): returns (features, {task: output})."""

    def __init__(self, model: BrainIDModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        feats = self.model.backbone(x)
        # contrast-dependent heads (super-resolution, bias field) learn on detached features: they
        # follow the backbone as frozen-feature heads would, without shaping it
        return feats, {t: self.model.apply_head(t, feats.detach() if t in CONTRAST_DEPENDENT else feats, x)
                       for t in self.model.tasks}


def build_model(cfg: Config) -> BrainIDModel:
    m = cfg["model"]
    if m["init"]:
        import BrainIDLib

        model = BrainIDLib.load_model(m["init"])
        if "anatomy" not in model.heads:
            model.add_head("anatomy", 1)
    else:
        arch = Architecture(f_maps=int(m["f_maps"]), levels=int(m["levels"]), num_groups=int(m["num_groups"]))
        model = BrainIDModel(arch, heads={"anatomy": 1})
    if cfg["loss"]["segmentation"] > 0 and "segmentation" not in model.heads:
        model.add_head("segmentation", len(SEGMENTATION_LABELS))
    for task in CONTRAST_DEPENDENT:
        if cfg["loss"][task] > 0 and task not in model.heads:
            model.add_head(task, 1)
    return model


def pretrain_loss(cfg: Config, dist: DistInfo):
    lc = cfg["loss"]
    seed = int(cfg["run"]["seed"])

    def loss_fn(module: nn.Module, batch: dict, step: int):
        device = dist.device
        inputs = batch["inputs"].to(device, non_blocking=True).float()
        subjects = int(batch["subjects"])
        per = inputs.shape[0] // subjects
        feats, outs = module(inputs)
        target = batch["target_t1"].to(device).float().repeat_interleave(per, dim=0)
        total, parts = losses.anatomy_loss(outs["anatomy"], target, lc["anatomy_l1"], lc["anatomy_grad"])
        if lc["segmentation"] > 0:
            seg = batch["segmentation"].to(device).repeat_interleave(per, dim=0)
            l_seg, p = losses.segmentation_loss(outs["segmentation"], seg, style=lc["segmentation_style"])
            total = total + lc["segmentation"] * l_seg
            parts.update(p)
        if lc["super_resolution"] > 0:
            l_sr, p = losses.image_loss(outs["super_resolution"], batch["clean"].to(device), lc["anatomy_l1"], lc["anatomy_grad"])
            total = total + lc["super_resolution"] * l_sr
            parts.update(p)
        if lc["bias_field"] > 0:
            brain = (batch["segmentation"] > 0).to(device)[:, None].repeat_interleave(per, dim=0)
            l_bf, p = losses.bias_field_loss(outs["bias_field"], batch["bias_field"].to(device), brain)
            total = total + lc["bias_field"] * l_bf
            parts.update(p)
        if lc["contrastive"] > 0:
            mask = (batch["segmentation"] > 0).to(device)
            gen = torch.Generator().manual_seed(seed_for(seed, step, dist.rank, 7) % 2**63)
            l_con, p = losses.contrastive_loss(feats, subjects, mask, int(lc["contrastive_voxels"]),
                                               float(lc["contrastive_temperature"]), gen)
            total = total + lc["contrastive"] * l_con
            parts.update(p)
        return total, parts

    return loss_fn


def make_job(cfg: Config, dist: DistInfo) -> Job:
    model = build_model(cfg)
    data = GeneratorSteps(cfg["data"], int(cfg["run"]["seed"]), dist.rank, dist.world_size)
    net = PretrainNet(model)

    def export(net: PretrainNet, run_dir: Path, step: int) -> dict:
        model = net.model
        model.metadata = {
            "name": cfg["run"]["name"],
            "description": f"Brain-ID backbone pretrained on synthetic data ({step} steps)",
            "heads": {t: {"out_channels": model.heads[t].out_channels,
                          **({"labels": list(SEGMENTATION_LABELS)} if t == "segmentation" else {})} for t in model.tasks},
            # what inference must do to a scan so that it looks like the training inputs
            "input": {"spacing_mm": [1.0, 1.0, 1.0],
                      "normalisation": ROBUST if generator_normalisation(cfg["data"]) == "robust" else MINMAX},
            "training": {"command": "pretrain", "steps": step, "size": cfg["data"]["size"],
                         "mild": cfg["data"]["mild"], "severe": cfg["data"]["severe"], "loss": cfg["loss"]},
        }
        return {"model": save_model(model.cpu(), run_dir / "model.safetensors")}

    return Job(net=net, batches=lambda start: step_loader(data, start, int(cfg["run"]["max_steps"]), int(cfg["data"]["num_workers"])),
               loss=pretrain_loss(cfg, dist), export=export,
               info={"architecture": model.arch.to_dict(), "label_maps": len(data.label_files)})
