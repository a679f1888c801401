"""Brain-ID 3D U-Net and its 1x1x1 task heads.

Parameter names match the official release (`backbone.encoders.0.basic_module.SingleConv1...`)
so released weights load strictly. Two forward paths compute the same numbers: the plain one for
training (autograd), and a low-memory one for inference that never materialises the decoder's
channel concatenation and normalises in place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("anatomy", "segmentation", "super_resolution", "bias_field")
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
LAZY_CHUNK_CHANNELS = 32


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
    def forward_low_memory(self, x: torch.Tensor) -> torch.Tensor:
        """Same numbers as `forward(x)` with a much smaller peak: for inference only."""
        if x.shape[0] > 1:  # GroupNorm statistics are per sample
            return torch.cat([self.forward_low_memory(x[i : i + 1]) for i in range(x.shape[0])])
        x_in_ptr = x.data_ptr()
        # Channels-last lets oneDNN convolve without reordered copies (half the memory, faster);
        # the copy also means layers can normalise in place without touching the caller's tensor.
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if x.data_ptr() == x_in_ptr:
            x = x.clone(memory_format=torch.channels_last_3d)
        skips = []
        for encoder in self.encoders:
            if encoder.pooling is not None:
                x = F.max_pool3d(x, 2)
            x = _double_conv_low_memory(encoder.basic_module, [x])
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            x = _double_conv_low_memory(decoder.basic_module, [skips.pop(), _Upsampled(x)])
        return x


class _Upsampled:
    """A lazily nearest-upsampled tensor, materialised a few channels at a time."""

    def __init__(self, low_res: torch.Tensor):
        self.low_res = low_res
        self.size = None  # set to the skip's spatial size by the caller

    @property
    def channels(self) -> int:
        return self.low_res.shape[1]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        up = F.interpolate(self.low_res[:, start:stop], size=self.size, mode="nearest")
        return up.contiguous(memory_format=torch.channels_last_3d)


def _channel_count(part) -> int:
    return part.channels if isinstance(part, _Upsampled) else part.shape[1]


def _chunks(part, chunk_channels: int):
    """Yield (first_channel, tensor) pieces of a part, upsampling lazily where needed."""
    n = _channel_count(part)
    if not isinstance(part, _Upsampled):
        yield 0, part
        return
    for start in range(0, n, chunk_channels):
        yield start, part.chunk(start, min(n, start + chunk_channels))


def _double_conv_low_memory(module: DoubleConv, parts: list) -> torch.Tensor:
    x = _single_conv_low_memory(module.SingleConv1, parts)
    return _single_conv_low_memory(module.SingleConv2, [x])


def _single_conv_low_memory(layer: SingleConv, parts: list) -> torch.Tensor:
    """GroupNorm + conv over the channel concatenation of `parts` without building it.

    GroupNorm statistics are gathered per channel and pooled per group; each part is then
    normalised in place (plain tensors are consumed: the caller must not reuse them) and convolved
    with its slice of the weight, the partial results summed.
    """
    gn, conv = layer.groupnorm, layer.conv
    spatial = next(p for p in parts if not isinstance(p, _Upsampled)).shape[2:]
    for p in parts:
        if isinstance(p, _Upsampled):
            p.size = spatial
    # Lazy chunks small enough that upsampling one (plus its layout copy) stays well below the output.
    chunk_channels = max(1, min(parts[0].shape[1], LAZY_CHUNK_CHANNELS))

    # Per-channel mean and mean of squares, in float64 for a stable pooled variance.
    means, sq_means = [], []
    for p in parts:
        for _, t in _chunks(p, chunk_channels):
            flat = t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])  # a view in channels-last
            var, mean = torch.var_mean(flat.float(), dim=0, correction=0)
            means.append(mean.double())
            sq_means.append(var.double() + mean.double() ** 2)
    mean_c, sq_c = torch.cat(means), torch.cat(sq_means)
    groups = gn.num_groups
    per_group = mean_c.numel() // groups
    g_mean = mean_c.view(groups, per_group).mean(1)
    g_var = (sq_c.view(groups, per_group).mean(1) - g_mean**2).clamp_min(0)
    rstd = torch.rsqrt(g_var + gn.eps).repeat_interleave(per_group)
    g_mean = g_mean.repeat_interleave(per_group)
    scale = (gn.weight.double() * rstd).to(conv.weight.dtype)
    shift = (gn.bias.double() - g_mean * gn.weight.double() * rstd).to(conv.weight.dtype)

    out = None
    offset = 0
    for p in parts:
        for start, t in _chunks(p, chunk_channels):
            c0, c1 = offset + start, offset + start + t.shape[1]
            view = (1, -1) + (1,) * (t.dim() - 2)
            t.mul_(scale[c0:c1].view(view)).add_(shift[c0:c1].view(view))
            weight = conv.weight[:, c0:c1].contiguous(memory_format=torch.channels_last_3d)
            partial = F.conv3d(t, weight, padding=1)
            if not partial.is_contiguous(memory_format=torch.channels_last_3d):
                partial = partial.contiguous(memory_format=torch.channels_last_3d)  # 1-channel inputs
            del t
            if out is None:
                out = partial
            else:
                out.add_(partial)
                del partial
        offset += _channel_count(p)
        if not isinstance(p, _Upsampled):
            p.untyped_storage().resize_(0)  # the caller handed this tensor over; free it now
    return F.leaky_relu_(out, LEAKY_SLOPE)


class TaskHead(nn.Module):
    """One 1x1x1 conv; contrast-dependent tasks also see the input image."""

    def __init__(self, task: str, features: int, out_channels: int):
        super().__init__()
        if task not in HEAD_KEYS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder level (B, f_maps, *spatial): the official `get_feature(x)[-1]`."""
        if x.dim() != 5 or x.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected input of shape (B,{self.arch.in_channels},D,H,W), got {tuple(x.shape)}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(x)
        return self.backbone.forward_low_memory(x)

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
