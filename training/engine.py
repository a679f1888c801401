"""The training loop shared by pretraining and adaptation.

It owns everything that makes a run reproducible and safe: the run directory (resolved config and
versions in config.json, per-step losses in log.jsonl, TensorBoard events, a summary line per
interval), mixed precision, gradient clipping, the lr schedule, EMA of the weights, DDP, atomic
checkpoints every N steps and on SIGINT/SIGTERM, and `--resume`, which restores the module,
optimizer, scheduler, grad scaler, EMA, every RNG and the step (= data position, see data.py).
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

import BrainIDLib
from BrainIDLib.errors import BrainIDError

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .config import Config

CHECKPOINT_NAME = "checkpoints/last.pt"


@dataclass
class Job:
    """What a training command plugs into the loop.

    net: the trainable module (wrapped in DDP when distributed; its state is checkpointed).
    batches(start): iterator over the batches of steps start, start+1, ...
    loss(module, batch, step): (loss tensor, {name: float}); `module` is `net` or its DDP wrapper.
    export(net, run_dir, step): writes the run's products with the final (EMA if enabled) weights on
        rank 0 and returns {name: path} for the summary; `step` is the step reached (a time-boxed run
        stops before run.max_steps).
    """

    net: nn.Module
    batches: Callable[[int], Iterator]
    loss: Callable[[nn.Module, dict, int], tuple[torch.Tensor, dict]]
    export: Callable[[nn.Module, Path, int], dict]
    train_mode: Callable[[nn.Module], None] = field(default=lambda net: net.train())
    info: dict = field(default_factory=dict)


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (a second SIGINT aborts)."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class EMA:
    """Exponential moving average of a module's floating-point state (kept in float32)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints load on the CPU: each average goes back to the device its module lives on."""
        self.decay = state["decay"]
        self.shadow = {k: v.to(self.shadow[k].device if k in self.shadow else v.device, copy=True)
                       for k, v in state["shadow"].items()}


