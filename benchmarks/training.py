"""Training speed: optimizer steps per second of pretraining and head adaptation.

CPU (2 threads): the lite config (pretrain_lite_cpu) — generator draw time and model step time
(forward + backward + AdamW) measured separately; float32 vs bf16 autocast, with and without
channels-last memory format, on the same batches (time and loss-curve agreement); plus a frozen-backbone adaptation step with the
low-memory feature path against the plain no_grad forward (the baseline). GPU (when present): the
official config (128^3, 2 mild + 2 severe, f_maps 64) in float32 and with bf16 autocast, with
peak memory.

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/training.py --labels /data/labelmaps
Without --labels a 96^3 phantom label map is used (numbers then reflect a small head).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import load_config  # noqa: E402
from training.distributed import DistInfo  # noqa: E402


def phantom_dir() -> Path:
    import nibabel as nib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "Python"))
    from test_training import phantom

    d = Path(tempfile.mkdtemp(prefix="brainid-bench-"))
    nib.save(nib.Nifti1Image(phantom((96, 112, 96)), np.eye(4)), str(d / "phantom.nii.gz"))
    return d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pretrain(cfg, device, steps: int, amp_dtype=None) -> dict:
    from training.pretrain import make_job

    job = make_job(cfg, DistInfo(device=device))
    net = job.net.to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    data_times, step_times = [], []
    batches = job.batches(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # step 0 is warm-up
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = job.loss(net, batch, i)
        loss.backward()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if i:
            data_times.append(t1 - t0)
            step_times.append(t2 - t1)
    out = {"data_s": float(np.median(data_times)), "model_step_s": float(np.median(step_times))}
    out["steps_per_s_model"] = 1 / out["model_step_s"]
    out["steps_per_s_serial"] = 1 / (out["model_step_s"] + out["data_s"])
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


CPU_VARIANTS = {"fp32": (None, False), "fp32_channels_last": (None, True),
                "bf16_autocast": (torch.bfloat16, False), "bf16_autocast_channels_last": (torch.bfloat16, True)}


def cpu_precision_ab(cfg, steps: int, compiled: bool = False, only=None) -> dict:
    """Lite pretraining steps in float32 vs bf16 autocast, each with and without channels-last 3D,
    from the same initial weights on the same batches, one step of each variant in turn (so machine
    load hits them alike): median step time, ratio to float32, and how far each loss curve strays
    from the float32 one. `compiled` adds float32 channels-last under torch.compile (inductor); its
    compilation (minutes per crop shape) falls in the warm-up step and the first step of each shape.
    `only`: the variants to run besides the float32 baseline (bf16 is slow where it is emulated)."""
    import copy

    from training.pretrain import make_job

    job = make_job(cfg, DistInfo(device=torch.device("cpu")))
    batches = job.batches(0)
    batch_list = [next(batches) for _ in range(steps + 1)]
    variants = dict(CPU_VARIANTS, **({"fp32_channels_last_compiled": (None, True)} if compiled else {}))
    variants = {k: v for k, v in variants.items() if k == "fp32" or not only or k in only}
    runs = {}
    for name, (dtype, channels_last) in variants.items():
        net = copy.deepcopy(job.net).train()
        if channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        runs[name] = {"net": torch.compile(net) if name.endswith("_compiled") else net,
                      "opt": torch.optim.AdamW(net.parameters(), lr=1e-3), "times": [], "losses": [], "shapes": set()}
    for i, batch in enumerate(batch_list):
        shape = tuple(batch["inputs"].shape)
        for name, (dtype, channels_last) in variants.items():
            r = runs[name]
            b = dict(batch, inputs=batch["inputs"].to(memory_format=torch.channels_last_3d)) if channels_last else batch
            t0 = time.perf_counter()
            r["opt"].zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss, _ = job.loss(r["net"], b, i)
            loss.backward()
            r["opt"].step()
            if i and shape in r["shapes"]:  # the first step of each crop shape is warm-up (or compilation)
                r["times"].append(time.perf_counter() - t0)
            r["shapes"].add(shape)
            r["losses"].append(float(loss))
    base = float(np.median(runs["fp32"]["times"]))
    ref = np.array(runs["fp32"]["losses"])
    out = {}
    for name, r in runs.items():
        t = float(np.median(r["times"]))
        out[name] = {"model_step_s": round(t, 3), "time_vs_fp32": round(t / base, 3),
                     "loss_curve_max_rel_diff_vs_fp32": round(float(np.max(np.abs(np.array(r["losses"]) - ref) / ref)), 4)}
    return out


def time_adapt(cfg, device, steps: int, low_memory: bool) -> dict:
    from BrainIDLib.model import Architecture, BrainIDModel
    from BrainIDLib.weights import save_model
    from training.adapt import make_job

    tmp = Path(tempfile.mkdtemp(prefix="brainid-bench-"))
    arch = Architecture(cfg["model"]["f_maps"], cfg["model"]["levels"], cfg["model"]["num_groups"])
    init = save_model(BrainIDModel(arch, heads={"anatomy": 1}), tmp / "init.safetensors")
    cfg = load_config(None, [f"model.init={init}", f"adapt.low_memory_features={str(low_memory).lower()}"], base=cfg)
    job = make_job(cfg, DistInfo(device=device))
    net = job.net.to(device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    batches = job.batches(0)
    batch_list = [next(batches) for _ in range(steps + 1)]
    times = []
    for i, batch in enumerate(batch_list):
        t0 = time.perf_counter()
        job.train_mode(net)
        opt.zero_grad(set_to_none=True)
        loss, _ = job.loss(net, batch, i)
        loss.backward()
        opt.step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"model_step_s": float(np.median(times)), "steps_per_s_model": 1 / float(np.median(times))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", help="folder/glob of label maps (default: a phantom)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (adds minutes of compilation)")
    ap.add_argument("--variants", nargs="+", metavar="NAME", help="CPU step variants besides fp32 (default: all): "
                    + ", ".join([*CPU_VARIANTS, "fp32_channels_last_compiled"]))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = args.labels or str(phantom_dir())
    results = {"torch": torch.__version__, "threads": args.threads, "labels": labels}

    cpu = torch.device("cpu")
    lite = load_config("pretrain_lite_cpu", [f"data.labels={labels}", "data.num_workers=0"])
    results["cpu_pretrain_lite"] = time_pretrain(lite, cpu, args.steps)
    print("cpu pretrain (lite, %s^3, %d+%d samples):" % (lite.data.size[0], lite.data.mild, lite.data.severe),
          json.dumps(results["cpu_pretrain_lite"]), flush=True)
    results["cpu_precision_lite"] = ab = cpu_precision_ab(lite, args.steps, args.compile, args.variants)
    print("cpu pretrain (lite), float32 vs bf16 autocast, +/- channels-last (same batches, interleaved):")
    for name, r in ab.items():
        print(f"  {name:30s} {json.dumps(r)}", flush=True)
    adapt_cfg = load_config("pretrain_lite_cpu", [f"data.labels={labels}", "adapt.tasks=[segmentation]",
                                                  "data.mild=1", "data.severe=0"])
    for low in (True, False):
        key = "cpu_adapt_lite_" + ("low_memory" if low else "plain_nograd_baseline")
        results[key] = time_adapt(adapt_cfg, cpu, args.steps, low)
        print(f"cpu adapt segmentation head (lite, frozen, {'low-memory' if low else 'plain no_grad'} features):",
              json.dumps(results[key]), flush=True)

    if torch.cuda.is_available() and not args.skip_gpu:
        gpu = torch.device("cuda")
        full = load_config("pretrain_brainid", [f"data.labels={labels}", "data.num_workers=0"])
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            results[f"gpu_pretrain_official_{name}"] = r = time_pretrain(full, gpu, args.steps, dtype)
            print(f"gpu pretrain (official, 128^3, 2+2 samples, {name}):", json.dumps(r), flush=True)
        results["gpu_name"] = torch.cuda.get_device_name()
    else:
        results["gpu"] = "no CUDA GPU here: official-config figures need one"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
