"""Just-in-time C++ builds (memdist's kernels, DeepSpeed's CPU shared-memory op) that a
killed process cannot hang.

torch's ``cpp_extension.load`` guards a build folder with a plain ``lock`` file that a
process creates and deletes. A process killed while holding it (a test's timeout, Ray
stopping an actor, a node going away) leaves the file behind, and every later build of
that extension on the machine waits for it forever. Builds here first take an OS file
lock (``filelock``: released by the kernel when its holder dies), and under it delete a
``lock`` file older than ``STALE_S``: only a holder of the OS lock builds, so such a file
was left by a dead process (a process that loads an already built extension without this
guard holds the file for about a second).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from memdist.errors import BuildError

T = TypeVar("T")
STALE_S = 120.0
TIMEOUT_S = 1800.0


def build_directory(name: str) -> Path:
    """The folder torch builds extension ``name`` in (``TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def guarded(name: str, load: Callable[[], T], *, timeout_s: float = TIMEOUT_S) -> T:
    """``load()`` (which builds or loads extension ``name``) under the machine-wide lock."""
    folder = build_directory(name)
    try:
        with FileLock(str(folder / "memdist.flock"), timeout=timeout_s):
            _wait_for_baton(folder / "lock")
            return load()
    except Timeout as exc:
        raise BuildError(
            f"building the C++ extension {name!r} in {folder}: another process held its build "
            f"lock for more than {timeout_s:.0f} s; is a build stuck there?"
        ) from exc


def _wait_for_baton(baton: Path) -> None:
    """Wait while torch's ``lock`` file is young (an unguarded load of a built extension);
    delete it once it is older than ``STALE_S`` (its holder died)."""
    while True:
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_S:
            baton.unlink(missing_ok=True)
            return
        time.sleep(0.5)


@functools.cache
def deepspeed_comm_op() -> None:
    """Build (once per machine) and load DeepSpeed's CPU shared-memory collective op, which
    ``deepspeed.init_distributed`` otherwise builds unguarded in every worker; DeepSpeed
    keeps the loaded op and uses it from then on. Nothing to do where DeepSpeed has no such
    op (GPU accelerators)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    guarded(builder.NAME, builder.load)
