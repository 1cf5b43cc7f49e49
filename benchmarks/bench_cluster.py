"""A run on an autoscaling cluster that loses a shard, a worker and a node: how long
scaling up takes, how long each recovery stands training still, and how many steps are
lost (none may be: the steps after a checkpoint are trained again).

The cluster is Ray's fake multi-node provider on this machine (``memdist.cluster.fake``):
real Ray processes per node, the real autoscaler, token authentication on. One
``memdist train --address`` run with 2 workers and 2 shards on memory nodes, checkpoints
every few steps and ``--max-failures 3``: after a checkpoint the benchmark SIGKILLs shard
1's process, after the next a worker's, after the next every process of shard 0's node.
It then trains the reference, a run resumed from the last recovery's checkpoint on a
local instance, and compares their losses, and waits for the idle memory nodes to go.

    python benchmarks/bench_cluster.py --out benchmarks/reports --name DATE-cpu-2core-cluster
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import machine, versions, write

from memdist.cluster.fake import FakeCluster, kill_node

TINY = ["--set", "model.dim=32", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
        "--set", "model.memory.layers=[1]", "--set", "model.memory.n_keys=16",
        "--set", "model.memory.knn=4", "--set", "model.memory.k_dim=16",
        "--set", "data.n_people=20", "--set", "data.seq_len=32", "--set", "data.batch_size=4",
        "--set", "train.log_every=1", "--set", "train.eval_every=0",
        "--set", "optim.warmup_steps=2", "--set", "eval.max_qa=8",
        "--set", "eval.max_new_tokens=4", "--shards", "2", "--plan", "row", "--workers", "2",
        "--set", "train.checkpoint.keep=100", "--no-progress"]  # fmt: skip


class Watch:
    """The run's metrics.jsonl as it grows, each record stamped with when it was seen."""

    def __init__(self, run: Path, proc: subprocess.Popen, t0: float) -> None:
        self.path, self.proc, self.t0 = run / "metrics.jsonl", proc, t0
        self.seen: list[dict] = []

    def poll(self) -> list[dict]:
        if self.path.is_file():
            lines = [x for x in self.path.read_text().splitlines() if x.endswith("}")]
            for line in lines[len(self.seen) :]:
                self.seen.append({**json.loads(line), "_t": time.monotonic() - self.t0})
        return self.seen

    def until(self, test, what: str, timeout_s: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [r for r in self.poll() if test(r)]
            if hits:
                return hits[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {self.proc.returncode}) before {what}")
            time.sleep(0.1)
        raise RuntimeError(f"no {what} within {timeout_s:g} s")


def checkpoint_of(attempt: int):
    return lambda r: r["kind"] == "checkpoint_done" and r.get("attempt", 0) == attempt


def placed(recs: list[dict], role: str, index: int, attempt: int) -> dict:
    key = "shard" if role == "shard" else "worker"
    return next(r for r in recs if r["kind"] == "placement" and r["role"] == role
                and r[key] == index and r.get("attempt", 0) == attempt)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--every", type=int, default=3, help="steps between checkpoints")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="cluster")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memdist-bench-cluster-"))
    run, data = work / "run", ["--set", f"data.cache_dir={work / 'data'}"]
    common = [*TINY, *data, "--set", f"train.steps={args.steps}",
              "--set", f"train.checkpoint.every={args.every}"]  # fmt: skip
    load_start = os.getloadavg()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}  # fmt: skip
    faults = []
    with FakeCluster(work / "cluster", env=env) as cluster:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "memdist.cli", "train", *common, "--address", cluster.address,
             "--set", "shards.memory_nodes=true", "--max-failures", "3",
             "--checkpoint-dir", str(work / "ck"), "--run-dir", str(run)],
            env=cluster.env, stdout=(work / "out").open("w"), stderr=(work / "err").open("w"),
        )  # fmt: skip
        watch = Watch(run, proc, t0)
        shards_up = watch.until(lambda r: r["kind"] == "placement" and r["role"] == "shard",
                                "shards placed")["_t"]  # fmt: skip
        first_step = watch.until(lambda r: r["kind"] == "train", "a first step")["_t"]
        memory_nodes_up = cluster.nodes("memory_node")
        for attempt, what in enumerate(("shard 1 (its process)", "worker 1 (its process)",
                                        "the node of shard 0 (every process)")):  # fmt: skip
            watch.until(checkpoint_of(attempt), f"a checkpoint of attempt {attempt}")
            recs = watch.poll()
            if what.startswith("shard"):
                os.kill(placed(recs, "shard", 1, 0)["pid"], signal.SIGKILL)
            elif what.startswith("worker"):
                os.kill(placed(recs, "worker", 1, attempt)["pid"], signal.SIGKILL)
            else:
                kill_node(placed(recs, "shard", 0, 0)["node"])
            t_kill = time.monotonic() - t0
            rec = watch.until(lambda r, a=attempt: r["kind"] == "recovery"
                              and r.get("attempt") == a + 1, f"recovery {attempt + 1}")  # fmt: skip
            resumed = watch.until(lambda r, a=attempt: r["kind"] == "train"
                                  and r.get("attempt") == a + 1, "a step after it")  # fmt: skip
            faults.append({"killed": what, "at_s": round(t_kill, 2),
                           "training_again_after_s": round(resumed["_t"] - t_kill, 2),
                           "stood_still_s": rec["seconds"], "from_step": rec["from_step"],
                           "failed_after_step": rec["failed_after_step"],
                           "steps_redone": rec["steps_redone"], "cause": rec["cause"]})  # fmt: skip
        code = proc.wait(timeout=900)
        t_end = time.monotonic()
        while cluster.nodes("memory_node") and time.monotonic() - t_end < 300:
            time.sleep(1)
        idle_removed_s = time.monotonic() - t_end
    recs = watch.poll()
    final = [r for r in recs if r["kind"] == "train"]
    latest = {r["step"]: r["loss"] for r in final}
    ref = work / "ref"
    last = [r for r in recs if r["kind"] == "recovery"][-1]["uri"]
    subprocess.run(
        [sys.executable, "-m", "memdist.cli", "train", *common, "--resume", last,
         "--checkpoint-dir", str(work / "ck-ref"), "--run-dir", str(ref)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    want = {r["step"]: r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text()
                                                  .splitlines()) if r["kind"] == "train"}  # fmt: skip
    result = {
        "benchmark": "cluster",
        "machine": machine(),
        "versions": versions("ray", "deepspeed", "zarr"),
        "config": {
            "steps": args.steps,
            "checkpoint_every": args.every,
            "workers": 2,
            "shards": 2,
            "provider": "fake_multinode",
            "max_failures": 3,
        },
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "exit_code": code,
        "scale_up": {
            "shards_placed_s": round(shards_up, 2),
            "first_step_s": round(first_step, 2),
            "memory_nodes": memory_nodes_up,
        },
        "faults": faults,
        "steps_trained": sorted(latest) == list(range(1, args.steps + 1)),
        "steps_lost": args.steps - len(latest),
        "steps_redone": len(final) - len(latest),
        "losses_equal_resumed_reference": all(latest[s] == v for s, v in want.items()),
        "reference_steps": [min(want), max(want)],
        "idle_memory_nodes_removed_s": round(idle_removed_s, 1),
        "timeline": [(r["_t"], r["step"], r.get("attempt", 0)) for r in final],
    }
    return write(result, args.out, args.name, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for attempt in sorted({a for _, _, a in result["timeline"]}):
        pts = [(t, s) for t, s, a in result["timeline"] if a == attempt]
        ax.plot(*zip(*pts, strict=True), ".", label=f"attempt {attempt}")
    for f in result["faults"]:
        ax.axvline(f["at_s"], color="red", alpha=0.5)
        ax.text(f["at_s"], 1, f" {f['killed'].split(' (')[0]} killed", rotation=90,
                va="bottom", fontsize=8)  # fmt: skip
    ax.set_xlabel("seconds since the run started (when metrics.jsonl showed the step)")
    ax.set_ylabel("step")
    ax.set_title("steps over time: every fault goes back to the last checkpoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
