"""Prefetch benchmark: training with zarr-backed shards whose row cache holds a fraction
of their rows (a quarter by default), with and without hinting the next batch's rows,
against in-memory shards.

Every layout trains the same config end to end through ``memdist.train.train`` on a
local Ray instance (2 Ray shard actors, row plan, 262144 x 128 table, batch x 128
tokens per step). With ``shards.prefetch`` each step runs the next batch's forward up
to the memory layer's top-k and sends those rows to the shards, which load them while
the worker goes on; ``in_memory_shards_hints`` sends the same hints to shards that have
nothing to load, which isolates what computing the hints costs. Reported: tokens/s
after warm-up and its ratio to the in-memory shards (the peer, in the same run), the
share of step time the worker waited on the shards, and the caches' counters (rows
read at lookups, rows prefetched and then read, evictions, write-backs).

    python benchmarks/bench_prefetch.py [--steps N] [--budget-fraction F] [--batch-size B] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_workers import measure
from report import machine, versions, write

ROWS, DIM, SHARDS = 512**2, 128, 2
REGION_MB = ROWS // SHARDS * DIM * 4 * 3 / 2**20  # values + Adam's two moments


def layouts(fraction: float) -> dict[str, list[str]]:
    budget = f"shards.budget_mb={REGION_MB * fraction}"
    return {
        "in_memory_shards": [],
        "in_memory_shards_hints": ["shards.prefetch=true"],  # the hints' cost: nothing to load
        "cache": [budget],
        "cache_prefetch": [budget, "shards.prefetch=true"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layouts"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["layout"].replace("_", "\n") for r in rows]
    tps = [r["tokens_per_s"] for r in rows]
    ax.bar(names, tps, label="tokens/s")
    ax.bar(names, [r["memory_wait_share"] * t for r, t in zip(rows, tps, strict=True)],
           label="part of the step spent waiting on shards", alpha=0.7)  # fmt: skip
    for i, r in enumerate(rows):
        ax.text(i, tps[i], f"{r['ratio_to_in_memory']:.2f}x", ha="center", va="bottom")
    ax.set_ylim(0, 1.3 * max(tps))
    ax.set_ylabel("training tokens/s")
    ax.legend()
    cached = [r for r in rows if "cache" in r]
    steps = [r["steps"] for r in cached]
    x = range(len(cached))
    bx.bar([i - 0.2 for i in x], [r["cache"]["cache_misses"] / s for r, s in zip(cached, steps,
           strict=True)], width=0.4, label="rows read at lookups (misses)")  # fmt: skip
    bx.bar([i + 0.2 for i in x], [r["cache"]["prefetched"] / s for r, s in zip(cached, steps,
           strict=True)], width=0.4, label="rows read ahead (prefetched)")  # fmt: skip
    bx.set_xticks(list(x), [r["layout"].replace("_", " ") for r in cached])
    bx.set_ylabel("zarr rows read per step (both shards)")
    bx.set_ylim(0, 1.4 * max(r["cache"]["cache_misses"] + r["cache"]["prefetched"] for r in cached)
                / min(steps))  # fmt: skip
    bx.legend(loc="upper center")
    fig.suptitle(f"{ROWS} x {DIM} table in {SHARDS} shards, {result['machine']['cpu_count']} "
                 "CPU cores")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--budget-fraction", type=float, default=0.25,
                   help="each shard's row cache as a fraction of its region")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="rows of 128 tokens per step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    warmup = max(1, args.steps // 6)
    common = [f"train.steps={args.steps}", "train.max_minutes=null", "train.log_every=5",
              "eval.max_qa=16", "eval.ppl_batches=1", "model.memory.n_keys=512",
              f"data.batch_size={args.batch_size}", f"shards.count={SHARDS}",
              "shards.plan=row"]  # fmt: skip
    started = time.time()
    runs = [
        measure(name, extra, common, warmup)
        for name, extra in layouts(args.budget_fraction).items()
    ]
    base = runs[0]["tokens_per_s"]
    for r in runs:
        r["ratio_to_in_memory"] = r["tokens_per_s"] / base
    result = {
        "benchmark": "prefetch",
        "machine": machine(),
        "versions": versions("ray", "deepspeed", "zarr"),
        "config": {
            "name": "small",
            "overrides": common,
            "rows": ROWS,
            "dim": DIM,
            "region_mb": REGION_MB,
            "budget_fraction": args.budget_fraction,
            "steps": args.steps,
            "warmup_steps_skipped": warmup,
            "peer": "in_memory_shards",
        },  # fmt: skip
        "layouts": runs,
        "seconds": time.time() - started,
    }
    ray.shutdown()
    return write(result, args.out, "prefetch", plot)


if __name__ == "__main__":
    main()