def lr_lambda(optim_cfg: dict, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warm-up, then multistep / cosine / constant, times a
    linear cooldown over the last optim.cooldown_steps (1 at its start, 1/N on the last step)."""
    warm = int(optim_cfg["warmup_steps"])
    cool = int(optim_cfg.get("cooldown_steps", 0))
    kind = optim_cfg["schedule"]
    gamma = float(optim_cfg["gamma"])
    milestones = sorted(int(round(m * max_steps)) if isinstance(m, float) and m < 1 else int(m) for m in optim_cfg["milestones"])

    def fn(step: int) -> float:
        f = 1.0
        if warm and step < warm:
            f = (step + 1) / warm
        if kind == "multistep":
            f *= gamma ** sum(step >= m for m in milestones)
        elif kind == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warm) / max(1, max_steps - warm))))
        if cool:
            f *= min(1.0, max(0, max_steps - step) / cool)
        return f

    return fn


def follow_config_lr(optimizer, scheduler, lr: float) -> None:
    """Make the config's optim.lr the base lr after a resume (a scheduler's state carries the base lr it
    was started with, so `--resume --set optim.lr=...` would otherwise be silently ignored); the lr of
    the next step follows the config's schedule at the checkpoint's step."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, f in zip(optimizer.param_groups, factors):
        group["initial_lr"], group["lr"] = lr, lr * f
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def versions() -> dict:
    return {"brainid": BrainIDLib.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "platform": platform.platform()}


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for run.amp on this device."""
    if device.type == "cpu" and amp == "bf16":  # CPUs with native bf16 (AVX512-BF16, AMX); see benchmarks/training.py
        return torch.bfloat16, False
    if device.type != "cuda" or amp == "off":
        if amp == "fp16" and device.type != "cuda":
            print(f"note: run.amp={amp} is for GPUs; training in float32 on {device.type}", file=sys.stderr)
        return None, False
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if amp == "bf16" else (torch.float16, True)


class RunLog:
    """log.jsonl (one record per step, rank 0), TensorBoard and the interval summary line."""

    def __init__(self, run_dir: Path, cfg: Config, active: bool, resume_step: int):
        self.active = active
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if not active:
            return
        if resume_step and self.path.exists():  # drop records written after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")
        if cfg["run"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                print("note: tensorboard is not installed; logging to log.jsonl only", file=sys.stderr)
        self.fh = self.path.open("a")

    def step(self, record: dict, tb_now: bool) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None and tb_now:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.active:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def write_config(run_dir: Path, cfg: Config, command: str, dist: distributed.DistInfo, info: dict) -> None:
    record = {"command": command, "config": cfg.plain(), "versions": versions(),
              "world_size": dist.world_size, "device": str(dist.device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **info}
    path = run_dir / "config.json"
    if path.exists():  # a resumed run: keep the history of launches
        old = json.loads(path.read_text())
        record["launches"] = old.get("launches", [{"started": old.get("started"), "versions": old.get("versions")}])
        record["launches"].append({"started": record["started"], "versions": record["versions"], "world_size": dist.world_size})
    from BrainIDLib.weights import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def train(cfg: Config, command: str, make_job: Callable[[Config, distributed.DistInfo], Job], resume: bool = False) -> dict:
    """Run (or resume) a training job to run.max_steps; returns the summary (also summary.json)."""
    run_cfg = cfg["run"]
    if run_cfg["threads"]:
        torch.set_num_threads(int(run_cfg["threads"]))
    if run_cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist = distributed.setup(run_cfg["device"])
    run_dir = Path(run_cfg["dir"]).expanduser()
    ckpt_path = run_dir / CHECKPOINT_NAME
    try:
        if not resume and ckpt_path.exists():
            raise BrainIDError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                               "or choose another run.dir")
        torch.manual_seed(int(run_cfg["seed"]) + dist.rank)
        job = make_job(cfg, dist)
        return _train(cfg, command, job, dist, run_dir, ckpt_path, resume)
    finally:
        distributed.teardown(dist)


def _train(cfg, command, job: Job, dist, run_dir: Path, ckpt_path: Path, resume: bool) -> dict:
    run_cfg, optim_cfg = cfg["run"], cfg["optim"]
    device, max_steps = dist.device, int(run_cfg["max_steps"])
    net = job.net.to(device)
    channels_last = bool(run_cfg["channels_last"])
    if channels_last:  # same numbers, ~0.67x the step time on a 2-core CPU (benchmarks/training.py)
        net = net.to(memory_format=torch.channels_last_3d)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise BrainIDError("nothing to train: every parameter is frozen")
    module = net
    if dist.enabled:
        module = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=float(optim_cfg["lr"]), weight_decay=float(optim_cfg["weight_decay"]),
                                  betas=tuple(optim_cfg["betas"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, max_steps))
    amp_dtype, use_scaler = amp_settings(run_cfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(net, float(optim_cfg["ema"])) if optim_cfg["ema"] > 0 else None

    step, elapsed_before = 0, 0.0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        follow_config_lr(optimizer, scheduler, float(optim_cfg["lr"]))
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
            ema.decay = float(optim_cfg["ema"])  # like the lr: --resume --set optim.ema=... takes effect
        rank_rng = ckpt_path.parent / f"rng_rank{dist.rank}.pt"
        if dist.rank and rank_rng.is_file() and ckpt.get("world_size", 1) == dist.world_size:
            set_rng_state(load_checkpoint(rank_rng)["rng"])  # this rank's own generators
        else:
            set_rng_state(ckpt["rng"])
        step, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        if ckpt.get("world_size", 1) != dist.world_size and dist.is_main:
            print(f"warning: checkpoint was written with {ckpt.get('world_size')} processes, resuming with "
                  f"{dist.world_size}: the data order changes", file=sys.stderr)
        if dist.is_main:
            print(f"resuming {run_dir} at step {step}/{max_steps}", file=sys.stderr)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg, command, dist, {"parameters": sum(p.numel() for p in params), **job.info})
    distributed.barrier(dist)
    log = RunLog(run_dir, cfg, dist.is_main, step)

    def checkpoint(reason: str):
        if dist.is_main:
            save_checkpoint(ckpt_path, {
                "step": step, "data_position": step * dist.world_size * int(cfg["data"]["subjects_per_step"]),
                "net": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else {},
                "world_size": dist.world_size, "elapsed_s": elapsed_before + (time.time() - t_start), "reason": reason})
        elif dist.enabled:  # other ranks keep their own random-generator states beside it
            save_checkpoint(ckpt_path.parent / f"rng_rank{dist.rank}.pt", {"step": step})
        distributed.barrier(dist)

    pbar = None
    if dist.is_main and run_cfg["progress"]:
        from tqdm import tqdm

        pbar = tqdm(total=max_steps, initial=step, desc=command, unit="step", dynamic_ncols=True, file=sys.stderr)
    t_start = time.time()
    interval: dict[str, list] = {}
    interrupted, budget_stop = None, None
    batches = job.batches(step)
    with StopRequest() as stop:
        while step < max_steps:
            t0 = time.time()
            batch = next(batches)
            if channels_last and batch["inputs"].dim() == 5:
                batch["inputs"] = batch["inputs"].to(memory_format=torch.channels_last_3d)
            job.train_mode(net)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, parts = job.loss(module, batch, step)
            if not torch.isfinite(loss):
                raise BrainIDError(f"loss became {float(loss)} at step {step}; lower optim.lr, enable optim.grad_clip, "
                                   f"or resume from the last checkpoint ({ckpt_path})")
            scaler.scale(loss).backward()
            grad_norm = None
            if optim_cfg["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(optim_cfg["grad_clip"])))
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(net)
            step += 1
            record = {"loss": float(loss.detach()), **parts}
            record = distributed.mean_scalars(dist, record)
            record.update({"step": step, "lr": lr, "step_time": time.time() - t0})
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            for k, v in record.items():
                interval.setdefault(k, []).append(v)
            log_now = step % int(run_cfg["log_every"]) == 0 or step == max_steps
            log.step(record, log_now)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{record['loss']:.4f}")
            if log_now and dist.is_main:
                means = {k: sum(v) / len(v) for k, v in interval.items() if k not in ("step", "lr")}
                line = f"[{command}] step {step}/{max_steps} " + " ".join(
                    f"{k}={v:.4g}" for k, v in means.items()) + f" lr={lr:.3g}"
                (pbar.write(line) if pbar is not None else print(line, file=sys.stderr))
                interval.clear()
            want_stop = stop.signal is not None or (step == int(run_cfg["stop_at_step"]) and step < max_steps)
            over_budget = run_cfg["max_minutes"] > 0 and time.time() - t_start >= 60 * float(run_cfg["max_minutes"])
            if step < max_steps and distributed.any_rank(dist, over_budget and not want_stop):
                budget_stop = step  # a time-boxed run (a lent GPU's minutes): checkpoint, then export below
                checkpoint("time budget")
                break
            if distributed.any_rank(dist, want_stop):
                interrupted = stop.signal or f"stop_at_step {step}"
                checkpoint("interrupted")
                break
            if step % int(run_cfg["checkpoint_every"]) == 0 or step == max_steps:
                checkpoint("periodic" if step < max_steps else "final")
    if pbar is not None:
        pbar.close()
    log.close()
    summary = {"command": command, "run_dir": str(run_dir), "step": step, "max_steps": max_steps,
               "interrupted": interrupted, "elapsed_s": elapsed_before + time.time() - t_start,
               "world_size": dist.world_size, "device": str(device)}
    if budget_stop is not None:
        summary["stopped_by_time_budget"] = True  # exported at this step; --resume continues the schedule
    if dist.enabled:
        summary["max_rank_difference"] = distributed.max_rank_difference(dist, net)
    if interrupted:
        if dist.is_main:
            print(f"stopped at step {step} ({interrupted}); checkpoint saved. Continue with: "
                  f"brainid-train {command} --resume {run_dir}", file=sys.stderr)
        distributed.barrier(dist)  # no rank tears the group down while another still writes
        return summary
    if ema is not None:
        ema.copy_to(net)
    if channels_last:  # exported files hold contiguous tensors
        net.to(memory_format=torch.contiguous_format)
    if dist.is_main:
        summary["outputs"] = {k: str(v) for k, v in job.export(net, run_dir, step).items()}
        summary["final_loss"] = _last_loss(run_dir)
        Path(run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(dist)
    return summary


def _last_loss(run_dir: Path) -> float | None:
    lines = [ln for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["loss"] if lines else None


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
