"""Brain-ID 3D U-Net and its 1x1x1 task heads.

Parameter names match the official release (`backbone.encoders.0.basic_module.SingleConv1...`)
so released weights load strictly. Two forward paths compute the same numbers: the plain one for
training (autograd), and a low-memory one for inference that runs each GroupNorm + conv + LeakyReLU
on depth slabs (one-voxel halo) with whole-volume GroupNorm statistics (float64 per-channel moments
gathered as each output is written), never materialises the decoder's channel concatenation, and
writes into a preallocated output or over its input. Its whole-volume activations live in a
`Storage` (storage.py): on the compute device, or in CPU RAM / on disk while slabs visit the device,
which is how tiled inference stays exact.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .storage import Storage
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
    def forward_low_memory(self, x: torch.Tensor, check: Callable[[], None] | None = None,
                           storage: Storage | None = None) -> torch.Tensor:
        """Same numbers as `forward(x)` with a much smaller peak: for inference only. `check()` is called
        between convolution slabs, so a cancel (an exception it raises) stops a long pass within a second.
        `storage` holds the whole-volume activations (default: x's device); only slabs visit its compute
        device, so a CPU-RAM or disk storage bounds device memory by the slab size. Returns the features
        in that storage."""
        if x.shape[0] > 1:  # GroupNorm statistics are per sample
            return torch.cat([self.forward_low_memory(x[i : i + 1], check, storage) for i in range(x.shape[0])])
        storage = storage or Storage(x.device)
        check = check or (lambda: None)
        x = _Activation.store(x, storage)  # layers overwrite their inputs: never the caller's tensor
        skips = []
        for encoder in self.encoders:
            if encoder.pooling is not None:
                x = _max_pool(x, storage, check)
            parts = [x]
            del x
            x = _double_conv(encoder.basic_module, parts, storage, check)
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            parts = [skips.pop(), _Upsampled(x)]
            del x
            x = _double_conv(decoder.basic_module, parts, storage, check)
        return x.tensor


# Elements per convolution slab of the low-memory path (input or output, whichever is wider):
# convolutions run on depth slabs (with a one-voxel halo) written into a preallocated output, so no
# full-size temporaries exist. A storage may set its own (Storage.slab_elements).
SLAB_ELEMENTS = 1 << 25


def _slab_rows(storage: Storage, channels: int, plane: int, depth: int) -> int:
    limit = storage.slab_elements or SLAB_ELEMENTS
    return max(1, min(depth, limit // max(1, channels * plane)))


MOMENT_CHUNK = 1 << 22


class _Moments:
    """Per-channel sums of values and squares in float64, gathered slab by slab as outputs are written
    (whole-volume GroupNorm statistics without a second pass over the stored tensor). Channels-last
    slabs are summed as deviations from a per-channel `pilot` near the mean, so float32 sums of squares
    do not cancel."""

    def __init__(self):
        self.count, self.sum, self.sq, self.pilot = 0, None, None, None

    def add(self, t: torch.Tensor) -> None:
        """Adds a (1, C, D, H, W) slab in chunks of at most MOMENT_CHUNK values (bounded temporaries, and
        few calls: many small kernel calls are slow on a busy CPU): channel chunks of a contiguous slab,
        depth rows of a channels-last one."""
        channels, depth, plane = t.shape[1], t.shape[2], t.shape[3] * t.shape[4]
        if t.is_contiguous():
            step = max(1, MOMENT_CHUNK // (depth * plane))
            parts = [_channel_moments(t[:, c0 : c0 + step]) for c0 in range(0, channels, step)]
            s, q = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            if self.pilot is not None:  # the sums so far are of deviations: so must this slab's be
                s, q = _as_deviations(s, q, depth * plane, self.pilot)
        else:
            if self.pilot is None:  # the mean of a sparse sample of the first slab
                self.pilot = t[:, :, ::2, ::4, ::4].float().mean((0, 2, 3, 4))
                if self.count:  # earlier slabs (a convolution's layout can change from slab to slab) summed values
                    self.sum, self.sq = _as_deviations(self.sum, self.sq, self.count, self.pilot)
            step = max(1, MOMENT_CHUNK // (channels * plane))
            parts = [_channel_moments_last(t[:, :, d0 : d0 + step], self.pilot) for d0 in range(0, depth, step)]
            s, q = sum(p[0] for p in parts), sum(p[1] for p in parts)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.count += t[0, 0].numel()

    def mean_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean, sq = self.sum / self.count, self.sq / self.count
        if self.pilot is None:
            return mean, sq
        k = self.pilot.double()
        return k + mean, sq + k * (2 * mean + k)


def _as_deviations(s: torch.Tensor, q: torch.Tensor, n: int, pilot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of n values and of their squares (float64) -> sums of their deviations from `pilot` and of
    the deviations' squares."""
    k = pilot.double().to(s.device)
    return s - n * k, q - 2 * k * s + n * k * k


def _channel_moments(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of values and of squares (float64) of a (1, C, ...) chunk, from GroupNorm's own
    statistics kernel with one group per channel (~2.7x faster than var_mean)."""
    chunk = chunk.float()
    c, n = chunk.shape[1], chunk[0, 0].numel()
    _, mean, rstd = torch.native_group_norm(chunk, None, None, 1, c, n, c, 0.0)
    mean = mean.double().view(-1)
    return mean * n, (rstd.double().view(-1).pow(-2) + mean * mean) * n  # var = rstd^-2 (eps 0; constant: 0)


def _channel_moments_last(chunk: torch.Tensor, pilot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of deviations from `pilot` and of their squares (float64) of a channels-last
    chunk, from float32 sums over its (voxels, C) view (~3x faster than var_mean and as accurate, ~1e-7;
    GroupNorm's kernel on this layout sums row by row in float32 and is off by ~1e-3)."""
    d = chunk.float().permute(0, 2, 3, 4, 1).reshape(-1, chunk.shape[1]) - pilot
    return d.sum(0).double(), d.mul_(d).sum(0).double()


class _Activation:
    """A stored whole-volume tensor (1, C, D, H, W) and its per-channel moments."""

    def __init__(self, tensor: torch.Tensor, moments: _Moments):
        self.tensor, self.moments = tensor, moments

    @classmethod
    def store(cls, x: torch.Tensor, storage: Storage) -> "_Activation":
        t = storage.empty(x.shape, x.dtype)
        t.copy_(x)
        m = _Moments()
        m.add(storage.load(x))
        return cls(t, m)

    @property
    def channels(self) -> int:
        return self.tensor.shape[1]

    def mean_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moments.mean_sq()


class _Upsampled:
    """A lazily nearest-upsampled activation, materialised one depth slab at a time."""

    def __init__(self, low_res: _Activation):
        self.low_res = low_res
        self.index: list[torch.Tensor] | None = None
        self.doubled = False

    @property
    def channels(self) -> int:
        return self.low_res.channels

    def set_size(self, size) -> None:
        """Nearest-neighbour source index per output voxel, exactly as F.interpolate computes it."""
        self.index = []
        for n_in, n_out in zip(self.low_res.tensor.shape[2:], size):
            src = torch.arange(n_in, dtype=torch.float32).view(1, 1, -1)
            self.index.append(F.interpolate(src, size=int(n_out), mode="nearest").view(-1).long())
        self.doubled = all(torch.equal(i, torch.arange(i.numel()) // 2) for i in self.index[1:])

    def mean_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and mean of squares of the upsampled tensor (float64), from the low-res one."""
        low = self.low_res.tensor
        counts = [torch.bincount(i, minlength=n).double() for i, n in zip(self.index, low.shape[2:])]
        if all(bool((c == c[0]).all()) for c in counts):  # every voxel repeated equally: plain moments
            return self.low_res.mean_sq()
        w = (counts[0].view(-1, 1, 1) * counts[1].view(1, -1, 1) * counts[2].view(1, 1, -1)).to(low.device)
        total = w.sum()
        means, sqs = [], []
        for c0 in range(0, self.channels, 8):
            t = low[0, c0 : c0 + 8].double()
            means.append((t * w).sum((1, 2, 3)) / total)
            sqs.append((t * t * w).sum((1, 2, 3)) / total)
        device = self.low_res.moments.sum.device
        return torch.cat(means).to(device), torch.cat(sqs).to(device)

    def into(self, dest: torch.Tensor, lo: int, hi: int, storage: Storage) -> None:
        """Writes upsampled rows lo..hi into `dest` (1, C, hi - lo, H, W) on the compute device: the
        low-res rows they need are loaded and picked, then repeated in-plane straight into `dest` (a
        broadcast copy where each voxel doubles, as between U-Net levels: ~5x faster than a gather;
        otherwise one gather, ~3x faster than F.interpolate on the CPU)."""
        d = self.index[0][lo:hi]
        first = int(d[0])
        t = storage.load(self.low_res.tensor[:, :, first : int(d[-1]) + 1])
        pick = (d - first).to(t.device)
        if self.low_res.tensor.is_contiguous():  # (a depth slice of it is not)
            low = t.index_select(2, pick)
        else:  # channels-last: pick whole (voxel, C) rows
            low = t.permute(0, 2, 3, 4, 1).index_select(1, pick).permute(0, 4, 1, 2, 3)
        n, c, rows, h, w = low.shape
        if dest.shape[3:] == (2 * h, 2 * w) and self.doubled:
            dest.view(n, c, rows, h, 2, w, 2).copy_(low[:, :, :, :, None, :, None].expand(n, c, rows, h, 2, w, 2))
        else:
            j, k = (v.to(t.device) for v in self.index[1:])
            dest.copy_(low[:, :, :, j[:, None], k[None, :]])


def _max_pool(x: _Activation, storage: Storage, check: Callable[[], None]) -> _Activation:
    """2x2x2 max pooling (slab by slab unless the storage is the device) into the storage, with the
    pooled tensor's moments."""
    t = x.tensor
    moments = _Moments()
    if storage.kind == "device":  # the pooled tensor is 1/8 of the input, which is whole on the device anyway
        p = F.max_pool3d(t, 2)
        moments.add(p)
        return _Activation(storage.adopt(p), moments)
    depth, plane = t.shape[2], t.shape[3] * t.shape[4]
    rows = max(2, _slab_rows(storage, t.shape[1], plane, depth) // 2 * 2)
    out = storage.empty(tuple(t.shape[:2]) + tuple(s // 2 for s in t.shape[2:]), t.dtype)
    for d0 in range(0, depth - 1, rows):
        check()
        p = F.max_pool3d(storage.load(t[:, :, d0 : d0 + rows]), 2)
        moments.add(p)
        out[:, :, d0 // 2 : d0 // 2 + p.shape[2]].copy_(p)
    return _Activation(out, moments)


def _double_conv(module: DoubleConv, parts: list, storage: Storage, check) -> _Activation:
    """Both layers of a DoubleConv; consumes `parts` (the list is emptied: its tensors may be overwritten)."""
    x = _single_conv(module.SingleConv1, parts, storage, check)
    parts.clear()
    return _single_conv(module.SingleConv2, [x], storage, check)


def _norm_affine(gn: nn.GroupNorm, parts: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 scale and shift equal to GroupNorm over the concatenation of `parts`, from
    their float64 per-channel moments pooled per group."""
    stats = [p.mean_sq() for p in parts]
    mean_c = torch.cat([m.to(device) for m, _ in stats])
    sq_c = torch.cat([s.to(device) for _, s in stats])
    groups = gn.num_groups
    per_group = mean_c.numel() // groups
    g_mean = mean_c.view(groups, per_group).mean(1)
    g_var = (sq_c.view(groups, per_group).mean(1) - g_mean**2).clamp_min(0)
    rstd = torch.rsqrt(g_var + gn.eps).repeat_interleave(per_group)
    g_mean = g_mean.repeat_interleave(per_group)
    weight, bias = gn.weight.to(device).double(), gn.bias.to(device).double()
    scale = weight * rstd
    return scale, bias - g_mean * scale


@functools.cache
def _conv_bias_bf16():
    """oneDNN's convolution that takes bfloat16 data with a float32 bias (F.conv3d wants one dtype), or
    None where this torch lacks it or this CPU cannot run it: oneDNN's bfloat16 path needs AVX-512
    (BW, VL, DQ) or AVX-NE-CONVERT (e.g. an AMD EPYC without AVX-512 lacks both). Without it bfloat16
    still runs, unfolded, through autocast's convolution (slower there than float32)."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None:
        return None
    one = torch.ones(1, 1, 1, 1, 1, dtype=torch.bfloat16)
    try:
        op(one, one, torch.zeros(1), [0, 0, 0], [1, 1, 1], [1, 1, 1], 1, "none", [], "")
    except RuntimeError:  # "mkldnn_convolution: bf16 path needs the cpu support ..."
        return None
    return op


class _NormalisedConv:
    """GroupNorm (as `scale`, `shift`) then the 3x3x3 convolution, on (1, C, rows, H, W) input slabs.

    Slabs are normalised before the convolution, except for bfloat16 activations on the CPU: normalising
    bfloat16 data with float32 statistics took a fifth of the forward there, so the affine is folded into the
    convolution instead and no normalised copy is written: conv(x * scale + shift) = conv(x, W * scale)
    + conv(shift). The second term is one value per output channel except on the volume's faces, edges
    and corners, where the zero padding cuts the kernel off: the value goes in as a float32 bias inside
    oneDNN's float32 accumulation (outputs are rounded to bfloat16 once, after the raw inputs' offsets
    cancel), and the border voxels get their difference added afterwards. (float32 gained nothing from
    folding; CUDA's float16 autocast would round the bias.)
    """

    def __init__(self, layer: SingleConv, parts: list, spatial: tuple, storage: Storage):
        compute = storage.compute
        scale, shift = _norm_affine(layer.groupnorm, parts, compute)
        stored = parts[0].tensor.dtype
        # (a float32 input, the scan, is normalised before it is rounded: raw intensities far from 0
        # relative to their spread would lose their detail to bfloat16)
        bf16 = (compute.type == "cpu" and stored == torch.bfloat16 and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        self.bf16_conv = _conv_bias_bf16() if bf16 else None
        fold = self.bf16_conv is not None
        self.dtype = stored  # (folding needs bfloat16 activations, so it keeps their dtype)
        weight = layer.conv.weight.detach()
        if not fold:  # `affine` set: slabs are normalised before the convolution
            self.affine = scale.float(), shift.float()
            self.weight = weight.contiguous(memory_format=storage.layout(stored))
            return
        self.affine = None
        scale, shift = scale.float(), shift.float()
        folded = (weight.to(compute) * scale.view(1, -1, 1, 1, 1)).to(self.dtype)
        self.weight = folded.contiguous(memory_format=storage.layout(self.dtype))
        # conv(shift) per kernel tap, through the rounded folded weights (unscaled: shift / scale), so
        # that the raw inputs' offsets cancel as the rounded weights see them; a channel with scale 0
        # has folded weights 0 and its shift goes through its own weights.
        kept = scale != 0
        out_ch, in_ch = folded.shape[:2]
        taps = torch.matmul(torch.where(kept, shift / scale, 0.0), folded.float().view(out_ch, in_ch, 27))
        if not bool(kept.all()):
            taps += torch.matmul(shift[~kept], weight.to(compute, torch.float32)[:, ~kept].reshape(out_ch, -1, 27))
        # ... summed over the taps that fall inside the volume, for the first, middle and last voxel
        # classes along each axis
        places = [min(n, 3) for n in spatial]
        inside = [_taps_inside(n).to(compute) for n in spatial]
        shifted = torch.einsum("oijk,ai,bj,ck->oabc", taps.double().view(out_ch, 3, 3, 3), *inside)
        centre = tuple(min(1, k - 1) for k in places)
        interior = shifted[(slice(None),) + centre]
        self.bias = interior.float()
        self.borders = [(place, (shifted[(slice(None),) + place] - interior).float().view(1, -1, 1, 1, 1))
                        for place in itertools.product(*(range(k) for k in places)) if place != centre]
        self.spatial = spatial

    def __call__(self, xs: torch.Tensor, d0: int, depth_padding: int = 0) -> torch.Tensor:
        """Output rows d0.. of the convolution of input slab `xs` (its depth halo included, or padded)."""
        padding = (depth_padding, 1, 1)
        if self.affine is not None:
            return F.conv3d(xs, self.weight, padding=padding)
        r = self.bf16_conv(xs, self.weight, self.bias, list(padding), [1, 1, 1], [1, 1, 1], 1, "none", [], "")
        d1 = d0 + r.shape[2]
        for place, delta in self.borders:
            (lo, hi), rows, cols = (_span(k, n) for k, n in zip(place, self.spatial))
            lo, hi = max(lo, d0), min(hi, d1)
            if lo < hi:
                r[:, :, lo - d0 : hi - d0, slice(*rows), slice(*cols)] += delta
        return r


def _taps_inside(size: int) -> torch.Tensor:
    """(classes, 3) float64: which of a 3-tap kernel's offsets (-1, 0, +1) fall inside an axis of `size`
    voxels, for its first, middle and last voxel classes (`_span`)."""
    first = [_span(c, size)[0] for c in range(min(size, 3))]
    return torch.tensor([[float(0 <= i + t - 1 < size) for t in range(3)] for i in first], dtype=torch.float64)


def _span(place: int, size: int) -> tuple[int, int]:
    """Voxel range of the first (0), middle (1) or last position class along an axis of `size` voxels."""
    last = min(size, 3) - 1
    if place == 0:
        return 0, 1
    return (size - 1, size) if place == last else (1, size - 1)


def _single_conv(layer: SingleConv, parts: list, storage: Storage, check) -> _Activation:
    """GroupNorm + conv + LeakyReLU over the channel concatenation of `parts` without building it.

    Each depth slab (plus a one-voxel halo) is gathered from the storage onto the compute device,
    convolved (`_NormalisedConv`) and written into one preallocated output, whose moments accumulate as
    it is written. A single part read whole needs no gathering. When the first part has as many channels
    as the output, the output overwrites it slab by slab; the one input row the next slab still needs is
    kept aside.
    """
    spatial = tuple(parts[0].tensor.shape[2:])
    for p in parts:
        if isinstance(p, _Upsampled):
            p.set_size(spatial)
    conv = _NormalisedConv(layer, parts, spatial, storage)
    channels = sum(p.channels for p in parts)
    out_channels = layer.conv.out_channels
    first = parts[0].tensor
    target = first if first.shape[1] == out_channels else None
    depth, plane = spatial[0], spatial[1] * spatial[2]
    slab = _slab_rows(storage, max(channels, out_channels), plane, depth)
    direct = conv.affine is None and slab == depth and len(parts) == 1 and first.dtype == conv.dtype
    out, halo, moments = None, None, _Moments()
    for d0 in range(0, depth, slab):
        check()
        d1 = min(depth, d0 + slab)
        if direct:
            r = conv(storage.load(first), 0, depth_padding=1)
        else:
            xs = _input_slab(parts, d0, d1, conv, storage, halo if out is target else None)
            r = conv(xs, d0)
            del xs
        r = F.leaky_relu_(r, LEAKY_SLOPE)
        moments.add(r)
        if d1 - d0 == depth and storage.kind == "device":  # one slab: the convolution's output is the result
            # (in the storage's layout: a bfloat16 output of the float32, channels-last input layer is
            # channels-last too, and would make every later bfloat16 layer convert)
            out = storage.adopt(r.contiguous(memory_format=storage.layout(r.dtype)))
            break
        if out is None:
            out = target if target is not None and target.dtype == r.dtype else storage.empty((1, r.shape[1]) + spatial, r.dtype)
        if out is target:
            halo = out[:, :, d1 - 1 : d1].clone()
        out[:, :, d0:d1].copy_(r)
        del r
    return _Activation(out, moments)


def _input_slab(parts: list, d0: int, d1: int, conv: _NormalisedConv, storage: Storage, halo) -> torch.Tensor:
    """Rows d0-1..d1+1 of the parts' concatenation on the compute device in the convolution's dtype
    (normalised unless the convolution folds the normalisation in), zero rows past the volume's ends
    (the convolution's depth padding). `halo` replaces row d0-1 of the first part when that part is
    being overwritten by the output."""
    depth = parts[0].tensor.shape[2]
    lo, hi = max(0, d0 - 1), min(depth, d1 + 1)
    pad_lo, pad_hi = int(d0 == 0), int(d1 == depth)
    rows = hi - lo
    shape = tuple(parts[0].tensor.shape[3:])
    channels = sum(p.channels for p in parts)
    xs = torch.empty((1, channels, pad_lo + rows + pad_hi) + shape, dtype=conv.dtype, device=storage.compute,
                     memory_format=storage.layout(conv.dtype))
    if pad_lo:
        xs[:, :, 0].zero_()
    if pad_hi:
        xs[:, :, -1].zero_()
    c = 0
    for i, p in enumerate(parts):
        n = p.channels
        dest = xs[:, c : c + n, pad_lo : pad_lo + rows]
        if isinstance(p, _Upsampled):
            p.into(dest, lo, hi, storage)
            sources = [(dest, dest)]
        elif i == 0 and halo is not None and lo < d0:  # row d0-1 already holds outputs
            sources = [(storage.load(halo), dest[:, :, :1]), (storage.load(p.tensor[:, :, d0:hi]), dest[:, :, 1:])]
        else:
            sources = [(storage.load(p.tensor[:, :, lo:hi]), dest)]
        for src, to in sources:
            if conv.affine is not None:
                scale, shift = conv.affine
                torch.addcmul(shift[c : c + n].view(1, -1, 1, 1, 1), src, scale[c : c + n].view(1, -1, 1, 1, 1), out=to)
            elif src is not to:
                to.copy_(src)
        c += n
    return xs


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

    def features(self, x: torch.Tensor, check: Callable[[], None] | None = None,
                 storage: Storage | None = None) -> torch.Tensor:
        """Last decoder level (B, f_maps, *spatial): the official `get_feature(x)[-1]`. Under no-grad,
        `check()` runs between convolution slabs and `storage` says where activations live (see
        `UNet3D.forward_low_memory`)."""
        if x.dim() != 5 or x.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected input of shape (B,{self.arch.in_channels},D,H,W), got {tuple(x.shape)}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(x)
        return self.backbone.forward_low_memory(x, check, storage)

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


def activation_peak_bytes(arch: Architecture, shape, value_bytes: int) -> int:
    """Peak bytes of the whole-volume activations `forward_low_memory` keeps in its storage at once,
    walking the network in the order it allocates and frees them (the input is stored in float32)."""
    w = arch.widths
    first = max(w[0] // 2, arch.in_channels)
    voxels = [math.prod(s // 2**i for s in shape) for i in range(arch.levels)]
    peaks = [4 * arch.in_channels * voxels[0] + value_bytes * first * voxels[0],  # encoder 0, first layer
             value_bytes * (first + w[0]) * voxels[0]]
    skips = value_bytes * w[0] * voxels[0]
    for i in range(1, arch.levels):  # pooled input (overwritten by the first layer) + output, above the skips
        peaks.append(skips + value_bytes * (w[i - 1] + w[i]) * voxels[i])
        skips += value_bytes * w[i] * voxels[i] if i < arch.levels - 1 else 0
    for i in reversed(range(arch.levels - 1)):  # skip (overwritten) + the lower level's output
        skips -= value_bytes * w[i] * voxels[i]
        peaks.append(skips + value_bytes * (w[i] * voxels[i] + w[i + 1] * voxels[i + 1]))
    return max(peaks)


def widest_slab_row(arch: Architecture, shape) -> int:
    """Elements of one depth row of the widest convolution input or output: the smallest slab."""
    w, plane = arch.widths, shape[1] * shape[2]
    return max((w[i] + (w[i + 1] if i + 1 < arch.levels else 0)) * (plane // 4**i) for i in range(arch.levels))
