"""Per-sample contrast: a Gaussian mixture with one (mean, std) per generation class, looked up by
label; gamma; and optional CT-like / FLAIR-like class means and partial-volume blur of the means.

Intensities live on the official 25-225 scale until the final normalisation.
"""

from __future__ import annotations

import torch

from .filters import gaussian_blur
from .spatial import uniform
from .tables import KIND_CODES


def draw_gmm_params(rng: torch.Generator, n: int, n_classes: int, mean_range, std_range, bg_zero_prob: float,
                    mode: str = "gmm", kinds: torch.Tensor | None = None,
                    t1_prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n_classes) means and stds (CPU, float32). Class 0 is the background class.

    mode "gmm": means U(mean_range), stds U(std_range); background mean 0 with p=bg_zero_prob.
    mode "ct": CT-like: soft tissue compressed into a narrow band, CSF darker, bone-like extra-cerebral
    classes bright, background (air) 0.
    mode "flair": FLAIR-like: CSF dark, WM darker than GM, the rest random.
    mode "t1": T1-like from the table's T1 priors (SynthSeg's prior_means_t1 / prior_stds_t1: class
    mean ~ N(mu, sd), class std ~ N(mu, sd), >= 1); classes without a prior stay random.
    mode "t2": T2-like: CSF bright, GM above WM, the rest random.
    """
    means = mean_range[0] + (mean_range[1] - mean_range[0]) * torch.rand((n, n_classes), generator=rng)
    stds = std_range[0] + (std_range[1] - std_range[0]) * torch.rand((n, n_classes), generator=rng)
    bg = torch.rand(n, generator=rng) < bg_zero_prob
    if mode == "t1" and t1_prior is not None:
        pr = t1_prior[:n_classes]
        known = ~torch.isnan(pr[:, 0])
        k = int(known.sum())
        for i in range(n):
            z = torch.randn((2, k), generator=rng)
            means[i, known] = (pr[known, 0] + pr[known, 1] * z[0]).clamp(0, 255)
            stds[i, known] = (pr[known, 2] + pr[known, 3] * z[1]).clamp(1, 60)
    if kinds is not None and mode in ("ct", "flair", "t2"):
        k = kinds[:n_classes]
        csf, gm, wm = k == KIND_CODES["csf"], k == KIND_CODES["gm"], k == KIND_CODES["wm"]
        bone, extra = k == KIND_CODES["extra_dark"], k == KIND_CODES["extra"]
        for i in range(n):
            if mode == "ct":
                base = uniform(rng, 60, 110)          # soft brain tissue, compressed contrast
                spread = uniform(rng, 3, 12)
                m = means[i]
                m[gm] = base + spread + torch.rand(int(gm.sum()), generator=rng) * 4
                m[wm] = base - spread + torch.rand(int(wm.sum()), generator=rng) * 4
                m[csf] = uniform(rng, 25, 45)
                m[extra] = base + (torch.rand(int(extra.sum()), generator=rng) - 0.6) * 60
                m[bone] = uniform(rng, 190, 225)
                stds[i] = torch.clamp(stds[i] * 0.4, min=2.0)
                bg[i] = True
            elif mode == "t2":
                m = means[i]
                m[csf] = uniform(rng, 170, 225) + torch.rand(int(csf.sum()), generator=rng) * 10
                g = uniform(rng, 90, 140)
                m[gm] = g + torch.rand(int(gm.sum()), generator=rng) * 10
                m[wm] = g - uniform(rng, 20, 50) + torch.rand(int(wm.sum()), generator=rng) * 10
            else:
                m = means[i]
                m[csf] = uniform(rng, 25, 45)
                g = uniform(rng, 120, 200)
                m[gm] = g + torch.rand(int(gm.sum()), generator=rng) * 10
                m[wm] = g - uniform(rng, 20, 60) + torch.rand(int(wm.sum()), generator=rng) * 10
    means[bg, 0] = 0.0
    return means, stds


def gmm_image(cls_map: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, noise_gen: torch.Generator,
              pv_sigma: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, *size) image: mean[class] + std[class] * N(0,1); means optionally blurred (partial volume).
    `out`: an (n, *size) float32 buffer to write into."""
    n = means.shape[0]
    dev = cls_map.device
    flat = cls_map.reshape(-1)
    means = means.to(dev)
    stds = stds.to(dev)
    if out is None:
        out = torch.empty((n, *cls_map.shape), device=dev, dtype=torch.float32)
    torch.index_select(means, 1, flat, out=out.view(n, -1))
    if pv_sigma is not None and bool((pv_sigma > 0).any()):
        out.copy_(gaussian_blur(out, pv_sigma.to(torch.float32), truncate=2.0))
    noise = torch.randn((n, *cls_map.shape), generator=noise_gen, device=dev, dtype=torch.float32)
    noise.view(n, -1).mul_(stds.index_select(1, flat))
    return out.add_(noise)


def apply_gamma(x: torch.Tensor, log_gamma: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """x -> 300 * (x/300)^g, g = exp(log_gamma), per sample (x clamped at 0 first). In place.
    Computed as x^g * 300^(1-g): one pass fewer. rescale=False leaves out the 300^(1-g) factor
    (the caller accounts for it, see gamma_factor)."""
    g = torch.exp(log_gamma.to(torch.float64))
    shape = (-1, *([1] * (x.dim() - 1)))
    factor = torch.pow(300.0, 1.0 - g).to(x.device, torch.float32).view(shape)
    x = x.clamp_(min=0).pow_(g.to(x.device, torch.float32).view(shape))
    return x.mul_(factor) if rescale else x


def gamma_factor(log_gamma: torch.Tensor) -> torch.Tensor:
    """The 300^(1-g) factor of apply_gamma, per sample (float64, CPU)."""
    return torch.pow(300.0, 1.0 - torch.exp(log_gamma.to(torch.float64)))
