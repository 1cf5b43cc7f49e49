"""Checkpoint throughput: saving and loading a value table to a folder and to S3.

For a table of ``--rows`` x ``--dim`` with lazy Adam state (values, two moments and a
step count per row), in a local table and in Ray shards (each writes its own region),
to a folder and to an S3 endpoint (moto's server on loopback, in memory):

- MB/s of a full save and of its load, against a plain ``shutil.copytree`` of the same
  bytes in the same run;
- an incremental save after a step that changed ``--touch`` of the rows: its bytes as a
  fraction of the full save's, its MB/s, and the load of the chain (full + delta);
- the training step during a save: steps (lookup, backward, step over a batch of
  ``--tokens`` x 32 rows) run while the full save is written in the background, their
  mean time as a ratio to the same steps without a save, and how long ``begin_save``
  (the snapshot) held training up.

    python benchmarks/bench_checkpoint.py [--rows 1048576] [--dim 64] [--layouts local,shards]
        [--targets folder,s3] [--touch 0.01] [--out DIR]
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
from memdist.storage.table_store import Source
from memdist.storage.targets import FolderTarget, S3Target
from memdist.transport import RayTransport
from memdist.values import LocalTable

ADAM = OptimizerSpec("adam", lr=1e-3)


def s3_endpoint():
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

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


def train_step(table, g: torch.Generator, rows: int, tokens: int) -> None:
    idx = torch.randint(0, rows, (tokens, 32), generator=g)
    scores = torch.rand(idx.shape, generator=g).requires_grad_(True)
    table.lookup(idx, scores).sum().backward()
    table.step()


def touch_some_rows(table, rows: int, fraction: float) -> int:
    """One step over ``fraction`` of the rows (distinct, random); returns how many."""
    g = torch.Generator().manual_seed(1)
    chosen = torch.randperm(rows, generator=g)[: max(1, int(rows * fraction))]
    for start in range(0, chosen.numel(), 65536):
        idx = chosen[start : start + 65536].view(-1, 1)
        table.lookup(idx, torch.rand(idx.shape, generator=g).requires_grad_(True)).sum().backward()
    table.step()
    return int(chosen.numel())


def mb(objects: dict) -> float:
    return sum(o["size"] for o in objects.values()) / 2**20


def measure(table, target, label: str, rows: int, touch: float, tokens: int) -> dict:
    t0 = time.perf_counter()
    full = table.save(target.child("full"), "t")
    save_s = time.perf_counter() - t0
    chain = [Source(target.child("full"), full)]
    load_s = timed(lambda: table.load(chain, "t"))
    touched = touch_some_rows(table, rows, touch)
    t0 = time.perf_counter()
    delta = table.save(target.child("delta"), "t", changed_only=True)
    delta_s = time.perf_counter() - t0
    chain.append(Source(target.child("delta"), delta))
    chain_s = timed(lambda: table.load(chain, "t"))
    # Steps while a full save is written, against the same steps without one.
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # warm up
        train_step(table, g, rows, tokens)
    quiet = [timed(lambda: train_step(table, g, rows, tokens)) for _ in range(10)]
    t0 = time.perf_counter()
    pending = table.begin_save(target.child("during"), "t")
    begin_s = time.perf_counter() - t0
    during = []
    while not all(p["done"] for p in pending.progress()):
        during.append(timed(lambda: train_step(table, g, rows, tokens)))
    pending.result()
    background_s = time.perf_counter() - t0
    step_s, step_during_s = sum(quiet) / len(quiet), sum(during) / max(1, len(during))
    return {"layout": label, "MB": mb(full), "save_s": save_s, "load_s": load_s,
            "save_MBps": mb(full) / save_s, "load_MBps": mb(full) / load_s,
            "touched_rows": touched, "touched_fraction": touched / rows,
            "delta_MB": mb(delta), "delta_bytes_vs_full": mb(delta) / mb(full),
            "delta_save_s": delta_s, "delta_save_MBps": mb(delta) / delta_s,
            "chain_load_s": chain_s, "step_s": step_s, "steps_during_save": len(during),
            "step_during_save_s": step_during_s, "step_during_vs_quiet": step_during_s / step_s,
            "begin_save_s": begin_s, "background_save_s": background_s}  # fmt: skip


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
    ap.add_argument("--layouts", default="local,shards", help="local, shards or both")
    ap.add_argument("--targets", default="folder,s3", help="folder, s3 or both")
    ap.add_argument("--touch", type=float, default=0.01, help="rows an incremental save holds")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of a training step")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    layouts, targets = args.layouts.split(","), args.targets.split(",")
    load_start = os.getloadavg()  # the machine may be shared: say how busy it was
    server, endpoint = s3_endpoint() if "s3" in targets else (None, None)
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="memdist-bench-ck-"))
    actors: list = []
    try:
        tables = []
        if "local" in layouts:
            local = LocalTable(args.rows, args.dim, ADAM, seed=0)
            touch_every_row(local, args.rows)
            tables.append(("local table", local))
        if "shards" in layouts:
            ensure_ray()
            plan = make_plan("row", args.rows, args.dim, args.shards)
            actors = start_shards(plan, ADAM, seed=0)
            remote = RemoteTable(plan, RayTransport(actors, timeout_s=600), ADAM)
            touch_every_row(remote, args.rows)
            tables.append((f"{args.shards} Ray shards", remote))
        for name, table in tables:
            slug = name.replace(" ", "-")
            copy = None
            for kind in targets:
                if kind == "folder":
                    target = FolderTarget(scratch / slug)
                    where = "folder"
                else:
                    target = S3Target("bench", slug, endpoint_url=endpoint)
                    where = "S3 (moto, loopback)"
                print(f"{name} -> {where} ...", flush=True)
                row = measure(table, target, f"{name} -> {where}", args.rows, args.touch,
                              args.tokens)  # fmt: skip
                if kind == "folder":
                    copy = copy_baseline(Path(target.root) / "full" / "t", scratch)
                    shutil.rmtree(Path(target.root), ignore_errors=True)
                if copy is not None:
                    row["copy_MBps"] = copy
                    row["save_vs_copy"] = row["save_MBps"] / copy
                    row["load_vs_copy"] = row["load_MBps"] / copy
                results.append(row)
                print(row, flush=True)
        if actors:
            stop_shards(actors)
    finally:
        if server is not None:
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
                "touch": args.touch,
                "step_tokens": args.tokens,
                "rows_per_token": 32,
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
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
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(rows))
    ax.bar([i - 0.3 for i in x], [r["save_MBps"] for r in rows], 0.2, label="full save")
    ax.bar([i - 0.1 for i in x], [r["load_MBps"] for r in rows], 0.2, label="full load")
    ax.bar(
        [i + 0.1 for i in x], [r["delta_save_MBps"] for r in rows], 0.2, label="incremental save"
    )
    if "copy_MBps" in rows[0]:
        ax.axhline(rows[0]["copy_MBps"], color="k", ls="--", label="plain copy (folder)")
    ax.set_xticks(list(x), [r["layout"] for r in rows], rotation=15, fontsize=7)
    ax.set_ylabel("MB/s")
    ax.legend(fontsize=7)
    ax2.bar(x, [r["step_during_vs_quiet"] for r in rows])
    ax2.axhline(1.0, color="k", ls="--")
    ax2.set_xticks(list(x), [r["layout"] for r in rows], rotation=15, fontsize=7)
    ax2.set_ylabel("step time during a background save / without")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
