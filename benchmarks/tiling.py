"""Exact tiling against the whole-volume forward: equality, CPU time and memory, side by side.

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. python benchmarks/tiling.py [--cases ...] [--threads 2]

Each case runs in a fresh subprocess (its own ru_maxrss); a sampler thread also records the peak of
RssAnon (anonymous memory: what disk-backed activations do not count against; their mapped pages
show up in ru_maxrss as reclaimable file pages). CPU times (user + system of the process) are
compared within the same invocation, as the machine may be loaded. Cases:
  sample         : the shipped sample with the default model: features and predict() whole vs tiled
                   on disk with small slabs (max relative feature error, label agreement, time ratio)
  full-whole-N   : the full-size network (random weights) on an N^3 volume, whole, in RAM
  full-tiled-N   : the same, tiled with activations on disk at --budget-gb; also its max relative
                   error against a whole run saved by full-whole-N in the same invocation
  head           : predict() of a whole 1 mm head (nilearn's MNI152 2009a, 197x233x189) with the
                   full-size network and a random 33-class head, tiled on disk at --budget-gb
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class MemorySampler:
    """Peak RssAnon of this process, sampled every 20 ms in a thread."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _full_model(seg_head: bool = False):
    import torch

    from BrainIDLib.labels import SEGMENTATION_LABELS
    from BrainIDLib.model import Architecture, BrainIDModel

    torch.manual_seed(0)
    m = BrainIDModel(Architecture(), {"segmentation": 33} if seg_head else {}).eval()
    m.metadata = {"name": "random", "input": {"spacing_mm": [1, 1, 1], "normalisation": {"method": "minmax", "percentiles": [0, 100]}},
                  "heads": {"segmentation": {"labels": list(SEGMENTATION_LABELS)}} if seg_head else {}}
    return m


def _timed(fn):
    """(result, cpu seconds, wall seconds, peak RssAnon GB during fn)."""
    with MemorySampler() as mem:
        c0, t0 = _cpu(), time.perf_counter()
        out = fn()
        cpu, wall = _cpu() - c0, time.perf_counter() - t0
    return out, cpu, wall, mem.peak_kb * 1024 / 1e9


def _max_rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def case_sample(args) -> dict:
    import numpy as np
    import torch

    from BrainIDLib import inference as inf
    from BrainIDLib import load_model
    from BrainIDLib.samples import sample_path
    from BrainIDLib.storage import Storage

    model = load_model("brainid-lite")
    scan = inf.prepare_scan(str(sample_path()), model)
    x = scan.prepared.tensor
    cpu = torch.device("cpu")
    slab = 1 << 18  # small slabs: many per layer
    whole, c_whole, _, m_whole = _timed(lambda: inf._forward_volume(model, x, [], True, cpu, lambda: None))
    tiled, c_tiled, _, m_tiled = _timed(
        lambda: inf._forward_volume(model, x, [], True, cpu, lambda: None, "fp32", Storage(cpu, "disk", slab)))
    err = _max_rel(whole, tiled)
    del tiled
    # mid-sized slabs too: several rows each, where a convolution's output layout can change between slabs
    mid = inf._forward_volume(model, x, [], True, cpu, lambda: None, "fp32", Storage(cpu, "disk", 1 << 20))
    err_mid = _max_rel(whole, mid)
    del whole, mid
    pw, cp_whole, _, mp_whole = _timed(lambda: inf.predict(scan, ["segmentation"], model=model, device="cpu", mode="whole"))
    pt, cp_tiled, _, mp_tiled = _timed(lambda: inf.predict(scan, ["segmentation"], model=model, device="cpu", mode="tiled",
                                             memory_budget_gb=0.45))
    a, b = np.asarray(pw.outputs["segmentation"].dataobj), np.asarray(pt.outputs["segmentation"].dataobj)
    return dict(shape=list(x.shape[2:]), slab_elements=slab, feature_max_rel_err=err, feature_max_rel_err_1m_slabs=err_mid,
                labels_equal=float((a == b).mean()),
                labels_differing=int((a != b).sum()), modes=[pw.mode, pt.mode], whole_cpu_s=c_whole, tiled_cpu_s=c_tiled,
                whole_rss_anon_gb=m_whole, tiled_rss_anon_gb=m_tiled, predict_whole_cpu_s=cp_whole,
                predict_tiled_cpu_s=cp_tiled, predict_whole_rss_anon_gb=mp_whole, predict_tiled_rss_anon_gb=mp_tiled)


