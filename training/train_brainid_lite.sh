#!/usr/bin/env bash
# Train the shipped default model "brainid-lite" backbone (see docs/model-card.md).
# Runs in chunks of CHUNK steps, each under the shared heavy-run lock, so other heavy jobs on a shared
# machine can interleave; rerunning the script continues from the run's last checkpoint.
#   training/train_brainid_lite.sh [RUN_DIR] [MAX_STEPS]
# LOCK=none: no lock and no chunks; one process at the lowest CPU priority instead (nice 19 for
# this session's scheduler autogroup too), so it only uses cycles other jobs leave idle.
# MAX_STEPS "auto" (with END="YYYY-mm-dd HH:MM" UTC and STEP_S seconds per step) sizes a fresh run to
# finish by END; past END no new chunk starts and the run is closed at the step it reached (exported).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/brainid-lite}
MAX=${2:-600}
CHUNK=${CHUNK:-50}
PY=${PYTHON:-python}
LOCK=${LOCK:-/tmp/brainid-heavy.lock}
export PYTHONPATH=. END=${END:-}
last_step() {
  $PY -c "import json; l=[json.loads(x) for x in open('$RUN/log.jsonl') if x.strip()]; print(max([r.get('step',0) for r in l] or [0]))" 2>/dev/null || echo 0
}
past_end() { [ -n "${END:-}" ] && [ "$(date -u +%s)" -ge "$(date -u -d "$END" +%s)" ]; }
if [ "$LOCK" = none ]; then
  # the process runs at nice 19; its session group keeps the normal weight (GROUP_NICE=19 starves it
  # completely while other sessions keep both cores busy)
  echo "${GROUP_NICE:-0}" > /proc/self/autogroup 2>/dev/null || true
  if [ -f "$RUN/checkpoints/last.pt" ]; then
    exec nice -n 19 $PY -m training.cli pretrain --resume "$RUN" --set run.max_steps=$MAX
  fi
  exec nice -n 19 $PY -m training.cli pretrain --config training/configs/brainid_lite_2mm.yaml \
    --set run.dir="$RUN" --set run.max_steps=$MAX
fi
step=0
[ -f "$RUN/checkpoints/last.pt" ] && step=$(last_step)
while true; do
  if [ -f "$RUN/checkpoints/last.pt" ]; then
    MAX=$($PY -c "import json; print(json.load(open('$RUN/config.json'))['config']['run']['max_steps'])")
    step=$(last_step)
    [ "$step" -ge "$MAX" ] && break
    if past_end; then  # out of time: close the run where it is (exports model.safetensors)
      flock "$LOCK" $PY -m training.cli pretrain --resume "$RUN" --set run.max_steps=$step --set run.stop_at_step=0
      break
    fi
    next=$(( step + CHUNK )); stop=$next; [ "$next" -ge "$MAX" ] && stop=0
    flock "$LOCK" $PY -m training.cli pretrain --resume "$RUN" --set run.stop_at_step=$stop || true
  else
    # sized when the lock is ours (waiting for it may take a while on a shared machine)
    flock "$LOCK" bash -c '
      MAX='"$MAX"'
      if [ "$MAX" = auto ]; then
        MAX=$(( ($(date -u -d "$END" +%s) - $(date -u +%s)) / ${STEP_S:-6} )); [ "$MAX" -lt 50 ] && MAX=50
      fi
      stop='"$CHUNK"'; [ "$stop" -ge "$MAX" ] && stop=0
      echo "fresh run: max_steps=$MAX ($(date -u))"
      exec '"$PY"' -m training.cli pretrain --config training/configs/brainid_lite_2mm.yaml \
        --set run.dir='"$RUN"' --set run.max_steps=$MAX --set run.stop_at_step=$stop' || true
  fi
done
