#!/usr/bin/env bash
# Time-boxed training of brainid-lite on a lent GPU: continue the committed run (weights, optimizer,
# step) for MINUTES of wall clock, then checkpoint and export; everything lands in OUT.
#   bash training/train_gpu.sh MINUTES OUT
# With the device tool (runs/data holds the 2 mm label maps from training/make_lite_data.py; its image
# has torch but not nibabel, so carry nibabel's wheel, fetched here with `pip download` as its README says):
#   run(command="python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#       PYTHON='env PYTHONPATH=.:/tmp/site python3' timeout 500 bash training/train_gpu.sh 7 /tmp/o;
#       cp /tmp/o/brainid-lite/checkpoints/last.pt /tmp/o/brainid-lite/log.jsonl $OUT/",
#       carry=["runs/data", ".whl"], timeout_s=560)
# Then copy last.pt and log.jsonl over model-runs/brainid-lite/ (checkpoints/last.pt, log.jsonl) to continue
# on the CPU or in the next GPU window. Keep the committed config.json: these settings are given here each
# time, and saved into a config they would make a CPU resume ~100x slower per step.
# Measured on an H200 (2026-12-04): 0.063 s per step (median), 5,488 steps in a 7-minute box.
# GPU settings (over the CPU run's saved config): generator on the GPU, bf16 autocast, whole-head
# 96x112x96 crops (2 mm grid) besides 64^3, 2 mild + 2 severe samples, constant lr with EMA weights
# exported (a burst of unknown length has no schedule end to decay towards).
set -euo pipefail
cd "$(dirname "$0")/.."
MIN=${1:?minutes}
OUT=${2:?output folder}
PY=${PYTHON:-python}
RUN="$OUT/brainid-lite"
SRC=model-runs/brainid-lite
$PY -c "import nibabel, torch" 2>/dev/null || { echo "nibabel or torch missing for '$PY': carry nibabel's wheel in .whl and install it as this script's header shows" >&2; exit 2; }
[ -d runs/data/train2mm ] || { echo "runs/data/train2mm missing: run training/make_lite_data.py (or carry runs/data)" >&2; exit 2; }
if [ ! -f "$RUN/checkpoints/last.pt" ]; then
  mkdir -p "$RUN/checkpoints"
  cp "$SRC/config.json" "$SRC/log.jsonl" "$RUN/"
  cp "$SRC/checkpoints/last.pt" "$RUN/checkpoints/"
fi
STEP=$($PY -c "import json; l=[json.loads(x) for x in open('$RUN/log.jsonl') if x.strip()]; print(max([r['step'] for r in l] or [0]))")
export PYTHONPATH=.
exec $PY -m training.cli pretrain --resume "$RUN" \
  --set run.device=cuda --set run.amp=bf16 --set run.threads=0 --set run.progress=false \
  --set run.max_minutes="$MIN" --set run.max_steps=$((STEP + 1000000)) --set run.checkpoint_every=200 \
  --set data.generator_device=cuda --set data.num_workers=0 \
  --set 'data.size=[[64,64,64],[96,112,96]]' --set 'data.size_probs=[0.5,0.5]' \
  --set data.mild=2 --set data.severe=2 \
  --set optim.schedule=constant --set optim.lr=5e-4 --set optim.warmup_steps=0 --set optim.ema=0.999
