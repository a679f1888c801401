"""Training losses, term by term as the official code (peirong26/Brain-ID, BrainID/models/criterion.py
and losses.py) unless a docstring says otherwise: anatomy / super-resolution (L1 + `GradientLoss`),
segmentation (`loss_seg_ce` + `loss_seg_dice`), bias field, and a contrastive term that is NOT the
official one (see `contrastive_loss`). docs/recipe-vs-official.md lists every choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official `GradientLoss('l1')`: forward differences along each spatial axis, the last one
    along the axis set to 0, and the SUM over the three axes of the mean |d_pred - d_target| taken
    over the whole (padded) volume. (pred, target: (B, C, D, H, W); target broadcasts.)"""
    total = pred.new_zeros(())
    for d in (2, 3, 4):
        diff = (pred.diff(dim=d) - target.diff(dim=d)).abs()
        total = total + diff.sum() / (diff.numel() // diff.shape[d] * pred.shape[d])
    return total


def anatomy_loss(pred: torch.Tensor, target: torch.Tensor, w_l1: float = 1.0, w_grad: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Official 'feat-anat' loss (`loss_image` + `loss_image_grad`): L1 + gradient L1 of every sample
    against one shared target.

    pred (S, 1, *spatial), target (1, 1, *spatial) or (S, 1, *spatial); the mean over samples."""
    pred = pred.float()
    target = target.float().expand_as(pred)
    l1 = (pred - target).abs().mean()
    grad = gradient_l1(pred, target)
    return w_l1 * l1 + w_grad * grad, {"anat_l1": float(l1.detach()), "anat_grad": float(grad.detach())}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BrainID's own Dice: 1 - mean soft Dice over the classes present in the target (batch pooled)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(dims) > 0
    return 1 - (dice[present].mean() if present.any() else dice.mean())


def official_seg_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `loss_seg_ce` and `loss_seg_dice` with their default uniform class weights w = 1/K:
    CE = mean over voxels of -sum_k w_k y_k log(max(p_k, 1e-5)) (so 1/K of the usual cross-entropy);
    Dice = sum_k w_k (1 - 2 sum(p_k y_k) / max(sum(p_k + y_k), 1e-5)) over ALL K classes, per sample
    (absent classes add a constant 1 - 0), averaged over samples as `SetMultiCriterion` does."""
    k = logits.shape[1]
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(probs.dtype)
    ce = -(onehot * probs.clamp_min(1e-5).log()).sum(1).mean() / k
    dims = tuple(range(2, probs.dim()))
    dice = 1 - 2 * (probs * onehot).sum(dims) / (probs + onehot).sum(dims).clamp_min(1e-5)
    return ce, dice.mean(1).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, w_ce: float = 1.0, w_dice: float = 1.0,
                      style: str = "official") -> tuple[torch.Tensor, dict]:
    """Cross-entropy + soft Dice; logits (B, K, *spatial), target (B, *spatial) class indices.

    style "official": `official_seg_terms`. style "brainid": plain cross-entropy + Dice over the
    classes present (`soft_dice_loss`): its CE is K times stronger and absent classes add nothing,
    which learns small structures faster from few steps (brainid-lite part 1-2 used it)."""
    if style == "official":
        ce, dice = official_seg_terms(logits, target)
    elif style == "brainid":
        ce, dice = F.cross_entropy(logits.float(), target.long()), soft_dice_loss(logits, target)
    else:
        raise ValueError(f"unknown segmentation loss style {style!r}")
    return w_ce * ce + w_dice * dice, {"seg_ce": float(ce.detach()), "seg_dice": float(dice.detach())}


def bias_field_loss(pred_log: torch.Tensor, target_bias: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L2 between predicted and true log-bias inside the brain mask."""
    err = (pred_log.float() - torch.log(target_bias.float().clamp_min(1e-6))) ** 2
    if mask is not None:
        m = mask.to(err.dtype).expand_as(err)
        loss = (err * m).sum() / m.sum().clamp_min(1.0)
    else:
        loss = err.mean()
    return loss, {"bias_l2": float(loss.detach())}


def image_loss(pred: torch.Tensor, target: torch.Tensor, w_l1: float = 1.0, w_grad: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Super-resolution: L1 + gradient L1 against the image before synthetic degradation."""
    pred, target = pred.float(), target.float().expand_as(pred)
    l1 = (pred - target).abs().mean()
    grad = gradient_l1(pred, target)
    return w_l1 * l1 + w_grad * grad, {"sr_l1": float(l1.detach()), "sr_grad": float(grad.detach())}


def contrastive_loss(features: torch.Tensor, subjects: int, mask: torch.Tensor | None, n_voxels: int,
                     temperature: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """A voxel-wise supervised-contrastive (InfoNCE) term in the spirit of the paper's; NOT the
    official `loss_feat_contrastive` (which compares two samples' raw feature products with three
    temperatures, and is off by default there, as this term is here).

    `features` (subjects*S, C, *spatial): S samples per subject sharing one anatomy. At `n_voxels`
    random voxels (inside `mask`, a (subjects, *spatial) bool tensor, when given) the positives of an
    anchor are the other samples of its subject at the same voxel (intra-subject consistency); the
    negatives are every other voxel and every other subject's features at any of the chosen voxels
    (inter-subject distinctiveness)."""
    n, c = features.shape[:2]
    s = n // subjects
    flat = features.float().reshape(subjects, s, c, -1)
    nvox = flat.shape[-1]
    idx = []
    for b in range(subjects):
        cand = mask[b].reshape(-1).nonzero().squeeze(1) if mask is not None else None
        if cand is None or cand.numel() == 0:
            cand = torch.arange(nvox, device=features.device)
        pick = torch.randint(cand.numel(), (n_voxels,), generator=generator, device="cpu").to(cand.device)
        idx.append(cand[pick])
    z = torch.stack([flat[b][:, :, idx[b]] for b in range(subjects)])  # (B, S, C, K)
    z = F.normalize(z.permute(0, 1, 3, 2).reshape(-1, c), dim=1)  # rows ordered (b, s, k)
    logits = z @ z.t() / temperature
    ids = torch.arange(subjects * s * n_voxels, device=z.device)
    b_id, k_id = ids // (s * n_voxels), ids % n_voxels
    self_mask = torch.eye(len(ids), dtype=torch.bool, device=z.device)
    pos = (b_id[:, None] == b_id[None]) & (k_id[:, None] == k_id[None]) & ~self_mask
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1)).mean()
    return loss, {"contrastive": float(loss.detach())}
