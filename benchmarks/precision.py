"""bfloat16 vs float32 CPU inference: agreement, time and memory.

    flock /tmp/brainid-heavy.lock python benchmarks/precision.py [--part lite|full] [--threads 2] [--reps 2] [--scans 4]

Two parts, each comparing `precision="bf16"` with `precision="fp32"` in the same invocation,
timed interleaved (fp32, bf16, fp32, bf16) so machine load hits both alike (best of --reps):
  lite : the shipped default model (brainid-lite) on the shipped sample and on copies rendered from
         it (T2-like, gamma-changed, rotated and resampled): `predict` with segmentation + anatomy as
         a user runs it, then labels equal (all voxels, and voxels either run calls brain), the
         largest structure-volume difference, anatomy and feature correlation, network time.
         `--scans 1 --reps 0` checks the sample alone, untimed: the check to run before re-exporting
         a model with --bf16-measured on a CPU that emulates bf16 (one bf16 predict: 25 min on a 2-core AMD EPYC)
  full : the full-size network (f_maps 64, 5 levels, random weights, a random 33-class head) on a
         96^3 volume, each run in a fresh subprocess for the network's own time and peak memory
         (ru_maxrss above the idle process), then labels and features compared
bf16 needs a CPU with native bfloat16 (avx512_bf16 / amx_bf16) to be fast; elsewhere oneDNN
emulates it. The script says which this machine has, and (lite, with --reps) what precision auto's
timed probe picks here, against the network times it measured on the scans.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRECISIONS = ("fp32", "bf16")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _corr(a, b) -> float:
    import numpy as np

    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def _scans():
    """(name, nibabel image): the sample and copies rendered from it with known changes."""
    import nibabel as nib

    from brainid_devtools.demo_pairs import displaced, recontrast
    from BrainIDLib.samples import sample_path

    img = nib.load(str(sample_path()))
    return [("sample (T1, 1.5 mm)", img),
            ("T2-like", recontrast(img, "t2")),
            ("gamma 0.8", recontrast(img, "gamma", gamma=0.8)),
            ("T2-like, rotated 5/8 deg, 2 mm grid", displaced(recontrast(img, "t2"), rotation_deg=(5, 0, 8))[0])]


def lite(reps: int, n_scans: int) -> list[dict]:
    import numpy as np

    import torch

    import BrainIDLib
    from BrainIDLib.inference import _forward_volume, predict, prepare_scan
    from BrainIDLib.volumes import volumes_table

    model = BrainIDLib.load_model("brainid-lite")
    CPU = torch.device("cpu")
    rows = []
    for name, img in _scans()[:n_scans]:
        preds, seconds = {}, {p: [] for p in PRECISIONS}
        for p in PRECISIONS:  # once each: the agreement (and a rough end-to-end time)
            t0 = time.perf_counter()
            preds[p] = predict(img, tasks=["segmentation", "anatomy"], model=model, device="cpu", precision=p,
                               keep_features=True)
            seconds[p].append(time.perf_counter() - t0)
        scan = prepare_scan(img, model)
        net = {p: [] for p in PRECISIONS}
        for _ in range(reps):  # the network alone (predict above also maps outputs back to the input grid)
            for p in PRECISIONS:
                t0 = time.perf_counter()
                _forward_volume(model, scan.prepared.tensor, ["segmentation"], False, CPU, lambda: None, p)
                net[p].append(time.perf_counter() - t0)
        seg = {p: np.asarray(preds[p].outputs["segmentation"].dataobj) for p in PRECISIONS}
        brain = (seg["fp32"] != 0) | (seg["bf16"] != 0)
        vols = {p: {v.label: v.ml for v in volumes_table(preds[p].outputs["segmentation"])} for p in PRECISIONS}
        big = [lab for lab, ml in vols["fp32"].items() if ml >= 1.0]
        rel = max(abs(vols["bf16"].get(lab, 0.0) - vols["fp32"][lab]) / vols["fp32"][lab] for lab in big)
        rows.append({
            "scan": name,
            "labels_equal_pct": 100 * float((seg["fp32"] == seg["bf16"]).mean()),
            "labels_equal_in_brain_pct": 100 * float((seg["fp32"] == seg["bf16"])[brain].mean()),
            "max_structure_volume_diff_pct": 100 * rel,
            "anatomy_corr": _corr(preds["fp32"].outputs["anatomy"].dataobj, preds["bf16"].outputs["anatomy"].dataobj),
            "feature_corr": _corr(preds["fp32"].features_1mm.dataobj, preds["bf16"].features_1mm.dataobj),
            "predict_s": {p: round(min(v), 2) for p, v in seconds.items()},
            "network_s": {p: round(min(v), 2) for p, v in net.items() if v},
        })
    return rows


def probe_verdict(rows: list[dict]) -> str:
    """What precision auto's timed probe (BrainIDLib.bf16_probe, run afresh here) picks for brainid-lite,
    against the network times measured above on real scans."""
    import numpy as np

    import BrainIDLib
    from BrainIDLib.bf16_probe import BF16_MARGIN, bf16_wins, probe_side, time_forward
    from BrainIDLib.inference import _autocast, model_input

    model = BrainIDLib.load_model("brainid-lite")
    side = probe_side(model, model_input(model)[0])
    t = time_forward(model, side, _autocast)
    pick = "bf16" if bf16_wins(t) else "fp32"
    ratio = float(np.mean([r["network_s"]["bf16"] / r["network_s"]["fp32"] for r in rows]))
    faster = "bf16" if ratio < 1 else "fp32"
    verdict = ("agrees" if pick == faster else
               f"within its margin (bf16 must take < {BF16_MARGIN}x)" if pick == "fp32" and ratio >= BF16_MARGIN else
               "DISAGREES")
    return (f"auto | probe on {side}^3: {t['fp32']:.3f} s fp32 / {t['bf16']:.3f} s bf16 ({t['bf16'] / t['fp32']:.2f}x) "
            f"-> picks {pick}; the scans above: bf16 network {ratio:.2f}x on average, {faster} faster: {verdict}")


def full_case(precision: str, size: int, threads: int, out: str) -> dict:
    """One fresh process: the full-size network on a size^3 volume (time and peak memory of the network
    alone), then its features and segmentation labels saved to `out` for the comparison."""
    import numpy as np
    import torch

    from BrainIDLib.inference import _autocast, _raw_heads
    from BrainIDLib.model import Architecture, BrainIDModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=64, levels=5), {"segmentation": 33}).eval()
    # a smooth-ish volume: random noise blurred by pooling, so features have structure
    x = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.avg_pool3d(x, 5, 1, 2)
    idle = _peak_gb()
    t0 = time.perf_counter()
    with torch.no_grad(), _autocast(torch.device("cpu"), precision):
        feats = model.features(x)
    seconds = time.perf_counter() - t0
    peak = _peak_gb()
    with torch.no_grad():
        labels = _raw_heads(model, feats, x, ["segmentation"])[0][0].argmax(0).to(torch.int8)
    np.savez(out, features=feats[0].float().numpy(), labels=labels.numpy())
    return {"precision": precision, "seconds": seconds, "peak_gb": peak, "idle_gb": idle}


def full(size: int, reps: int, threads: int) -> dict:
    import numpy as np

    results = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for p in PRECISIONS:
                out = f"{tmp}/{p}.npz"
                proc = subprocess.run([sys.executable, __file__, "--case", p, "--size", str(size), "--threads",
                                       str(threads), "--out", out], capture_output=True, text=True, check=True)
                results[p].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        y32, y16 = np.load(f"{tmp}/fp32.npz"), np.load(f"{tmp}/bf16.npz")
        labels = float((y32["labels"] == y16["labels"]).mean())
        corr = _corr(y32["features"], y16["features"])
    return {"size": size, "labels_equal_pct": 100 * labels, "feature_corr": corr,
            "seconds": {p: [round(r["seconds"], 1) for r in v] for p, v in results.items()},
            "peak_gb_above_idle": {p: round(min(r["peak_gb"] - r["idle_gb"] for r in v), 2) for p, v in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions (lite: 0 skips the network timing)")
    ap.add_argument("--scans", type=int, default=4, choices=range(1, 5), metavar="1-4",
                    help="lite: the first N scans (1: the sample alone)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--part", choices=("lite", "full", "both"), default="both")
    ap.add_argument("--case", choices=PRECISIONS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(full_case(args.case, args.size, args.threads, args.out)))
        return
    import torch

    from BrainIDLib.inference import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}")
    if args.part != "lite" and args.reps < 1:
        ap.error("--part full needs --reps >= 1")
    rows = lite(args.reps, args.scans) if args.part != "full" else []
    for r in rows:
        net = r["network_s"]
        timing = (f"network {net['fp32']} s fp32 / {net['bf16']} s bf16 ({net['bf16'] / net['fp32']:.2f}x), "
                  if net else "")
        print(f"lite | {r['scan']}: labels equal {r['labels_equal_pct']:.2f}% (in brain {r['labels_equal_in_brain_pct']:.2f}%), "
              f"largest structure-volume difference {r['max_structure_volume_diff_pct']:.2f}%, anatomy r "
              f"{r['anatomy_corr']:.6f}, features r {r['feature_corr']:.6f}; {timing}"
              f"predict {r['predict_s']['fp32']} / {r['predict_s']['bf16']} s")
    if args.part != "full" and args.reps > 0:
        print(probe_verdict(rows))
    if args.part != "lite":
        r = full(args.size, args.reps, args.threads)
        t32, t16 = min(r["seconds"]["fp32"]), min(r["seconds"]["bf16"])
        m32, m16 = r["peak_gb_above_idle"]["fp32"], r["peak_gb_above_idle"]["bf16"]
        print(f"full f_maps 64, 5 levels, random weights, {r['size']}^3: labels equal {r['labels_equal_pct']:.2f}%, "
              f"features r {r['feature_corr']:.6f}; {t32} s fp32 / {t16} s bf16 ({t16 / t32:.2f}x), runs {r['seconds']}; "
              f"peak above idle {m32} GB fp32 / {m16} GB bf16 ({m16 / m32:.2f}x)")


if __name__ == "__main__":
    main()
