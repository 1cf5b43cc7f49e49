"""Imported first by the benchmarks whose worker waits on shards: ``--spin N`` sets
OpenMP's ``GOMP_SPINCOUNT`` (how many turns an idle thread spins before it sleeps;
300,000 when unset) before torch loads, which is the only time libgomp reads it.

A short spin keeps a worker that waits on its shards from holding a core they need
(README, "Performance on CPU", sixth round); memdist does not set it, because it slowed
``memdist train``'s own steps by more than it saved there."""

import os
import sys

HELP = "GOMP_SPINCOUNT for this run's processes (default: the environment's, else OpenMP's)"

if "--spin" in sys.argv:
    os.environ["GOMP_SPINCOUNT"] = sys.argv[sys.argv.index("--spin") + 1]
