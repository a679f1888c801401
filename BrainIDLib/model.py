"""Brain-ID 3D U-Net and its 1x1x1 task heads.

Parameter names match the official release (`backbone.encoders.0.basic_module.SingleConv1...`)
so released weights load strictly. Two forward paths compute the same numbers: the plain one for
training (autograd), and a low-memory one for inference that never materialises the decoder's
channel concatenation (the upsampled half is built one depth slab at a time), normalises in place,
and runs each convolution on depth slabs written into a preallocated output, or straight over its
input when the widths match. The full network on 160^3 peaks at ~2.5 GB instead of ~14.7 GB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import HEAD_TASKS

# Official state-dict names of each task's 1x1x1 conv (downstream files drop the `head.` prefix).
HEAD_KEYS = {
    "anatomy": "final_conv_image",
    "segmentation": "final_conv_seg",
    "super_resolution": "final_conv_image",
    "bias_field": "final_conv_bias_field_log",
}
# Heads that see the input image next to the features (features first, image last).
CONTRAST_DEPENDENT = frozenset({"super_resolution", "bias_field"})
LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Architecture:
    """Width and depth of the U-Net; the official model is f_maps=64, levels=5, num_groups=8."""

    f_maps: int = 64
    levels: int = 5
    num_groups: int = 8
    in_channels: int = 1

    def __post_init__(self):
        if self.f_maps < 2 or self.levels < 2 or self.num_groups < 1:
            raise ValueError(f"invalid architecture {self}")

    @property
    def widths(self) -> list[int]:
        return [self.f_maps * 2**i for i in range(self.levels)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        return cls(**{k: int(d[k]) for k in ("f_maps", "levels", "num_groups", "in_channels") if k in d})


def _groups(channels: int, num_groups: int) -> int:
    """Official rule (one group below `num_groups` channels); widths the official code cannot split
    evenly (e.g. 12 channels, 8 groups) use the largest common divisor instead of failing."""
    return 1 if channels < num_groups else math.gcd(channels, num_groups)


class SingleConv(nn.Sequential):
    """GroupNorm -> Conv3d(3x3x3, no bias) -> LeakyReLU, the official 'gcl' order."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int):
        groups = _groups(in_ch, num_groups)
        super().__init__()
        self.add_module("groupnorm", nn.GroupNorm(groups, in_ch))
        self.add_module("conv", nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False))
        self.add_module("LeakyReLU", nn.LeakyReLU(LEAKY_SLOPE, inplace=True))


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, num_groups: int):
        super().__init__()
        self.add_module("SingleConv1", SingleConv(in_ch, mid_ch, num_groups))
        self.add_module("SingleConv2", SingleConv(mid_ch, out_ch, num_groups))


class Encoder(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, num_groups: int, pool: bool):
        super().__init__()
        self.pooling = nn.MaxPool3d(2) if pool else None
        self.basic_module = DoubleConv(in_ch, mid_ch, out_ch, num_groups)

    def forward(self, x):
        if self.pooling is not None:
            x = self.pooling(x)
        return self.basic_module(x)


class Decoder(nn.Module):
    def __init__(self, skip_ch: int, up_ch: int, out_ch: int, num_groups: int):
        super().__init__()
        self.skip_channels = skip_ch
        self.basic_module = DoubleConv(skip_ch + up_ch, out_ch, out_ch, num_groups)

    def forward(self, skip, x):
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.basic_module(torch.cat([skip, x], dim=1))


