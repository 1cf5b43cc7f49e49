"""Runs that survive losing a shard actor and a worker: Ray restarts what died, every shard
and worker goes back to the last checkpoint, and the model ends as a run resumed there."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import TINY, clean_env, last_json, memdist

RUN = [*TINY, "--set", "train.log_every=1", "--set", "train.eval_every=0", "--shards", "2",
       "--plan", "row", "--workers", "2", "--set", "train.checkpoint.every=3",
       "--set", "train.checkpoint.keep=100", "--no-progress"]  # fmt: skip


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``memdist train ARGS`` in the background, its output in tmp_path/out and /err."""
    return subprocess.Popen(
        [sys.executable, "-m", "memdist.cli", "train", *args], cwd=tmp_path,
        env=env or clean_env(),
        stdout=(tmp_path / "out").open("w"), stderr=(tmp_path / "err").open("w"),
    )  # fmt: skip


def wait_for(run: Path, proc: subprocess.Popen, found, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = found(records(run))
        if hit:
            return hit
        if proc.poll() is not None:
            err = (run.parent / "err").read_text()[-3000:]
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {err}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:g} s")


def done_after(attempt: int, step: int):
    return lambda recs: [r for r in recs if r["kind"] == "checkpoint_done"
                         and r.get("attempt", 0) == attempt and r["step"] >= step]  # fmt: skip


def pid_of(recs: list[dict], role: str, index: int, attempt: int) -> int:
    key = "shard" if role == "shard" else "worker"
    (pid,) = [r["pid"] for r in recs if r["kind"] == "placement" and r["role"] == role
              and r[key] == index and r.get("attempt", 0) == attempt]  # fmt: skip
    return pid


def losses_by_step(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}  # the last per step


def _table(tmp_path: Path, workers: int = 1):
    """A 64 x 8 table in one in-process row shard, saved once; returns the table, its
    shard and the saved chain."""
    from memdist.cluster.plan import make_plan
    from memdist.cluster.shard import ShardServer
    from memdist.kernels import OptimizerSpec
    from memdist.remote import RemoteTable
    from memdist.storage.table_store import Source
    from memdist.storage.targets import FolderTarget
    from memdist.transport import InProcessTransport

    spec = OptimizerSpec("adam", lr=0.1)
    plan = make_plan("row", 64, 8, 1)
    shard = ShardServer(plan.regions[0], "row", 8, spec, seed=3, workers=workers,
                        barrier_timeout_s=30)  # fmt: skip
    table = RemoteTable(plan, InProcessTransport([shard]), spec)
    target = FolderTarget(tmp_path / "ck")
    return table, shard, [Source(target, table.save(target, "t"))]


def _requests(worker: int = 0):
    import torch

    from memdist.wire import Backward, Lookup, Step

    g = torch.Generator().manual_seed(worker)
    idx, scores = torch.randint(0, 64, (5, 4), generator=g), torch.rand(5, 4, generator=g)
    return (Lookup(idx, scores), Backward(idx, scores, torch.randn(5, 8, generator=g), worker),
            Step(1.0, worker, 0.0))  # fmt: skip


def test_a_restarted_shard_serves_nothing_until_a_checkpoint_is_loaded(tmp_path):
    """Ray restarts a dead shard with its initial rows: serving them would silently train
    on a table that is not the run's, so it refuses until the run loads a checkpoint."""
    import torch

    from memdist.cluster.shard import ShardServer
    from memdist.errors import ShardError
    from memdist.remote import RemoteTable
    from memdist.transport import InProcessTransport

    table, shard, chain = _table(tmp_path)
    saved = table.read_rows(0, 64)
    for req in _requests():  # the run goes on past the checkpoint, then the shard dies
        shard.handle(req)
    # Ray builds the actor again from the same arguments, and says it was restarted.
    back = ShardServer(shard.region, "row", 8, table.spec, seed=3, restarted=True)
    for req in _requests():
        with pytest.raises(ShardError, match="memory shard 0 died and was restarted"):
            back.handle(req)
    again = RemoteTable(table.plan, InProcessTransport([back]), table.spec)
    again.load(chain, "t")
    for a, b in zip(saved.values(), again.read_rows(0, 64).values(), strict=True):
        assert torch.equal(a, b)  # the checkpoint's rows, served again
    back.handle(_requests()[0])


