"""GPU check and figures (CUDA): the same work on the GPU and on the CPU, compared in one run.

    python benchmarks/gpu.py [--json OUT.json]

1. `predict` of the shipped sample with the default brainid-lite (segmentation + anatomy) on
   CUDA (half precision) vs the CPU: label agreement, anatomy correlation, warm seconds each.
2. The full-size Brain-ID network (official architecture, random weights) on a whole 1 mm head
   (192x224x192 phantom, or nilearn's MNI152 when installed): the official-style forward
   (`backbone(x, all_levels=True)`, keeps every decoder level) vs BrainIDLib's low-memory forward,
   both under no_grad + float16 autocast: seconds and peak GPU memory; then `predict(...)` of the
   head end to end (segmentation head, outputs on the input grid).
3. Correspondence and few-shot with brainid-lite: features on CUDA, matching time per point on
   CUDA vs the CPU (same matches), and the few-shot head fitted (on the CPU; features from CUDA).
Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import BrainIDLib as bid  # noqa: E402
from BrainIDLib.samples import sample_path  # noqa: E402


def timed(fn, sync=True):
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def sample_predict() -> dict:
    model = bid.load_model("brainid-lite")
    img = nib.load(sample_path())
    tasks = ("segmentation", "anatomy")
    bid.predict(img, tasks=tasks, model=model, device="cuda")  # warm-up (CUDA context, kernels)
    torch.cuda.reset_peak_memory_stats()
    gpu, t_gpu = timed(lambda: bid.predict(img, tasks=tasks, model=model, device="cuda"))
    gpu_peak = peak_gb()
    cpu, t_cpu = timed(lambda: bid.predict(img, tasks=tasks, model=model, device="cpu"))
    a, b = (np.asarray(p.outputs["segmentation"].dataobj) for p in (gpu, cpu))
    brain = b > 0
    x, y = (np.asarray(p.outputs["anatomy"].dataobj, dtype=np.float64).ravel() for p in (gpu, cpu))
    return {"gpu_seconds": t_gpu, "cpu_seconds": t_cpu, "speedup": t_cpu / t_gpu, "gpu_peak_gb": gpu_peak,
            "label_agreement_all": float((a == b).mean()), "label_agreement_brain": float((a == b)[brain].mean()),
            "anatomy_correlation": float(np.corrcoef(x, y)[0, 1]), "device": gpu.device, "mode": gpu.mode}


def full_network() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import _head_image, _model  # the CPU benchmark's model and head

    from BrainIDLib.volume import load_volume, prepare

    img, source = _head_image()
    out = {"source": source, "shape": list(img.shape)}
    m = _model(seg_head=True).cuda()
    x = prepare(load_volume(img), [1, 1, 1], None, multiple=16).tensor.cuda()
    out["padded"] = list(x.shape[2:])
    for name, fn in (("official_style", lambda: m.backbone(x, all_levels=True)[-1]), ("ours", lambda: m.features(x))):
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                fn()  # warm-up
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() / 2**30
                f, t = timed(fn)
                del f
            out[name] = {"seconds": t, "peak_gb": peak_gb(), "idle_gb": base}
        except torch.cuda.OutOfMemoryError as e:
            out[name] = {"error": str(e).splitlines()[0]}
        torch.cuda.empty_cache()
    del x
    m.cpu()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pred, t = timed(lambda: bid.predict(img, tasks=["segmentation"], model=m, device="cuda"))
    out["predict"] = {"seconds": t, "peak_gb": peak_gb(), "mode": pred.mode}
    return out


def correspondence_and_fewshot() -> dict:
    from BrainIDLib.correspondence import find_correspondence
    from BrainIDLib.feature_maps import compute_feature_map
    from brainid_devtools.demo_pairs import apply_transform, displaced, grid_points, painted_slices, recontrast, tissue_labels
    from BrainIDLib.fewshot import segment, train_head
    from BrainIDLib.volume import make_nifti

    model = bid.load_model("brainid-lite")
    t1 = nib.load(sample_path())
    moved, transform = displaced(recontrast(t1, "t2"), rotation_deg=(5, 0, 8), translation_mm=(6, -4, 3), spacing=2.0)
    compute_feature_map(t1, model=model, device="cuda")  # warm-up
    src, t_src = timed(lambda: compute_feature_map(t1, model=model, device="cuda"))
    tgt = compute_feature_map(moved, model=model, device="cuda")
    cpu_src = compute_feature_map(t1, model=model, device="cpu")
    agree = float(torch.nn.functional.cosine_similarity(src.features.float(), cpu_src.features.float(), dim=0).mean())
    pts = grid_points(t1, n=12, seed=0)
    find_correspondence(src, pts[0], [tgt], device="cuda")  # warm-up
    found, t_match = timed(lambda: [find_correspondence(src, p, [tgt], device="cuda")[0].point_ras for p in pts])
    on_cpu, t_match_cpu = timed(lambda: [find_correspondence(src, p, [tgt], device="cpu")[0].point_ras for p in pts])
    err = np.linalg.norm(np.array(found) - apply_transform(transform, pts), axis=1)
    gpu_vs_cpu_mm = float(np.abs(np.array(found) - np.array(on_cpu)).max())
    labels = np.asarray(tissue_labels(t1).dataobj)
    wm = np.isin(labels, [2, 41])
    paint = painted_slices(wm, 1, (45, 65, 85))
    head, t_head = timed(lambda: train_head([src], [make_nifti(paint, t1.affine, np.int16)], names={1: "WM"},
                                            model=model, device="cuda"))
    seg = np.asarray(segment(tgt, head, model=model).dataobj) == 1
    truth = np.asarray(displaced(tissue_labels(t1), rotation_deg=(5, 0, 8), translation_mm=(6, -4, 3), spacing=2.0,
                                 labels=True)[0].dataobj)
    truth = np.isin(truth, [2, 41])
    dice = float(2 * (seg & truth).sum() / (seg.sum() + truth.sum()))
    return {"feature_seconds_cuda": t_src, "feature_cosine_cuda_vs_cpu": agree, "match_seconds_per_point": t_match / len(pts),
            "match_seconds_per_point_cpu": t_match_cpu / len(pts), "match_gpu_vs_cpu_max_mm": gpu_vs_cpu_mm,
            "median_error_mm": float(np.median(err)), "head_fit_seconds": t_head, "fewshot_dice": dice}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark needs one", file=sys.stderr)
        return 2
    torch.set_num_threads(8)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("sample_predict", sample_predict), ("full_network", full_network),
                     ("correspondence_fewshot", correspondence_and_fewshot)):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            import traceback

            results[name] = {"error": "".join(traceback.format_exception(e))[-2000:]}
        print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