class UNet3D(nn.Module):
    """The Brain-ID backbone: returns decoder outputs, the last one being the features."""

    def __init__(self, arch: Architecture = Architecture()):
        super().__init__()
        self.arch = arch
        w, g = arch.widths, arch.num_groups
        encoders = [Encoder(arch.in_channels, max(w[0] // 2, arch.in_channels), w[0], g, pool=False)]
        encoders += [Encoder(w[i - 1], w[i - 1], w[i], g, pool=True) for i in range(1, arch.levels)]
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(
            Decoder(w[i], w[i + 1], w[i], g) for i in reversed(range(arch.levels - 1))
        )

    def forward(self, x: torch.Tensor, all_levels: bool = False):
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()
        levels = []
        for decoder in self.decoders:
            x = decoder(skips.pop(), x)
            if all_levels:
                levels.append(x)
        return levels if all_levels else x

    @torch.no_grad()
    def forward_low_memory(self, x: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Same numbers as `forward(x)` with a much smaller peak: for inference only. `check()` is called
        between convolution slabs, so a cancel (an exception it raises) stops a long pass within a second."""
        if x.shape[0] > 1:  # GroupNorm statistics are per sample
            return torch.cat([self.forward_low_memory(x[i : i + 1], check) for i in range(x.shape[0])])
        x = x.clone()  # layers normalise in place: never touch the caller's tensor
        skips = []
        for encoder in self.encoders:
            if encoder.pooling is not None:
                x = F.max_pool3d(x, 2)
            x = _double_conv_low_memory(encoder.basic_module, [x], check)
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            x = _double_conv_low_memory(decoder.basic_module, [skips.pop(), _Upsampled(x)], check)
        return x


# Input elements per convolution slab of the low-memory path: convolutions run on depth slabs
# (with a one-voxel halo) written into a preallocated output, so no full-size temporaries exist.
SLAB_ELEMENTS = 1 << 25


class _Upsampled:
    """A lazily nearest-upsampled tensor, materialised one depth slab at a time."""

    def __init__(self, low_res: torch.Tensor):
        self.low_res = low_res
        self.index: list[torch.Tensor] | None = None

    @property
    def channels(self) -> int:
        return self.low_res.shape[1]

    def set_size(self, size) -> None:
        """Nearest-neighbour source index per output voxel, exactly as F.interpolate computes it."""
        self.index = []
        for n_in, n_out in zip(self.low_res.shape[2:], size):
            src = torch.arange(n_in, dtype=torch.float32).view(1, 1, -1)
            idx = F.interpolate(src, size=int(n_out), mode="nearest").view(-1).long()
            self.index.append(idx.to(self.low_res.device))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and mean of squares of the upsampled tensor (float64), from the low-res one."""
        counts = [torch.bincount(i, minlength=n).double() for i, n in zip(self.index, self.low_res.shape[2:])]
        if all(bool((c == c[0]).all()) for c in counts):  # every voxel repeated equally: plain stats
            return _plain_stats(self.low_res)
        w = counts[0].view(-1, 1, 1) * counts[1].view(1, -1, 1) * counts[2].view(1, 1, -1)
        total = w.sum()
        means, sqs = [], []
        for c0 in range(0, self.channels, 8):
            t = self.low_res[0, c0 : c0 + 8].double()
            means.append((t * w).sum((1, 2, 3)) / total)
            sqs.append((t * t * w).sum((1, 2, 3)) / total)
        return torch.cat(means), torch.cat(sqs)

    def normalise_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        view = (1, -1, 1, 1, 1)
        self.low_res.mul_(scale.view(view).to(self.low_res.dtype)).add_(shift.view(view).to(self.low_res.dtype))

    def slab(self, lo: int, hi: int) -> torch.Tensor:
        # gather the depth rows, then nearest-upsample in-plane (depth size unchanged: identity)
        rows = self.index[0][lo:hi].tolist()
        t = torch.stack([self.low_res[:, :, i] for i in rows], dim=2)  # faster than index_select
        return F.interpolate(t, size=(hi - lo, len(self.index[1]), len(self.index[2])), mode="nearest")


def _plain_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean of squares (float64) of a (1, C, ...) tensor."""
    c = t.shape[1]
    step = c if t.dtype == torch.float32 else max(1, c // 8)  # bound the float32 copy of half tensors
    means, sqs = [], []
    for c0 in range(0, c, step):
        flat = t[0, c0 : c0 + step].reshape(min(step, c - c0), -1)
        var, mean = torch.var_mean(flat.float(), dim=1, correction=0)
        means.append(mean.double())
        sqs.append(var.double() + mean.double() ** 2)
    return torch.cat(means), torch.cat(sqs)


def _double_conv_low_memory(module: DoubleConv, parts: list, check=None) -> torch.Tensor:
    x = _single_conv_low_memory(module.SingleConv1, parts, check)
    return _single_conv_low_memory(module.SingleConv2, [x], check)


def _single_conv_low_memory(layer: SingleConv, parts: list, check=None) -> torch.Tensor:
    """GroupNorm + conv + LeakyReLU over the channel concatenation of `parts` without building it.

    GroupNorm statistics are gathered per channel and pooled per group; each part is normalised in
    place (plain tensors are consumed: the caller must not reuse them), then the convolution runs
    on depth slabs of the concatenation, written into one preallocated output.
    """
    gn, conv = layer.groupnorm, layer.conv
    plain = [p for p in parts if not isinstance(p, _Upsampled)]
    spatial = tuple(plain[0].shape[2:])
    for p in parts:
        if isinstance(p, _Upsampled):
            p.set_size(spatial)

    # Per-channel mean and mean of squares, in float64 for a stable pooled variance.
    stats = [p.stats() if isinstance(p, _Upsampled) else _plain_stats(p) for p in parts]
    mean_c = torch.cat([m for m, _ in stats])
    sq_c = torch.cat([s for _, s in stats])
    groups = gn.num_groups
    per_group = mean_c.numel() // groups
    g_mean = mean_c.view(groups, per_group).mean(1)
    g_var = (sq_c.view(groups, per_group).mean(1) - g_mean**2).clamp_min(0)
    rstd = torch.rsqrt(g_var + gn.eps).repeat_interleave(per_group)
    g_mean = g_mean.repeat_interleave(per_group)
    scale = gn.weight.double() * rstd
    shift = gn.bias.double() - g_mean * gn.weight.double() * rstd

    offset = 0
    for p in parts:
        n = _channel_count(p)
        if isinstance(p, _Upsampled):
            p.normalise_(scale[offset : offset + n], shift[offset : offset + n])
        else:
            view = (1, -1, 1, 1, 1)
            p.mul_(scale[offset : offset + n].to(p.dtype).view(view)).add_(shift[offset : offset + n].to(p.dtype).view(view))
        offset += n

    # When the first part has as many channels as the output (and the same dtype), the output
    # overwrites it slab by slab; the one input row the next slab still needs is kept aside.
    target = parts[0] if not isinstance(parts[0], _Upsampled) and parts[0].shape[1] == conv.out_channels else None
    depth = spatial[0]
    plane = spatial[1] * spatial[2]
    slab = max(1, min(depth, SLAB_ELEMENTS // max(1, offset * plane)))
    out, halo = None, None
    for d0 in range(0, depth, slab):
        if check is not None:
            check()
        d1 = min(depth, d0 + slab)
        lo, hi = max(0, d0 - 1), min(depth, d1 + 1)
        pieces = []
        for p in parts:
            if isinstance(p, _Upsampled):
                pieces.append(p.slab(lo, hi))
            elif p is out and halo is not None:  # rows before d0 already hold outputs
                pieces.append(torch.cat([halo, p[:, :, d0:hi]], dim=2))
            else:
                pieces.append(p[:, :, lo:hi])
        if len(pieces) > 1:
            dtype = pieces[0].dtype
            xs = torch.cat([q.to(dtype) for q in pieces], dim=1)
        else:
            xs = pieces[0]
        del pieces
        if d0 == 0 or d1 == depth:
            xs = F.pad(xs, (0, 0, 0, 0, 1 if d0 == 0 else 0, 1 if d1 == depth else 0))
        r = F.leaky_relu_(F.conv3d(xs, conv.weight, padding=(0, 1, 1)), LEAKY_SLOPE)
        del xs
        if out is None:
            if target is not None and target.dtype == r.dtype:
                out = target
            else:
                out = torch.empty((1, r.shape[1]) + spatial, dtype=r.dtype, device=r.device)
        if out is target:
            halo = out[:, :, d1 - 1 : d1].clone()
        out[:, :, d0:d1] = r
        del r
    return out


def _channel_count(part) -> int:
    return part.channels if isinstance(part, _Upsampled) else part.shape[1]


class TaskHead(nn.Module):
    """One 1x1x1 conv; contrast-dependent tasks also see the input image."""

    def __init__(self, task: str, features: int, out_channels: int):
        super().__init__()
        if task not in HEAD_KEYS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(HEAD_TASKS)}")
        self.task = task
        self.key = HEAD_KEYS[task]
        in_ch = features + (1 if task in CONTRAST_DEPENDENT else 0)
        setattr(self, self.key, nn.Conv3d(in_ch, out_channels, 1))

    @property
    def conv(self) -> nn.Conv3d:
        return getattr(self, self.key)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if self.task in CONTRAST_DEPENDENT:
            if image is None:
                raise ValueError(f"the {self.task} head needs the input image")
            features = torch.cat([features, image.to(features.dtype)], dim=1)
        return self.conv(features)


class BrainIDModel(nn.Module):
    """Backbone plus any number of task heads, keyed by task name."""

    def __init__(self, arch: Architecture = Architecture(), heads: dict[str, int] | None = None):
        super().__init__()
        self.arch = arch
        self.backbone = UNet3D(arch)
        self.heads = nn.ModuleDict()
        for task, out_channels in (heads or {}).items():
            self.add_head(task, out_channels)
        self.metadata: dict = {}

    def add_head(self, task: str, out_channels: int) -> TaskHead:
        head = TaskHead(task, self.arch.f_maps, out_channels)
        head.to(next(self.backbone.parameters()).device)
        self.heads[task] = head
        return head

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def features(self, x: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Last decoder level (B, f_maps, *spatial): the official `get_feature(x)[-1]`. Under no-grad,
        `check()` runs between convolution slabs (see `UNet3D.forward_low_memory`)."""
        if x.dim() != 5 or x.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected input of shape (B,{self.arch.in_channels},D,H,W), got {tuple(x.shape)}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(x)
        return self.backbone.forward_low_memory(x, check)

    def apply_head(self, task: str, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if task not in self.heads:
            have = ", ".join(self.tasks) or "none"
            raise ValueError(f"this model has no {task!r} head (it has: {have})")
        return self.heads[task](features, image)

    def head_output(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Raw head output: image (anatomy, super_resolution), logits (segmentation), log-bias."""
        return self.apply_head(task, self.features(x), x)

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {t: self.apply_head(t, feats, x) for t in (tasks or self.tasks)}
