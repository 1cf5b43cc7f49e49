"""Imported first by the benchmarks whose worker waits on shards: OpenMP's short spin as
``memdist train`` has it (``memdist.openmp``), unless ``--default-spin`` is given (the
OpenMP library's own, as before session 13), so both can be measured with one script."""

import sys

from memdist.openmp import prefer_short_spin

SHORT = "--default-spin" not in sys.argv
if SHORT:
    prefer_short_spin()

HELP = "leave GOMP_SPINCOUNT to OpenMP (its own long spin), as before session 13"
