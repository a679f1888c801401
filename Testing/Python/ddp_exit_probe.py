"""Run `brainid-train` under torchrun, then print which native threads the rank still has.

A finished rank must hold no gloo threads once training returns: threads that survive into
interpreter exit sometimes abort a run that had already saved everything (SIGABRT at exit).
"""

import os
import sys

from training.cli import main

code = main(sys.argv[1:])
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(f"rank {os.environ['RANK']} threads after training: {' '.join(names)}", flush=True)
sys.exit(code)
