"""Where the low-memory forward keeps its whole-volume activations.

The forward (`UNet3D.forward_low_memory`) streams depth slabs through a compute device while the
activations stay in a storage: the compute device itself (whole mode), CPU RAM (a GPU computing with
its activations in pinned host memory), or files on disk (the CPU when RAM is short; the kernel's
page cache decides what stays in RAM). The numbers are the same in every case. Disk files are
unlinked as soon as they are mapped, so a cancel, an exception or a killed process leaves nothing
behind, and their blocks are freed with the tensor.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import torch

from .errors import BrainIDError

KINDS = ("device", "ram", "disk")


class Storage:
    """Allocates the forward's whole-volume tensors and moves their slabs to the compute device.

    kind: "device" (on `compute`), "ram" (CPU memory, pinned when `compute` is CUDA) or "disk"
    (memory-mapped files in `directory`, default the temp folder). slab_elements: the largest slab a
    convolution reads or writes at once (None: the model's default). memory_format: the layout of
    5-D tensors (None: channels-last on the CPU, contiguous elsewhere). Tracks live and peak bytes.
    """

    def __init__(self, compute: torch.device | str, kind: str = "device", slab_elements: int | None = None,
                 directory: str | os.PathLike | None = None, memory_format: torch.memory_format | None = None):
        if kind not in KINDS:
            raise ValueError(f"storage kind must be one of {KINDS}, not {kind!r}")
        self.compute = torch.device(compute)
        self.kind = kind
        self.slab_elements = slab_elements
        self.directory = str(directory or tempfile.gettempdir())
        self.pinned = kind == "ram" and self.compute.type == "cuda"
        # float32 5-D tensors are kept channels-last on the CPU: oneDNN's convolutions are as fast or
        # faster on (N, D, H, W, C) data, statistics and upsampling gathers are cheaper, and a depth slab
        # is one contiguous block (full network at 96^3: 0.93x the time). GPUs keep (N, C, D, H, W);
        # so do bfloat16 activations (`layout`).
        if memory_format is None:
            memory_format = torch.channels_last_3d if self.compute.type == "cpu" else torch.contiguous_format
        if memory_format not in (torch.channels_last_3d, torch.contiguous_format):
            raise ValueError("memory_format must be torch.channels_last_3d or torch.contiguous_format")
        self.memory_format = memory_format
        self.live_bytes = 0
        self.peak_bytes = 0

    @property
    def device(self) -> torch.device:
        return self.compute if self.kind == "device" else torch.device("cpu")

    def layout(self, dtype: torch.dtype) -> torch.memory_format:
        """The memory format of 5-D activations of `dtype`: bfloat16 convolutions ran faster on
        (N, C, D, H, W) here (full network at 96^3: 6.9 s against 7.7 s channels-last)."""
        return self.memory_format if dtype == torch.float32 else torch.contiguous_format

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised whole-volume tensor in this storage (5-D: in `layout(dtype)`)."""
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        last = len(shape) == 5 and self.layout(dtype) == torch.channels_last_3d
        if self.kind == "disk":
            t = _file_tensor(numel, dtype, self.directory)
            t = t.view(shape[:1] + shape[2:] + shape[1:2]).permute(0, 4, 1, 2, 3) if last else t.view(shape)
        else:
            t = torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pinned and _can_pin(),
                            memory_format=torch.channels_last_3d if last else torch.contiguous_format)
        return self.adopt(t)

    def output(self, shape) -> torch.Tensor:
        """The run's float32 result on the CPU: a file for disk storage, RAM otherwise."""
        if self.kind == "disk":
            return self.empty(shape, torch.float32)
        return torch.empty(tuple(shape), dtype=torch.float32)

    def load(self, t: torch.Tensor) -> torch.Tensor:
        """A slab of a stored tensor on the compute device (asynchronous from pinned memory)."""
        return t.to(self.compute, non_blocking=self.pinned)

    def adopt(self, t: torch.Tensor) -> torch.Tensor:
        """Count `t` (already in this storage) among the stored tensors until it is freed."""
        nbytes = t.numel() * t.element_size()
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(t, self._release, nbytes)
        return t

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def _can_pin() -> bool:
    return torch.cuda.is_available()


def _file_tensor(numel: int, dtype: torch.dtype, directory: str) -> torch.Tensor:
    """A 1-D tensor mapped (shared) onto a new file whose blocks are reserved up front, so a full disk
    is a clear error here rather than a crash when a page is first written."""
    nbytes = numel * dtype.itemsize
    try:
        fd, path = tempfile.mkstemp(prefix="brainid-", suffix=".activations", dir=directory)
    except OSError as e:
        raise BrainIDError(f"cannot create the tiled run's activation files in {directory} ({e.strerror}); "
                           "set TMPDIR to a writable folder on a local disk") from None
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(1, nbytes))
            else:
                os.ftruncate(fd, nbytes)
        except OSError:
            raise BrainIDError(f"not enough disk space in {directory} for the tiled run's activations "
                               f"({nbytes / 1e9:.1f} GB more needed); free some or set TMPDIR to a larger disk") from None
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        try:
            os.unlink(path)  # the mapping keeps the data; the name goes now
        except OSError:  # Windows cannot remove a mapped file: it stays until the temp folder is cleaned
            pass
