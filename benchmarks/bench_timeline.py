"""Where a step through Ray shards on the worker's machine spends its time: a timeline.

Lookup + backward + step of 2048 x 64 lookups into 65536 x 128 rows (Adam), as
``bench_sharded.py --only tables`` times them, one step at a time, through 2 Ray shard
actors (``--plan`` row or column), each step followed by one of the local table (the
peer). Every shard records when each request's kernel ran (its ``handle``) and the
worker when it sent and waited, on the clock all processes on a machine share
(``time.perf_counter``, CLOCK_MONOTONIC). Per step, medians over the steps:

- ``kernel_ms``: each shard's time in its kernels, by request (Lookup, KeptBackward, Step);
- ``to_kernel_ms``: from the worker's send ending (or the shard's kernel before ending,
  if later) to the shard's kernel starting;
- ``to_worker_ms``: from the later shard's kernel ending to the worker's wait ending;
- ``worker_ms``: the worker's own part (before the lookup's send; each send; between the
  lookup's reply and the backward's send);
- ``step_ms`` and ``local_step_ms``, and their ratio ``vs_local``.

The plot draws the median step. ``--plan``, ``--steps``, ``--out``::

    python benchmarks/bench_timeline.py [--plan row|column] [--steps 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_sharded import ADAM, one_pass, workload
from report import machine, versions, write

from memdist.cluster.plan import make_plan
from memdist.remote import RemoteTable
from memdist.transport import RayTransport
from memdist.values import LocalTable

PHASES = {"Lookup": "lookup", "KeptBackward": "backward", "Step": "step"}  # request: wait


def _record_kernels(actor: Any) -> bool:
    """Run in a shard actor (``__ray_call__``): its ``handle`` notes each request's kernel."""
    actor._kernels = []
    handle = actor.handle

    def timed(req: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return handle(req)
        finally:
            actor._kernels.append((type(req).__name__, t0, time.perf_counter()))

    actor.handle = timed
    return True


def _kernels(actor: Any) -> list[tuple[str, float, float]]:
    out, actor._kernels = actor._kernels, []
    return out


def _record_worker(transport: RayTransport, events: list[tuple[str, float, float]]) -> None:
    """The worker's sends and waits on ``transport``, noted in ``events``."""
    submit_all, wait = transport.submit_all, transport.wait

    def timed_submit_all(reqs: Any) -> Any:
        t0 = time.perf_counter()
        out = submit_all(reqs)
        events.append(("send " + type(reqs[0]).__name__, t0, time.perf_counter()))
        return out

    def timed_wait(handles: Any, what: str) -> Any:
        t0 = time.perf_counter()
        out = wait(handles, what)
        events.append(("wait " + what, t0, time.perf_counter()))
        return out

    transport.submit_all, transport.wait = timed_submit_all, timed_wait  # type: ignore[method-assign]


def _within(
    events: list[tuple[str, float, float]], t0: float, t1: float
) -> dict[str, tuple[float, float]]:
    return {name: (a, b) for name, a, b in events if t0 <= a <= t1}


def measure(plan_kind: str, steps: int) -> dict[str, Any]:
    import ray

    from memdist.cluster.actors import start_shards, stop_shards

    rows, dim, tokens, bag = 65536, 128, 2048, 64
    batches = [workload(rows, tokens, bag, dim, seed) for seed in range(3)]
    plan = make_plan(plan_kind, rows, dim, 2)
    actors = start_shards(plan, ADAM, seed=0)
    transport = RayTransport(actors)
    table, local = RemoteTable(plan, transport, ADAM), LocalTable(rows, dim, ADAM, seed=0)
    for t in (table, local):  # warm-up
        one_pass(t, batches)
    ray.get([a.__ray_call__.remote(_record_kernels) for a in actors])
    worker: list[tuple[str, float, float]] = []
    _record_worker(transport, worker)
    spans, local_s = [], []
    for i in range(steps):
        batch = [batches[i % len(batches)]]
        t0 = time.perf_counter()
        one_pass(table, batch)
        spans.append((t0, time.perf_counter()))
        local_s.append(one_pass(local, batch))
    kernels = ray.get([a.__ray_call__.remote(_kernels) for a in actors])
    stop_shards(actors)

    per: dict[str, list[float]] = collections.defaultdict(list)
    for t0, t1 in spans:
        w = _within(worker, t0, t1)
        per["step_ms"].append(t1 - t0)
        per["worker_ms/before the lookup's send"].append(w["send Lookup"][0] - t0)
        per["worker_ms/between the lookup's reply and the backward's send"].append(
            w["send KeptBackward"][0] - w["wait lookup"][1]
        )
        for req in ("Lookup", "KeptBackward", "Step"):
            if f"send {req}" in w:
                per[f"worker_ms/send {req}"].append(w[f"send {req}"][1] - w[f"send {req}"][0])
        ks = [_within(shard, t0, t1) for shard in kernels]
        for s, k in enumerate(ks):
            ready = t0  # when this shard could start its next request
            for req in PHASES:
                a, b = k[req]
                per[f"kernel_ms/shard {s} {req}"].append(b - a)
                # the step goes behind the backward (sent ahead), else its own send
                sent = w[f"send {req}"][1] if f"send {req}" in w else w["send KeptBackward"][1]
                per[f"to_kernel_ms/shard {s} {req}"].append(a - max(sent, ready))
                ready = b
        for req, what in PHASES.items():  # from the last shard's kernel to the worker
            per[f"to_worker_ms/{req}"].append(w[f"wait {what}"][1] - max(k[req][1] for k in ks))
    out: dict[str, Any] = {}
    for key, values in per.items():
        group, _, name = key.rpartition("/")
        ms = statistics.median(values) * 1e3
        if group:
            out.setdefault(group, {})[name] = ms
        else:
            out[key] = ms
    out["local_step_ms"] = statistics.median(local_s) * 1e3
    out["vs_local"] = out["step_ms"] / out["local_step_ms"]
    middle = sorted(spans, key=lambda s: s[1] - s[0])[len(spans) // 2]
    out["median_step"] = sorted(
        [("worker " + n, a, b) for n, (a, b) in _within(worker, *middle).items()]
        + [(f"shard {s} {n}", a, b) for s, k in enumerate(kernels) for n, (a, b) in _within(k, *middle).items()],
        key=lambda e: e[1],
    )  # fmt: skip
    out["median_step"] = [
        (n, (a - middle[0]) * 1e3, (b - middle[0]) * 1e3) for n, a, b in out["median_step"]
    ]
    out["median_step_ms"] = (middle[1] - middle[0]) * 1e3
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = result["timeline"]["median_step"]
    lanes = ["worker", "shard 0", "shard 1"]
    colors = {"Lookup": "tab:blue", "KeptBackward": "tab:orange", "Step": "tab:green",
              "lookup": "tab:blue", "backward": "tab:orange", "step": "tab:green"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 3))
    for name, a, b in events:
        lane = next(i for i, who in enumerate(lanes) if name.startswith(who))
        last = name.split()[-1]
        waiting = name.startswith("worker wait")
        ax.barh(lane, b - a, left=a, color=colors.get(last, "gray"), alpha=0.35 if waiting else 0.9,
                edgecolor="black", lw=0.3)  # fmt: skip
    local = result["timeline"]["local_step_ms"]
    ax.axvline(
        local, color="red", ls="--", lw=1, label=f"local table's step ({local:.1f} ms, median)"
    )
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel(
        "ms from the step's start (worker: pale = waiting; blue lookup, orange backward, green step)"
    )
    ax.set_title(
        f"median step through 2 Ray {result['config']['plan']} shards on the worker's machine"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=("row", "column"), default="row")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    result = {
        "benchmark": "timeline",
        "machine": machine(),
        "versions": versions("ray"),
        "config": {
            "rows": 65536,
            "dim": 128,
            "tokens": 2048,
            "bag": 64,
            "shards": 2,
            "plan": args.plan,
            "steps": args.steps,
            "value_optimizer": "adam",
            "worker_threads": torch.get_num_threads(),
        },  # fmt: skip
        "timeline": measure(args.plan, args.steps),
    }
    ray.shutdown()
    return write(result, args.out, f"timeline-{args.plan}", plot)


if __name__ == "__main__":
    main()
