"""A table larger than the machine: training through zarr-backed shards whose value
table and optimizer state are at least twice the machine's RAM, against the same model
with a table that fits in memory.

Both layouts train ``small`` end to end through ``memdist.train.train`` on a local Ray
instance (2 Ray shard actors, row plan). The on-disk layout's shards keep their
regions as zarr chunk files under ``--store`` (a folder on a local disk with room for
the whole table) and hold ``--budget-mb`` of rows each in memory; the peer's shards
hold a smaller table (``--fit-n-keys``) whole in memory. Reported: tokens/s after
warm-up and its ratio to the peer (same run), the table's bytes on disk against the
machine's RAM, and what was read from the disk: the store device's sectors read during
training (``/proc/diskstats``) and the shard processes' own storage reads
(``/proc/<pid>/io``), per step, so page-cache hits are not counted as reads.

    python benchmarks/bench_beyond_ram.py --store /big/disk/folder [--n-keys 5800]
        [--fit-n-keys 2048] [--budget-mb 1024] [--steps N] [--prefetch] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench_workers import measure
from report import machine, versions, write

from memdist.errors import ConfigError

DIM, K_DIM, SHARDS = 128, 64, 2  # small's model width and key width
ROW_BYTES = DIM * 4 * 3 + 8  # values, Adam's two moments, the row's step count


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DiskReads:
    """Sectors read and written on the device holding ``folder``, sampled every second."""

    def __init__(self, folder: Path) -> None:
        st = os.stat(folder)
        self.dev = (os.major(st.st_dev), os.minor(st.st_dev))
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> tuple[int, int]:
        """(bytes read, bytes written) on the device since boot."""
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if (int(p[0]), int(p[1])) == self.dev:
                    return int(p[5]) * 512, int(p[9]) * 512
        raise ConfigError(f"device {self.dev} is not in /proc/diskstats")

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(1.0):
            self.samples.append((time.perf_counter() - t0, *self.read()))

    def __enter__(self) -> DiskReads:
        self.start = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.stop = self.read()

    def summary(self, steps: int) -> dict:
        read, written = (b - a for a, b in zip(self.start, self.stop, strict=True))
        per_s = [
            (t1, (r1 - r0) / (t1 - t0), (w1 - w0) / (t1 - t0))
            for (t0, r0, w0), (t1, r1, w1) in zip(self.samples, self.samples[1:], strict=False)
        ]
        return {"device_read_bytes": read, "device_written_bytes": written,
                "device_read_bytes_per_step": read / steps,
                "series_s_read_write_bytes_per_s": per_s}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layouts"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [f"{r['layout'].replace('_', ' ')}\n{r['table_bytes'] / 2**30:.1f} GiB,\n"
             f"{r['flops_per_token'] / 1e6:.2f}M FLOPs/token" for r in rows]  # fmt: skip
    tps = [r["tokens_per_s"] for r in rows]
    ax.bar(names, tps)
    for i, r in enumerate(rows):
        ax.text(i, tps[i], f"{r['ratio_to_fits']:.2f}x\n({r['ratio_to_fits_equal_flops']:.2f}x)",
                ha="center", va="bottom")  # fmt: skip
    ax.set_ylim(0, 1.25 * max(tps))
    ax.set_ylabel("training tokens/s (after warm-up)")
    ax.set_xlabel("x: vs fits in memory (vs its equal-FLOPs twin)")
    ax.set_title(f"table vs RAM ({result['config']['ram_bytes'] / 2**30:.1f} GiB)")
    for r in rows:
        series = r["disk"]["series_s_read_write_bytes_per_s"]
        if r["on_disk"] and series:
            t, rd, wr = zip(*series, strict=True)
            bx.plot(t, [x / 2**20 for x in rd], label=f"{r['layout']}: read")
            bx.plot(t, [x / 2**20 for x in wr], label=f"{r['layout']}: written", alpha=0.6)
    bx.set_xlabel("seconds since the run began (table creation, then training)")
    bx.set_ylabel("store device MiB/s")
    bx.set_yscale("symlog", linthresh=1.0)  # training reads are small beside creation writes
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="a folder on a local disk")
    p.add_argument("--n-keys", type=int, default=5800, help="keys per half: n_keys^2 rows")
    p.add_argument("--fit-n-keys", type=int, default=2048, help="the peer's keys per half")
    p.add_argument("--budget-mb", type=float, default=1024.0, help="each shard's row cache")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="rows of 128 tokens per step")
    p.add_argument("--prefetch", action="store_true", help="also train with shards.prefetch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    table_bytes = args.n_keys**2 * ROW_BYTES
    args.store.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.store).free
    if table_bytes * 1.02 > free:
        raise ConfigError(f"--store {args.store} has {free / 2**30:.1f} GiB free; the "
                          f"{args.n_keys}^2-row table needs {table_bytes / 2**30:.1f} GiB")  # fmt: skip
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    warmup = max(1, args.steps // 5)
    common = [f"train.steps={args.steps}", "train.max_minutes=null", "train.log_every=5",
              "eval.max_qa=16", "eval.ppl_batches=1", f"data.batch_size={args.batch_size}",
              f"shards.count={SHARDS}", "shards.plan=row", "shards.start_timeout_s=3600",
              "train.save_tables=false"]  # fmt: skip
    # The larger table scores more keys per token (product keys: 2 x sqrt(rows)); a second
    # peer spends the same forward FLOPs on wider keys (heads * k_dim * (dim + n_keys) fixed).
    k_dim = 2 * round(K_DIM * (DIM + args.n_keys) / (DIM + args.fit_n_keys) / 2)
    layouts = {
        "fits_in_memory": [f"model.memory.n_keys={args.fit_n_keys}"],
        "fits_in_memory_equal_flops": [
            f"model.memory.n_keys={args.fit_n_keys}",
            f"model.memory.k_dim={k_dim}",
        ],  # fmt: skip
    }
    disk = [f"model.memory.n_keys={args.n_keys}", f"shards.budget_mb={args.budget_mb}"]
    layouts["on_disk"] = disk
    if args.prefetch:
        layouts["on_disk_prefetch"] = [*disk, "shards.prefetch=true"]
    started = time.time()
    runs = []
    for name, extra in layouts.items():
        store = Path(tempfile.mkdtemp(prefix=f"memdist-{name}-", dir=args.store))
        try:
            with DiskReads(store) as reads:
                run = measure(name, [*extra, f"shards.store_dir={store}"], common, warmup)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        keys = int(extra[0].split("=")[1])
        run["table_bytes"] = keys**2 * ROW_BYTES
        run["on_disk"] = name.startswith("on_disk")
        run["disk"] = reads.summary(run["steps"])
        if "cache" in run:
            run["disk"]["shard_process_read_bytes_per_step"] = (
                run["cache"]["process_disk_read_bytes"] / run["steps"]
            )
        runs.append(run)
    for r in runs:
        r["ratio_to_fits"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
        r["ratio_to_fits_equal_flops"] = r["tokens_per_s"] / runs[1]["tokens_per_s"]
    result = {
        "benchmark": "beyond_ram",
        "machine": machine(),
        "versions": versions("ray", "zarr"),
        "config": {
            "name": "small",
            "overrides": common,
            "dim": DIM,
            "shards": SHARDS,
            "n_keys": args.n_keys,
            "fit_n_keys": args.fit_n_keys,
            "budget_mb_per_shard": args.budget_mb,
            "ram_bytes": ram_bytes(),
            "table_over_ram": table_bytes / ram_bytes(),
            "steps": args.steps,
            "warmup_steps_skipped": warmup,
            "peer": "fits_in_memory",
        },  # fmt: skip
        "layouts": runs,
        "seconds": time.time() - started,
    }
    ray.shutdown()
    return write(result, args.out, "beyond_ram", plot)


if __name__ == "__main__":
    main()
