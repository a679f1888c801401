"""Training losses: Brain-ID's anatomy loss, the voxel-wise contrastive term, segmentation and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_differences(x: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of (B, C, D, H, W) along the three spatial axes."""
    return [x.diff(dim=d) for d in (2, 3, 4)]


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the three axes of L1 between forward-difference gradients (target broadcasts)."""
    terms = [(gp - gt).abs().mean() for gp, gt in zip(forward_differences(pred), forward_differences(target))]
    return sum(terms) / len(terms)


def anatomy_loss(pred: torch.Tensor, target: torch.Tensor, w_l1: float = 1.0, w_grad: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Official 'feat-anat' loss: L1 + gradient L1 of every sample against one shared target.

    pred (S, 1, *spatial), target (1, 1, *spatial) or (S, 1, *spatial); the mean over samples."""
    pred = pred.float()
    target = target.float().expand_as(pred)
    l1 = (pred - target).abs().mean()
    grad = gradient_l1(pred, target)
    return w_l1 * l1 + w_grad * grad, {"anat_l1": float(l1.detach()), "anat_grad": float(grad.detach())}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the target or predicted (target: class indices)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(dims) > 0
    return 1 - (dice[present].mean() if present.any() else dice.mean())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, w_ce: float = 1.0, w_dice: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy + soft Dice; logits (B, K, *spatial), target (B, *spatial) class indices."""
    ce = F.cross_entropy(logits.float(), target.long())
    dice = soft_dice_loss(logits, target)
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
    """Voxel-wise supervised-contrastive (InfoNCE) term of the Brain-ID paper.

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
