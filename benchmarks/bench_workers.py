"""Data-parallel benchmark: tokens/s of 1 and 2 backbone workers sharing 2 memory shards,
over the Ray and the collective transport.

Each layout trains the same config end to end through ``memdist.train.train`` (as
``memdist train`` does) on a local Ray instance, and the figures come from the run's
own records: tokens/s of the train records after warm-up, the share of step time the
workers waited on the shards (workers' timers), and the shards' kernel time (shards'
timers). The peer is one process with a local table, measured in the same run; every
layout is reported as a ratio to it.

With ``--far`` the shards run on another node than the worker: a two-node Ray cluster on
this machine (``ray.cluster_utils.Cluster``, the second node offering ``memdist_shard``),
one worker and 2 shards with the direct lines (TCP) and with Ray's actor calls
(``shards.direct_lines=false``), each layout ``--rounds`` times in alternation.

    python benchmarks/bench_workers.py [--steps N] [--far [--rounds R]] [--out DIR]
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


FAR_LAYOUTS = {
    "local_table_1_process": ["shards.count=0"],
    "1_worker_2_far_shards_direct_lines": ["shards.count=2", "shards.direct_lines=true"],
    "1_worker_2_far_shards_ray_calls": ["shards.count=2", "shards.direct_lines=false"],
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
    if cfg.shards.count:  # (a local table leaves its counters too, without shards' waits)
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
    fig, ax = plt.subplots(figsize=(max(10, 1.9 * len(rows)), 4.5))
    names = [r["layout"].replace("_shards_", " shards\n").replace("_", " ")
             + (f"\nround {r['round']}" if "round" in r else "") for r in rows]  # fmt: skip
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
    p.add_argument("--far", action="store_true", help="shards on another node (2-node cluster)")
    p.add_argument("--rounds", type=int, default=2, help="with --far: alternating rounds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import ray

    cluster = None
    if args.far:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False})
        cluster.add_node(num_cpus=0, resources={"memdist_shard": 4})  # start_shards puts them here
        cluster.wait_for_nodes()
    ray.init(address=cluster.address if cluster else "local", include_dashboard=False,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    warmup = max(1, args.steps // 6)
    # Same global batch (16 x 128 tokens) for every layout: 2 workers take 8 rows each.
    common = [f"train.steps={args.steps}", "train.max_minutes=null", "train.log_every=5",
              "eval.max_qa=16", "eval.ppl_batches=1"]  # fmt: skip
    started = time.time()
    layouts = []
    for rnd in range(args.rounds if args.far else 1):
        runs = []
        for name, overrides in (FAR_LAYOUTS if args.far else LAYOUTS).items():
            if name.startswith("2_workers"):
                overrides = overrides + ["data.batch_size=8"]
            runs.append(measure(name, overrides, common, warmup))
            if args.far:
                runs[-1]["round"] = rnd
        for r in runs:  # against the local table of the same round
            r["ratio_to_local"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
        layouts += runs
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
            "shards_on_another_node": args.far,
        },  # fmt: skip
        "layouts": layouts,
        "seconds": time.time() - started,
    }
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return write(result, args.out, "workers_far" if args.far else "workers", plot)


if __name__ == "__main__":
    main()
