"""Data-parallel benchmark: tokens/s of 1 and 2 backbone workers sharing 2 memory shards,
over the Ray and the collective transport.

Each layout trains the same config end to end through ``memdist.train.train`` (as
``memdist train`` does) on a local Ray instance, and the figures come from the run's
own records: tokens/s of the train records after warm-up, the share of step time the
workers waited on the shards (workers' timers), and the shards' kernel time (shards'
timers). The peer is one process with a local table, measured in the same run; every
layout is reported as a ratio to it.

    python benchmarks/bench_workers.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from report import machine, versions, write

from memdist.config import load_config
from memdist.train import train

LAYOUTS = {
    "local_table_1_process": ["shards.count=0"],
    "1_worker_2_shards": ["shards.count=2", "cluster.workers=1"],
    "2_workers_2_shards": ["shards.count=2", "cluster.workers=2"],
    "1_worker_2_shards_collective": [
        "shards.count=2",
        "cluster.workers=1",
        "shards.transport=collective",
    ],
    "2_workers_2_shards_collective": [
        "shards.count=2",
        "cluster.workers=2",
        "shards.transport=collective",
    ],
}


CACHE_COUNTERS = ("lookups", "cache_hits", "cache_misses", "prefetched", "prefetch_hits",
                  "prefetch_skipped", "evictions", "writebacks", "prefetch_ns", "store_bytes",
                  "process_disk_read_bytes")  # fmt: skip


def measure(name: str, overrides: list[str], common: list[str], warmup_steps: int) -> dict:
    cfg = load_config("small", common + overrides)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        t0 = time.perf_counter()
        final = train(cfg, Path(tmp), progress=False)
        wall = time.perf_counter() - t0
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train" and r["step"] > warmup_steps]
    shards = [s for r in records if r["kind"] == "shards" for s in r["stats"]]
    out = {
        "layout": name,
        "overrides": overrides,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in trains),
        "steps": final["step"],
        "wall_s": wall,
        "loss": final["loss"],
        "flops_per_token": final.get("flops_per_token"),
    }
    if shards:
        seconds = final["tokens"] / final["tokens_per_s"]  # time spent in training steps
        out["memory_wait_share"] = statistics.mean(r["memory_wait_share"] for r in trains)
        out["shard_kernel_s"] = [s["kernel_ns"] / 1e9 for s in shards]
        out["shard_busy_share"] = [s["kernel_ns"] / 1e9 / seconds for s in shards]
        out["shard_bytes_per_token"] = (
            sum(s["bytes_in"] + s["bytes_out"] for s in shards) / (final["tokens"])
        )
        if any(s["cached"] for s in shards):  # zarr-backed shards: the row caches' counters
            out["cache"] = {k: sum(s.get(k) or 0 for s in shards) for k in CACHE_COUNTERS}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layouts"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["layout"].replace("_shards_", " shards\n").replace("_", " ") for r in rows]
    tps = [r["tokens_per_s"] for r in rows]
    wait = [r.get("memory_wait_share", 0.0) * r["tokens_per_s"] for r in rows]
    ax.bar(names, tps, label="tokens/s")
    ax.bar(names, wait, label="part of the step spent waiting on shards", alpha=0.7)
    for i, r in enumerate(rows):
        ax.text(i, tps[i], f"{r['ratio_to_local']:.2f}x", ha="center", va="bottom")
    ax.set_ylim(0, 1.3 * max(tps))  # room for the legend above the bars
    ax.set_ylabel("training tokens/s (global)")
    ax.set_title(f"small config, {result['machine']['cpu_count']} CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    warmup = max(1, args.steps // 6)
    # Same global batch (16 x 128 tokens) for every layout: 2 workers take 8 rows each.
    common = [f"train.steps={args.steps}", "train.max_minutes=null", "train.log_every=5",
              "eval.max_qa=16", "eval.ppl_batches=1"]  # fmt: skip
    started = time.time()
    layouts = []
    for name, overrides in LAYOUTS.items():
        if name.startswith("2_workers"):
            overrides = overrides + ["data.batch_size=8"]
        layouts.append(measure(name, overrides, common, warmup))
    base = layouts[0]["tokens_per_s"]
    for r in layouts:
        r["ratio_to_local"] = r["tokens_per_s"] / base
    result = {
        "benchmark": "workers",
        "machine": machine(),
        "versions": versions("ray", "deepspeed"),
        "config": {
            "name": "small",
            "steps": args.steps,
            "warmup_steps_skipped": warmup,
            "global_batch_rows": 16,
            "seq_len": 128,
            "zero_stage": 0,
            "peer": "local_table_1_process",
        },  # fmt: skip
        "layouts": layouts,
        "seconds": time.time() - started,
    }
    ray.shutdown()
    return write(result, args.out, "workers", plot)


if __name__ == "__main__":
    main()
