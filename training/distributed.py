"""torch.distributed set-up for runs launched by `torchrun` (or plain single-process runs).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 we join the process group (NCCL
on GPUs, gloo on CPUs), pin each rank to its local GPU, and let only rank 0 log and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from BrainIDLib.devices import select_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_pref: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # DDP imports torch._dynamo; imported after the group exists, it keeps references to the group
        # that outlive destroy_process_group, so gloo's threads survive into interpreter exit, where
        # they sometimes abort the finished process (SIGABRT). Imported first, teardown joins them.
        import torch._dynamo as _dynamo  # noqa: F401 - 'import torch._dynamo' would make torch local here

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_scalars(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (identity on one process)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.cpu().tolist()))


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank when the flag is set on at least one (so all ranks stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_rank_difference(info: DistInfo, module: torch.nn.Module) -> float:
    """Largest absolute difference between any rank's parameters and rank 0's (0.0: in sync)."""
    if not info.enabled:
        return 0.0
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()]).to(dev)
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())
