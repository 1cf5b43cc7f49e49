"""OpenMP threads that sleep soon after their work, so the memory shards on a worker's
node get its cores while the worker waits for them.

GNU OpenMP (torch's CPU builds on Linux) keeps an idle thread spinning for
``GOMP_SPINCOUNT`` turns before it sleeps: 300,000 by default, milliseconds on the
project's 2-core machine. A worker waits for its shards three times a step (lookup,
backward, step), and each time one of its threads kept a core spinning, at nice 0
against the shard actors' 15 (Ray's worker niceness). A lookup and backward sent to 2
shards (``small``'s shapes) cost the worker 12.9-13.9 ms of CPU, 4.3-5.3 ms when its
threads did not spin at all (``OMP_WAIT_POLICY=PASSIVE``, which slows the dense model
by a fifth), and the shards' kernels, 4.3 ms in a process of their own, took 8.3-10.4
ms (6.0-7.8 without the spin). With 5,000 turns a `small` step through 2 Ray shards waited
8.23-8.95 ms on them instead of 13.99-17.23 (fastest of 20 steps, three runs each,
alternating), and the dense and local-table models, which never wait, lost nothing (reports
``benchmarks/reports/2026-11-27-cpu-2core-speed-session13-*``).

The count is read once, when libgomp loads with torch: ``prefer_short_spin`` must run
before torch is imported. ``memdist``'s command line and the benchmarks call it first
thing; processes started after it (a local Ray instance's shards and workers) inherit
it; the cluster configs set it for ``ray start``. A value already in the environment is
kept.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 5000  # turns: the best of 1,000, 5,000, 20,000, 60,000 and 300,000 for 2 Ray shards


def prefer_short_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and the ones it starts (unless set);
    returns whether it governs this process (torch was not imported yet)."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    return "torch" not in sys.modules
