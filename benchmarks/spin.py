"""Imported first by the benchmarks whose worker waits on shards: ``--spin N`` sets
OpenMP's ``GOMP_SPINCOUNT`` (how many turns an idle thread spins before it sleeps;
300,000 when unset) before torch loads, which is the only time libgomp reads it.

A short spin keeps a worker that waits on its shards from holding a core they need
(README, "Performance on CPU", sixth round); memdist does not set it, because it slowed
``memdist train``'s own steps by more than it saved there."""

import argparse
import os

HELP = "GOMP_SPINCOUNT for this run's processes (default: the environment's, else OpenMP's)"

# The script's own parser sees --spin too (for --help and checking); this one runs first,
# and takes both "--spin N" and "--spin=N".
_early = argparse.ArgumentParser(add_help=False)
_early.add_argument("--spin", type=int, default=None)
_spin = _early.parse_known_args()[0].spin
if _spin is not None:
    os.environ["GOMP_SPINCOUNT"] = str(_spin)
