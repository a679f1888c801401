#!/usr/bin/env bash
# Give a long background job (started at the lowest CPU priority, e.g. LOCK=none in
# train_brainid_lite.sh) normal priority only while it holds the shared heavy-run lock, in slices
# of SLICE seconds, so other heavy jobs interleave and never overlap with its boosted phases.
#   training/lock_boost.sh PID [SLICE]
set -u
PID=$1
SLICE=${2:-480}
LOCK=${LOCK_FILE:-/tmp/brainid-heavy.lock}
while kill -0 "$PID" 2>/dev/null; do
  flock "$LOCK" bash -c "echo 0 > /proc/$PID/autogroup; renice -n 0 -p $PID $(pgrep -P $PID | tr "\n" " ") >/dev/null
    for i in \$(seq $SLICE); do kill -0 $PID 2>/dev/null || break; sleep 1; done
    echo 19 > /proc/$PID/autogroup 2>/dev/null; renice -n 19 -p $PID $(pgrep -P $PID | tr "\n" " ") >/dev/null 2>&1; true"
  sleep 3
done
