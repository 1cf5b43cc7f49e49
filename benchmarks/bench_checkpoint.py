"""Checkpoint throughput: saving and loading a value table to a folder and to S3.

For a table of ``--rows`` x ``--dim`` with lazy Adam state (values, two moments and a
step count per row), in a local table and in Ray shards (each writes its own region),
to a folder and to an S3 endpoint (moto's server on loopback, in memory): MB/s of a
save and of a load, each against a plain ``shutil.copytree`` of the same bytes in the
same run. Saves are synchronous today: a training step that saves stalls for the
save's seconds.

    python benchmarks/bench_checkpoint.py [--rows 1048576] [--dim 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from report import machine, versions, write

from memdist.cluster.actors import start_shards, stop_shards
from memdist.cluster.plan import make_plan
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable
from memdist.shards import ensure_ray
from memdist.storage.targets import FolderTarget, S3Target
from memdist.transport import RayTransport
from memdist.values import LocalTable

ADAM = OptimizerSpec("adam", lr=1e-3)


def s3_endpoint():
    import boto3
    from moto.server import ThreadedMotoServer

    for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        os.environ.setdefault(var, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def touch_every_row(table, rows: int) -> None:
    """One step over all rows, so the Adam state is not all zeros (zeros compress)."""
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows, 65536):
        idx = torch.arange(start, min(start + 65536, rows)).view(-1, 1)
        scores = torch.rand(idx.shape, generator=g).requires_grad_(True)
        table.lookup(idx, scores).sum().backward()
    table.step()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(table, target, label: str) -> dict:
    t0 = time.perf_counter()
    objects = table.save(target, "t")
    seconds = time.perf_counter() - t0
    nbytes = sum(o["size"] for o in objects.values())
    load = timed(lambda: table.load(target, "t", objects))
    return {"layout": label, "bytes": nbytes, "save_s": seconds, "load_s": load,
            "save_MBps": nbytes / 2**20 / seconds, "load_MBps": nbytes / 2**20 / load}  # fmt: skip


def copy_baseline(folder: Path, scratch: Path) -> float:
    """MB/s of a plain copy of a saved checkpoint folder (the same files)."""
    nbytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    dst = scratch / "copy"
    seconds = timed(lambda: shutil.copytree(folder, dst))
    shutil.rmtree(dst)
    return nbytes / 2**20 / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2**20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    server, endpoint = s3_endpoint()
    ensure_ray()
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="memdist-bench-ck-"))
    try:
        local = LocalTable(args.rows, args.dim, ADAM, seed=0)
        touch_every_row(local, args.rows)
        plan = make_plan("row", args.rows, args.dim, args.shards)
        actors = start_shards(plan, ADAM, seed=0)
        remote = RemoteTable(plan, RayTransport(actors, timeout_s=600), ADAM)
        touch_every_row(remote, args.rows)
        for name, table in (("local table", local), (f"{args.shards} Ray shards", remote)):
            folder = FolderTarget(scratch / name.replace(" ", "-"))
            row = measure(table, folder, f"{name} -> folder")
            row["copy_MBps"] = copy_baseline(Path(folder.root) / "t", scratch)
            row["save_vs_copy"] = row["save_MBps"] / row["copy_MBps"]
            row["load_vs_copy"] = row["load_MBps"] / row["copy_MBps"]
            results.append(row)
            s3 = S3Target("bench", name.replace(" ", "-"), endpoint_url=endpoint)
            row = measure(table, s3, f"{name} -> S3 (moto, loopback)")
            row["copy_MBps"] = results[-1]["copy_MBps"]
            row["save_vs_copy"] = row["save_MBps"] / row["copy_MBps"]
            row["load_vs_copy"] = row["load_MBps"] / row["copy_MBps"]
            results.append(row)
        stop_shards(actors)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    table_bytes = args.rows * args.dim * 4
    write(
        {
            "benchmark": "checkpoint",
            "machine": machine(),
            "versions": versions("zarr", "boto3", "moto", "ray"),
            "config": {
                "rows": args.rows,
                "dim": args.dim,
                "optimizer": "adam",
                "table_MB": table_bytes / 2**20,
                "shards": args.shards,
            },
            "results": results,
        },  # fmt: skip
        args.out,
        "checkpoint",
        plot,
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["save_MBps"] for r in rows], 0.4, label="save")
    ax.bar([i + 0.2 for i in x], [r["load_MBps"] for r in rows], 0.4, label="load")
    ax.axhline(rows[0]["copy_MBps"], color="k", ls="--", label="plain copy (folder)")
    ax.set_xticks(list(x), [r["layout"] for r in rows], rotation=15, fontsize=7)
    ax.set_ylabel("MB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
