"""A C++ build that a killed process left holding torch's lock file does not hang the
next one; a build held too long by a live process ends in a clear error.

The builds here are torch's own lock protocol (``FileBaton``) without the compile, in a
``TORCH_EXTENSIONS_DIR`` of the test's own; test_kernels_cpp.py builds the real kernels
through the same guard.
"""

import subprocess
import sys
import threading
import time

import pytest
from torch.utils.file_baton import FileBaton

from memdist.errors import BuildError
from memdist.kernels import jit_build


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return jit_build.build_directory("memdist_guard_test")


def torch_style_build(folder):
    """What ``cpp_extension.load`` does around a build: take the baton or wait for it."""
    baton = FileBaton(str(folder / "lock"))
    if baton.try_acquire():
        baton.release()
    else:
        baton.wait()  # waits as long as the file exists: forever if its holder died
    return "built"


def test_a_lock_left_by_a_killed_build_is_cleared(folder, monkeypatch):
    died = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from torch.utils.file_baton import "
         "FileBaton; FileBaton(sys.argv[1]).try_acquire(); os.kill(os.getpid(), signal.SIGKILL)",
         str(folder / "lock")],
    )  # fmt: skip
    assert died.returncode == -9 and (folder / "lock").exists()
    monkeypatch.setattr(jit_build, "STALE_S", 1.0)
    start = time.monotonic()
    assert jit_build.guarded("memdist_guard_test", lambda: torch_style_build(folder)) == "built"
    assert time.monotonic() - start < 30 and not (folder / "lock").exists()


def test_a_young_lock_of_a_live_loader_is_waited_for_not_deleted(folder):
    baton = FileBaton(str(folder / "lock"))
    assert baton.try_acquire()
    releaser = threading.Timer(1.5, baton.release)
    releaser.start()
    start = time.monotonic()
    assert jit_build.guarded("memdist_guard_test", lambda: torch_style_build(folder)) == "built"
    assert time.monotonic() - start >= 1.4  # it waited for the holder, which released it
    releaser.join()


def test_a_build_held_too_long_raises_naming_the_extension_and_folder(folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
         str(folder / "memdist.flock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildError, match=r"'memdist_guard_test'.*more than 1 s"):
            jit_build.guarded("memdist_guard_test", lambda: "built", timeout_s=1.0)
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: the next build goes ahead at once
    assert jit_build.guarded("memdist_guard_test", lambda: "built", timeout_s=10.0) == "built"
