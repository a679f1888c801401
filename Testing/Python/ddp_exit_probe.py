"""Run `brainid-train` under torchrun, then print which native threads the rank still has.

A finished rank must hold no gloo threads once training returns: threads that survive into
interpreter exit sometimes abort a run that had already saved everything (SIGABRT at exit).
"""

import os
import sys

from training.cli import main

code = main(sys.argv[1:])
if os.path.isdir("/proc/self/task"):  # Linux lists native threads there; elsewhere there is nothing to print
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"rank {os.environ['RANK']} threads after training: {' '.join(names)}", flush=True)
sys.exit(code)