def case_full(args, kind: str, n: int) -> dict:
    import torch

    from BrainIDLib import inference as inf
    from BrainIDLib.storage import Storage

    torch.set_num_threads(args.threads)
    m = _full_model()
    x = torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    saved = Path(args.scratch) / f"whole-{n}.pt"
    if kind == "whole":
        storage = Storage(cpu)
    else:
        slab = inf.tile_plan(m, (n, n, n), cpu, int(args.budget_gb * (1 << 30)))
        storage = Storage(cpu, "disk", slab)
    idle = _maxrss_gb()
    out, c, wall, anon = _timed(lambda: inf._forward_volume(m, x, [], True, cpu, lambda: None, "fp32", storage))
    r = dict(shape=[n] * 3, cpu_s=c, wall_s=wall, rss_anon_gb=anon, maxrss_gb=_maxrss_gb(), idle_maxrss_gb=idle,
             storage_peak_gb=storage.peak_bytes / 1e9, slab_elements=storage.slab_elements,
             estimate_gb=(inf.estimate_forward_bytes(m, (n, n, n), cpu, m.arch.f_maps, storage.slab_elements)
                          + inf._weights_bytes(m) + inf.RUNTIME_BYTES) / 1e9)
    if kind == "whole":
        torch.save(out[:, ::2, ::2, ::2].clone(), saved)  # a subsample keeps the file small
    elif saved.exists():
        r["max_rel_err_vs_whole"] = _max_rel(torch.load(saved), out[:, ::2, ::2, ::2])
    return r


def case_head(args) -> dict:
    import importlib.util

    import nibabel as nib
    import numpy as np
    import torch

    from BrainIDLib.inference import predict

    torch.set_num_threads(args.threads)
    path = Path(importlib.util.find_spec("nilearn").origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    src = nib.load(path)
    img = nib.Nifti1Image(np.asarray(src.dataobj, dtype=np.float32), src.affine)
    m = _full_model(seg_head=True)
    messages = []
    pred, c, wall, anon = _timed(lambda: predict(img, ["segmentation"], model=m, device="cpu", mode="tiled",
                                                 memory_budget_gb=args.budget_gb, flip_average=False,
                                                 progress=lambda f, msg: messages.append(msg)))
    return dict(shape=list(img.shape), mode=pred.mode, cpu_s=c, wall_s=wall, rss_anon_gb=anon, maxrss_gb=_maxrss_gb(),
                plan=next((msg for msg in messages if "tiled" in msg), ""))


def run_case(name: str, args) -> dict:
    if name == "sample":
        return case_sample(args)
    if name == "head":
        return case_head(args)
    kind, n = name.split("-")[1], int(name.split("-")[2])
    return case_full(args, kind, n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-gb", type=float, default=1.5, help="memory budget of the tiled cases")
    ap.add_argument("--cases", default="sample,full-whole-96,full-tiled-96,full-whole-128,full-tiled-128")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args)), flush=True)
        return 0
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), BRAINID_OFFLINE="1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="brainid-bench-") as scratch:
        for case in args.cases.split(","):
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(args.threads),
                                   "--budget-gb", str(args.budget_gb), "--scratch", scratch],
                                  capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{case:16s} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}", flush=True)
                continue
            results[case] = r = json.loads(line[7:])
            print(f"{case:16s} " + json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    for n in (96, 128, 160):
        w, t = results.get(f"full-whole-{n}"), results.get(f"full-tiled-{n}")
        if w and t:
            print(f"{n}^3 tiled/whole: cpu {t['cpu_s'] / w['cpu_s']:.2f}x, RssAnon {t['rss_anon_gb']:.2f} vs "
                  f"{w['rss_anon_gb']:.2f} GB ({t['rss_anon_gb'] / w['rss_anon_gb']:.2f}x), max rel err "
                  f"{t.get('max_rel_err_vs_whole', float('nan')):.2e}")
    if "sample" in results:
        s = results["sample"]
        print(f"sample: tiled/whole features max rel err {s['feature_max_rel_err']:.2e} "
              f"({s['feature_max_rel_err_1m_slabs']:.2e} with 1M-value slabs), labels equal "
              f"{100 * s['labels_equal']:.4f}% ({s['labels_differing']} voxels differ); features with {s['slab_elements']}-value "
              f"slabs cpu {s['tiled_cpu_s'] / s['whole_cpu_s']:.2f}x; predict at the planner's slabs cpu "
              f"{s['predict_tiled_cpu_s'] / s['predict_whole_cpu_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