def test_loading_a_checkpoint_drops_a_half_done_step(tmp_path):
    """After a failure a surviving shard may hold one worker's gradients and a step round
    that worker 1 never joined; loading the checkpoint drops both, the waiter fails."""
    import threading

    import torch

    from memdist.errors import ShardError

    table, shard, chain = _table(tmp_path, workers=2)
    saved = table.read_rows(0, 64)
    _, backward, step = _requests(0)
    shard.handle(backward)
    failed: list[Exception] = []

    def wait_at_step() -> None:
        try:
            shard.handle(step)
        except ShardError as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait_at_step)
    waiter.start()
    while not shard._arrived:
        time.sleep(0.01)
    table.load(chain, "t")
    waiter.join(timeout=10)
    assert failed and "was dropped" in str(failed[0])
    assert shard.rows.grad_sq(1.0) == 0  # no gradient of the failed attempt is left
    for a, b in zip(saved.values(), table.read_rows(0, 64).values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_run_recovers_from_a_dead_shard_and_a_dead_worker(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ck"
    data = ["--set", f"data.cache_dir={tmp_path / 'd'}"]
    proc = start(tmp_path, *RUN, *data, "--set", "train.steps=18", "--max-failures", "2",
                 "--checkpoint-dir", str(ckpt), "--run-dir", str(run))  # fmt: skip
    try:
        # A shard actor dies (SIGKILL: no goodbye) once a checkpoint is complete.
        wait_for(run, proc, done_after(0, 3), "a first checkpoint")
        os.kill(pid_of(records(run), "shard", 1, 0), signal.SIGKILL)
        # Then, after the recovery and a checkpoint of the new attempt, a worker dies.
        wait_for(run, proc, done_after(1, 6), "a checkpoint after the first recovery")
        os.kill(pid_of(records(run), "worker", 1, 1), signal.SIGKILL)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = {"stdout": (tmp_path / "out").read_text(), "stderr": (tmp_path / "err").read_text()}
    assert proc.returncode == 0, out.get("stderr", "")[-3000:]
    assert last_json(out["stdout"])["step"] == 18
    recs = records(run)
    first, second = [r for r in recs if r["kind"] == "recovery"]
    assert "memory shard 1 died" in first["cause"]  # names what died
    assert first["from_step"] >= 3 and second["from_step"] >= 6
    for r in (first, second):  # the steps after the checkpoint were trained again
        assert r["steps_redone"] == r["failed_after_step"] - r["from_step"] >= 0
        assert r["seconds"] > 0
    assert f"went back to step {first['from_step']}" in out["stderr"]
    # Every step is trained, the last attempt's record of each is the one that counts.
    steps = [r["step"] for r in recs if r["kind"] == "train" and r.get("attempt") == 2]
    assert steps == list(range(second["from_step"] + 1, 19))
    # The model ends as a run resumed from the first recovery's checkpoint, without failures.
    ref = tmp_path / "ref"
    memdist("train", *RUN, *data, "--set", "train.steps=18", "--resume", first["uri"],
            "--checkpoint-dir", str(tmp_path / "ck-ref"), "--run-dir", str(ref), cwd=tmp_path)  # fmt: skip
    want, got = losses_by_step(records(ref)), losses_by_step(recs)
    assert sorted(want) == list(range(first["from_step"] + 1, 19))
    assert {s: got[s] for s in want} == want


@pytest.mark.slow
def test_a_failure_before_any_checkpoint_fails_the_run_naming_what_died(tmp_path):
    """With nothing to go back to, Ray Train's restarts end in a clear error."""
    run = tmp_path / "run"
    proc = start(tmp_path, *RUN, "--workers", "1", "--set", f"data.cache_dir={tmp_path}",
                 "--set", "train.steps=400", "--set", "train.checkpoint.every=300", "--max-failures", "1",
                 "--checkpoint-dir", str(tmp_path / "ck"), "--run-dir", str(run))  # fmt: skip
    try:
        wait_for(run, proc, lambda recs: [r for r in recs if r["kind"] == "train"], "a step")
        os.kill(pid_of(records(run), "shard", 0, 0), signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "err").read_text()
    assert proc.returncode == 2 and "Traceback" not in err
    assert "memory shard 0 died" in err and "no checkpoint to go back to" in err
    assert "after 1 restarts (cluster.max_failures=1)" in err
