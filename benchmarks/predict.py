"""CPU time and peak memory of the README's main command with the shipped default model.

    flock /tmp/brainid-heavy.lock env PYTHONPATH=. /work/.venv/bin/python benchmarks/predict.py

Runs, each in a fresh subprocess (so that its peak RSS is its own) with 2 torch threads:
- baseline: `python -c "import BrainIDLib.cli"` (interpreter + torch import: the fixed cost);
- `brainid predict --sample --task segmentation` (default model, shipped 1.5 mm MNI152 sample);
- `brainid predict --sample --task segmentation --task anatomy` (the README command);
and prints wall time, CPU time (user + system) and peak RSS of each, the median over --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(cmd: list[str]) -> dict:
    """Wall, CPU and peak RSS of one child process (wait4 gives the child's own rusage)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", BRAINID_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "baseline: import only": [py, "-c", "import torch; torch.set_num_threads(2); import BrainIDLib.cli"],
            "predict --sample segmentation": [py, "-m", "BrainIDLib.cli", "predict", "--sample", "--task", "segmentation",
                                              "--device", "cpu", "--output", f"{tmp}/a/", "--progress-format", "none"],
            "predict --sample segmentation+anatomy": [py, "-m", "BrainIDLib.cli", "predict", "--sample", "--task",
                                                      "segmentation", "--task", "anatomy", "--device", "cpu",
                                                      "--output", f"{tmp}/b/", "--progress-format", "none"],
        }
        results = {}
        for name, cmd in cases.items():
            runs = [measure(cmd) for _ in range(args.rounds)]
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'case':42s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s}")
        for name, r in results.items():
            print(f"{name:42s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mb']:12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
