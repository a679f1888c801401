"""Time and peak memory of the full-size Brain-ID network (random weights) on the CPU.

    flock /tmp/brainid-heavy.lock python benchmarks/inference.py [--threads 2] [--reps 3] [--budget-gb 1.5]

Each case runs in a fresh subprocess and reports its own wall time and peak resident memory
(ru_maxrss), so cases never share allocator state. Cases:
  official-96 / official-160 : the official-style forward, `backbone(x, all_levels=True)` under
                               no_grad (keeps every decoder level, like the official get_feature)
  ours-96 / ours-160         : BrainIDLib's low-memory forward, `model.features(x)`
  bf16-96 / bf16-160         : the same under `precision="bf16"` (bfloat16 convolutions, CPU only)
  head-tiled                 : `predict(...)` of a whole 1 mm head (the MNI152 2009a template shipped
                               inside nilearn, 197x233x189, or a 192x224x192 phantom) with a random
                               33-class segmentation head, tiled (exact: activations on disk) within
                               a --budget-gb budget, outputs mapped back to the input grid; reports
                               peak RssAnon too (ru_maxrss also counts mapped file pages)
Tiled vs whole equality and memory: benchmarks/tiling.py.
The baseline (official-*) runs in the same invocation, so ratios compare like with like; with --reps N
the whole list runs N times, interleaved, and each case reports its fastest run (machine load hits
every case alike).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _model(seg_head: bool = False):
    import torch

    from BrainIDLib.labels import SEGMENTATION_LABELS
    from BrainIDLib.model import Architecture, BrainIDModel

    torch.manual_seed(0)
    m = BrainIDModel(Architecture(), {"segmentation": 33} if seg_head else {}).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    m.metadata = {"name": "random", "input": {"spacing_mm": [1, 1, 1], "normalisation": {"method": "minmax", "percentiles": [0, 100]}},
                  "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}} if seg_head else {}}
    return m


def _head_image():
    import nibabel as nib
    import numpy as np

    try:  # nilearn's packaged MNI152 2009a template, read without importing nilearn (and its ~150 MB)
        import importlib.util

        spec = importlib.util.find_spec("nilearn")
        path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        img = nib.load(path)
        return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), "MNI152 2009a 1 mm (nilearn)"
    except Exception:  # noqa: BLE001 - fall back to a synthetic head
        z, y, x = np.mgrid[:192, :224, :192].astype(np.float32)
        r = np.sqrt(((x - 96) / 70) ** 2 + ((y - 112) / 90) ** 2 + ((z - 96) / 75) ** 2)
        data = np.where(r < 1, 100 + 50 * np.sin(x / 7) * np.cos(y / 9), 0).astype(np.float32)
        return nib.Nifti1Image(data, np.eye(4)), "synthetic 192x224x192 phantom"


def run_case(name: str, threads: int, budget_gb: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    result = {"case": name}
    if name.startswith(("official-", "ours-", "bf16-")):
        from BrainIDLib.inference import _autocast

        n = int(name.split("-")[1])
        m = _model()
        x = torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(0))
        base = _peak_gb()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), _autocast(torch.device("cpu"), "bf16" if name.startswith("bf16") else "fp32"):
            f = m.backbone(x, all_levels=True)[-1] if name.startswith("official") else m.features(x)
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, peak_gb=_peak_gb(),
                      idle_gb=base, shape=list(f.shape))
    elif name == "head-tiled":
        from BrainIDLib.inference import predict

        img, source = _head_image()
        m = _model(seg_head=True)
        base = _peak_gb()
        t0, c0 = time.perf_counter(), time.process_time()
        stages = []

        def trace(fraction, message):  # peak memory so far at each step (to find what sets the peak)
            if not stages or stages[-1][1].split(" ")[0] != message.split(" ")[0]:
                stages.append((round(fraction, 3), message, round(_peak_gb(), 2)))

        from tiling import MemorySampler  # benchmarks/tiling.py: peak RssAnon, which mapped activation files do not count in

        with MemorySampler() as mem:
            pred = predict(img, tasks=["segmentation"], model=m, device="cpu", mode="tiled", memory_budget_gb=budget_gb,
                           progress=trace)
        stages.append((1.0, "returned", round(_peak_gb(), 2)))
        result["stages"] = stages
        result["rss_anon_gb"] = mem.peak_kb * 1024 / 1e9
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, peak_gb=_peak_gb(), idle_gb=base, source=source,
                      shape=list(img.shape), mode=pred.mode)
    else:
        raise SystemExit(f"unknown case {name}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-gb", type=float, default=3.0, help="memory budget of the tiled head case")
    ap.add_argument("--cases", default="official-96,ours-96,bf16-96,official-160,ours-160,bf16-160,head-tiled")
    ap.add_argument("--reps", type=int, default=1, help="run the case list this many times; report each case's fastest")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.threads, args.budget_gb)), flush=True)
        return 0
    import torch

    print(f"BrainID inference benchmark: torch {torch.__version__}, {args.threads} CPU threads, full-size network "
          f"(f_maps=64, levels=5), random weights, float32", flush=True)
    results = {}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for case in [c for _ in range(args.reps) for c in args.cases.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(args.threads),
                               "--budget-gb", str(args.budget_gb)], capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{case:14s} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }", flush=True)
            continue
        r = json.loads(line[7:])
        if case not in results or r["seconds"] < results[case]["seconds"]:
            results[case] = r
        if "stages" in r:
            print("               peak by step: " + "; ".join(f"{m} {g} GB" for _, m, g in r["stages"]), flush=True)
        extra = (f"  [{r.get('source', '')}, {'x'.join(map(str, r['shape']))}, {r['mode']}; peak RssAnon {r['rss_anon_gb']:.2f} GB: "
                 "the peak above also counts the page cache of the mapped activation files]") if case == "head-tiled" else ""
        print(f"{case:14s} {r['seconds']:7.1f} s (cpu {r['cpu_seconds']:6.1f} s)   peak {r['peak_gb']:5.2f} GB (idle process {r['idle_gb']:.2f} GB){extra}", flush=True)
    checks = []
    for n in (96, 160):
        o = results.get(f"official-{n}")
        for kind, limit in (("ours", 1.0), ("bf16", 0.6)):
            u = results.get(f"{kind}-{n}")
            if o and u:
                print(f"{n}^3: {kind}/official time {u['seconds'] / o['seconds']:.2f}x (cpu {u['cpu_seconds'] / o['cpu_seconds']:.2f}x), "
                      f"peak memory {u['peak_gb'] / o['peak_gb']:.2f}x ({u['peak_gb']:.2f} vs {o['peak_gb']:.2f} GB)")
                checks.append((f"{n}^3 {kind} time <= {limit:g}x official", u["seconds"] <= limit * o["seconds"]))
    if "ours-160" in results:
        u = results["ours-160"]
        checks.append(("160^3 whole peak <= 5 GB", u["peak_gb"] <= 5.0))
    if "head-tiled" in results:
        checks.append((f"whole head tiled peak RssAnon <= the {args.budget_gb:g} GB budget",
                       results["head-tiled"]["rss_anon_gb"] <= args.budget_gb))
    for what, ok in checks:
        print(f"target {what}: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
