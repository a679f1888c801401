#!/usr/bin/env bash
# Run a long job of this session at the lowest CPU priority, and at normal priority only while it
# holds the shared heavy-run lock (slices of SLICE seconds, so other heavy jobs interleave and never
# overlap with its full-speed phases). Priority is set through the scheduler autogroup of PID's
# session (Linux autogroups make per-process nice values count only within a session).
#   scripts/lock_boost.sh PID [SLICE]
set -u
PID=$1
SLICE=${2:-480}
LOCK=${LOCK_FILE:-/tmp/brainid-heavy.lock}
echo 19 > /proc/$PID/autogroup
while kill -0 "$PID" 2>/dev/null; do
  flock "$LOCK" bash -c "echo 0 > /proc/$PID/autogroup; echo \"boost \$(date -u)\"
    for i in \$(seq $SLICE); do kill -0 $PID 2>/dev/null || break; sleep 1; done
    echo 19 > /proc/$PID/autogroup 2>/dev/null; echo \"release \$(date -u)\"; true"
  sleep 3
done
echo 0 > /proc/self/autogroup 2>/dev/null || true
