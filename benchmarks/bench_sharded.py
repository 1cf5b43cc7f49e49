"""Sharded memory benchmark: what shards cost against a local table, in the same run.

Six measurements, one JSON object (machine, versions, config, results):

1. ``tables``: lookup + backward + sparse step per token for a local table and for
   RemoteTables with M shards (row and column plans; in-process, Ray and collective
   transports), as a ratio to the local table (``vs_local``: timed first and last, the
   faster; ``vs_local_interleaved``: the local table timed in alternation with each
   layout, medians, which a machine shared with other tenants skews least; also lower
   quartiles and fastest passes); bytes moved per token from the shards' own counters;
   CPU ms a step of the worker's process, of the shard actors' and of the local table's
   (where the time goes when they share the cores). ``--repeats`` passes per layout.
2. ``pin``: 2 Ray shards pinned to cores of their own (``shards.pin_cores``) against 2
   that are not and the local table, taking turns (``5 x --repeats`` rounds).
3. ``clip``: 2 Ray shards with the values' gradient clipped: the norm's requests sent
   behind the backward (the step announced, as training does) against at the step.
4. ``cache``: the same for one shard whose zarr-backed region is 4x its row cache,
   against the in-memory shard.
5. ``model_steps``: a full training step of the small model (local table, SGD
   values) for tables of 64K, 1M (and with ``--big`` 16M) rows at equal FLOPs
   (``k_dim`` shrinks as the product keys grow): the step time should stay flat
   while parameters grow.
6. ``far``: 2 Ray shards (row and column plans) on another node than the worker, a
   two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): their ordered
   requests on TCP lines (``shards.direct_lines``, the default) against Ray's actor
   calls and object store, in alternation with each other and the local table; and one
   row shard there on 2 threads against 1 (``shards.threads_per_shard``). Both
   nodes share this machine's cores and the TCP goes over loopback, so this measures
   what each path costs the processes, not a network.

    python benchmarks/bench_sharded.py [--quick] [--big] [--repeats R] [--only PART] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import spin  # first: --spin must be in the environment before torch loads

# isort: split
import torch
from report import machine, versions, write

from memdist.cluster.plan import make_plan
from memdist.cluster.shard import ShardServer
from memdist.collective import CollectiveTransport, Rendezvous, host_store
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable
from memdist.transport import InProcessTransport, RayTransport
from memdist.values import LocalTable

ADAM = OptimizerSpec("adam", lr=1e-3)  # the values' optimizer in every table here


def workload(rows: int, tokens: int, bag: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (tokens, bag), generator=g)
    scores = torch.softmax(torch.randn(tokens, bag, generator=g), -1)
    dy = torch.randn(tokens, dim, generator=g)
    return idx, scores, dy


def one_pass(table, batches, announce: bool = True) -> float:
    """Seconds of lookup + backward + step over the batches. ``announce``: the step is
    announced before the backward, as ``memdist.step.train_step`` does (a remote table
    then sends the step, or with clipping the gradient norm, behind the backward)."""
    t0 = time.perf_counter()
    for idx, scores, dy in batches:
        s = scores.clone().requires_grad_(True)
        y = table.lookup(idx, s)
        if announce:
            table.expect_step()
        y.backward(dy)
        table.step_async().wait()
    return time.perf_counter() - t0


def time_table(table, batches, repeats: int) -> float:
    """Median seconds of lookup + backward + step over the batches."""
    times = [one_pass(table, batches) for _ in range(repeats + 1)][1:]  # the first warms up
    return statistics.median(times)


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    import psutil

    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def time_paired(table, peer, batches, repeats: int, shard_pids: list[int] | None = None):
    """Seconds of a pass of ``table`` and of ``peer``, alternating, after a warm-up pass
    of each: on a machine shared with other tenants both see the same load. Also the CPU
    seconds of this process (the worker: its threads, shards served in it) and of the
    processes ``shard_pids`` over the passes of ``table``, and this process's over
    ``peer``'s: where the time goes when they share the cores."""
    times: tuple[list[float], list[float]] = ([], [])
    cpu = {"worker": 0.0, "shards": 0.0, "peer": 0.0}
    pids = shard_pids or []
    for r in range(repeats + 1):
        for out, t in zip(times, (table, peer), strict=True):
            own, shards = time.process_time(), cpu_seconds(pids)
            sec = one_pass(t, batches)
            if not r:
                continue
            out.append(sec)
            if t is peer:
                cpu["peer"] += time.process_time() - own
            else:
                cpu["worker"] += time.process_time() - own
                cpu["shards"] += cpu_seconds(pids) - shards
    return times, cpu


def alternating(passes: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each pass's seconds over ``repeats`` rounds, taking turns within each round, after
    a round that warms them up."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    for r in range(repeats + 1):
        for name, run in passes.items():
            sec = run()
            if r:
                times[name].append(sec)
    return times


def quartile(xs: list[float]) -> float:
    """The lower quartile (the median where there are too few)."""
    return statistics.quantiles(xs, n=4)[0] if len(xs) >= 4 else statistics.median(xs)


def shard_bytes(table) -> int:
    return sum(s.get("bytes_in", 0) + s.get("bytes_out", 0) for s in table.stats())


def bench_tables(rows, dim, tokens, bag, shard_counts, transports, repeats) -> list[dict]:
    import ray

    batches, n_tokens, local = with_peer(rows, dim, tokens, bag, ADAM)
    # The peer is timed first and again last, and the faster counts: one disturbed
    # measurement of it would skew every ratio below.
    local_sec = [time_table(local, batches, repeats)]
    out = [{"impl": "local", "shards": 0, "bytes_per_token": 0.0}]
    secs = []
    for transport in transports:
        for kind in ("row", "column"):
            for m in shard_counts:
                plan = make_plan(kind, rows, dim, m)
                actors = []
                t: RayTransport | InProcessTransport | CollectiveTransport
                if transport in ("ray", "collective"):
                    from memdist.cluster.actors import start_shards, stop_shards

                    actors = start_shards(plan, ADAM, seed=0)
                    t = RayTransport(actors)
                    if transport == "collective":
                        store = host_store()  # alive until the next table replaces it
                        rdv = Rendezvous(store.host, store.port, f"{kind}{m}", m, 1)
                        ray.get([a.serve_collective.remote(rdv, s) for s, a in enumerate(actors)])
                        t = CollectiveTransport(actors, rdv, 0)
                else:
                    t = InProcessTransport(
                        [ShardServer(r, kind, dim, ADAM, seed=0) for r in plan.regions]
                    )
                table = RemoteTable(plan, t, ADAM)
                pids = [w["pid"] for w in ray.get([a.where.remote() for a in actors])]
                (mine, peer), cpu = time_paired(table, local, batches, repeats, pids)
                passes, steps = repeats + 1, repeats * len(batches)
                out.append({
                    "impl": f"{transport}/{kind}", "shards": m,
                    "bytes_per_token": shard_bytes(table) / (n_tokens * passes),
                    # against the local table timed in alternation with it
                    "local_us_per_token_interleaved": statistics.median(peer) / n_tokens * 1e6,
                    "vs_local_interleaved": statistics.median(mine) / statistics.median(peer),
                    "vs_local_interleaved_p25": quartile(mine) / quartile(peer),
                    "vs_local_interleaved_fastest": min(mine) / min(peer),
                    # CPU ms a step (one batch): the worker's process, the shard actors'
                    # (in-process shards count as the worker's), the local table's process
                    "cpu_ms_per_step": {k: v / steps * 1e3 for k, v in cpu.items()},
                })  # fmt: skip
                secs.append(statistics.median(mine))
                if actors:
                    stop_shards(actors)
    local_sec.append(time_table(local, batches, repeats))
    base = min(local_sec)
    out[0]["local_us_per_token_first_last"] = [t / n_tokens * 1e6 for t in local_sec]
    for row, sec in zip(out, [base, *secs], strict=True):
        row["us_per_token"], row["vs_local"] = sec / n_tokens * 1e6, sec / base
    return out


def with_peer(rows, dim, tokens, bag, spec):
    """The 3 batches of a measurement, their tokens, and the local table (the peer)."""
    batches = [workload(rows, tokens, bag, dim, seed) for seed in range(3)]
    return batches, tokens * len(batches), LocalTable(rows, dim, spec, seed=0)


def bench_pin(rows, dim, tokens, bag, repeats) -> list[dict]:
    """``pin``: 2 Ray shards pinned to cores of their own (``shards.pin_cores``) against
    2 that are not, both sets started, taking turns with the local table in one loop."""
    from memdist.cluster.actors import pin_shards, start_shards, stop_shards

    batches, n_tokens, local = with_peer(rows, dim, tokens, bag, ADAM)
    out = []
    for kind in ("row", "column"):
        plan = make_plan(kind, rows, dim, 2)
        pinned, free = start_shards(plan, ADAM, seed=0), start_shards(plan, ADAM, seed=0)
        cores = pin_shards(pinned)
        tables = {"pinned": RemoteTable(plan, RayTransport(pinned), ADAM), "local": local,
                  "free": RemoteTable(plan, RayTransport(free), ADAM)}  # fmt: skip
        times = alternating({n: functools.partial(one_pass, t, batches) for n, t in tables.items()},
                            repeats)  # fmt: skip
        med = {n: statistics.median(v) for n, v in times.items()}
        out.append({
            "impl": f"ray/{kind}", "shards": 2, "cores": cores,
            "us_per_token": {n: v / n_tokens * 1e6 for n, v in med.items()},
            "pinned_vs_local": med["pinned"] / med["local"],
            "free_vs_local": med["free"] / med["local"],
            "pinned_vs_local_p25": quartile(times["pinned"]) / quartile(times["local"]),
            "free_vs_local_p25": quartile(times["free"]) / quartile(times["local"]),
            "pinned_vs_free": med["pinned"] / med["free"],
        })  # fmt: skip
        stop_shards(pinned)
        stop_shards(free)
    return out


def bench_clip(rows, dim, tokens, bag, repeats) -> list[dict]:
    """2 Ray shards under values' gradient clipping: the norm's requests sent behind the
    backward (the step announced) against sent at the step (not announced), alternating
    with each other and the local table (clipping too)."""
    from memdist.cluster.actors import start_shards, stop_shards

    spec = OptimizerSpec("adam", lr=1e-3, grad_clip=1.0)
    batches, n_tokens, local = with_peer(rows, dim, tokens, bag, spec)
    out = []
    for kind in ("row", "column"):
        plan = make_plan(kind, rows, dim, 2)
        ways = {"norm_behind_backward": True, "norm_at_step": False}
        actors = {way: start_shards(plan, spec, seed=0) for way in ways}
        tables = {way: RemoteTable(plan, RayTransport(actors[way]), spec) for way in ways}
        passes = {way: functools.partial(one_pass, tables[way], batches, announce)
                  for way, announce in ways.items()}  # fmt: skip
        times = alternating({**passes, "local": functools.partial(one_pass, local, batches)},
                            repeats)  # fmt: skip
        both = [t.read_rows(0, 64) for t in tables.values()]
        rows_equal = all(torch.equal(v, both[1][k]) for k, v in both[0].items())
        peer, at_step = statistics.median(times["local"]), statistics.median(times["norm_at_step"])
        for way in ways:
            out.append({
                "impl": f"ray/{kind}/{way}", "shards": 2,
                "us_per_token": statistics.median(times[way]) / n_tokens * 1e6,
                "local_us_per_token_interleaved": peer / n_tokens * 1e6,
                "vs_local_interleaved": statistics.median(times[way]) / peer,
                "vs_norm_at_step": statistics.median(times[way]) / at_step,
                "rows_equal": rows_equal,
            })  # fmt: skip
            stop_shards(actors[way])
    return out


def bench_cache(rows, dim, tokens, bag, repeats) -> list[dict]:
    region = make_plan("row", rows, dim, 1).regions[0]
    batches = [workload(rows, tokens, bag, dim, seed) for seed in range(3)]
    n_tokens = tokens * len(batches)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in (("in_memory", {}),
                          ("zarr_cache_1/4", {"store_path": tmp + "/s", "cache_rows": rows // 4})):  # fmt: skip
            server = ShardServer(region, "row", dim, ADAM, seed=0, **kw)
            table = RemoteTable(make_plan("row", rows, dim, 1), InProcessTransport([server]), ADAM)
            sec = time_table(table, batches, repeats)
            stats = server.stats()
            results.append({"impl": label, "us_per_token": sec / n_tokens * 1e6,
                            "cache_hits": stats.get("cache_hits"),
                            "cache_misses": stats.get("cache_misses")})  # fmt: skip
    base = results[0]["us_per_token"]
    for r in results:
        r["vs_in_memory"] = r["us_per_token"] / base
    return results


# Equal FLOPs for every table size: the memory layer's query projection and key scoring
# cost 2 * heads * k_dim * (dim + n_keys), so k_dim shrinks as n_keys grows
# (66 x (128 + 256) = 22 x (128 + 1024) = 6 x (128 + 4096)); the value part (heads x knn
# rows of v_dim) is the same for all.
EQUAL_FLOPS_K_DIM = {256: 66, 1024: 22, 4096: 6}


def bench_model_steps(n_keys_list, steps) -> list[dict]:
    from memdist.assembly import build_model, make_optimizer, unique_tables
    from memdist.config import load_config
    from memdist.model import flops_per_token
    from memdist.step import loss_fn

    out = []
    for n_keys in n_keys_list:
        k_dim = EQUAL_FLOPS_K_DIM[n_keys]
        cfg = load_config("small", [f"model.memory.n_keys={n_keys}", f"model.memory.k_dim={k_dim}",
                                    "shards.count=0", "model.memory.value_optimizer=sgd"])  # fmt: skip
        model, tables = build_model(cfg, torch.device("cpu"))
        tables = unique_tables(tables)
        opt, _ = make_optimizer(cfg, model)
        b, t = cfg.data.batch_size, cfg.data.seq_len
        x = torch.randint(0, 256, (b, t + 1))
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            loss = loss_fn(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            for table in tables:
                table.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        flops = flops_per_token(cfg.model, t)
        out.append({"rows": n_keys**2, "k_dim": k_dim, "value_params": n_keys**2 * cfg.model.dim,
                    "flops_per_token": flops["forward"], "memory_layer_flops": flops["memory_layer"],
                    "step_ms": sorted(times)[len(times) // 2] * 1e3})  # fmt: skip
        del model, tables
    return out


def bench_far(rows, dim, tokens, bag, repeats) -> list[dict]:
    """``far``: Ray is restarted as a two-node cluster for it, and shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    from memdist.cluster.actors import SHARD_RESOURCE, start_shards, stop_shards

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False})
    cluster.add_node(resources={SHARD_RESOURCE: 4})  # where start_shards places shards
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    batches, n_tokens, local = with_peer(rows, dim, tokens, bag, ADAM)
    out = []
    try:
        for kind in ("row", "column"):
            plan = make_plan(kind, rows, dim, 2)
            paths = {"tcp_lines": True, "ray_calls": False}
            started = {name: start_shards(plan, ADAM, seed=0) for name in paths}
            tables = {name: RemoteTable(plan, RayTransport(started[name], direct_lines=lines), ADAM)
                      for name, lines in paths.items()}  # fmt: skip
            times = alternating({name: functools.partial(one_pass, t, batches)
                                 for name, t in [*tables.items(), ("local", local)]}, repeats)  # fmt: skip
            peer = statistics.median(times["local"])
            for name in paths:
                lines = [tables[name].transport.line(s) for s in range(2)]
                out.append({
                    "impl": f"ray/{kind}/{name}", "shards": 2,
                    "tcp_lines": sum(ln is not None and isinstance(ln.address, tuple) for ln in lines),
                    "us_per_token": statistics.median(times[name]) / n_tokens * 1e6,
                    "local_us_per_token_interleaved": peer / n_tokens * 1e6,
                    "vs_local_interleaved": statistics.median(times[name]) / peer,
                    "vs_ray_calls": statistics.median(times[name]) / statistics.median(times["ray_calls"]),
                })  # fmt: skip
                stop_shards(started[name])
        out += far_threads(rows, dim, batches, local, repeats)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def far_threads(rows, dim, batches, local, repeats) -> list[dict]:
    """One row shard on the other node with 2 threads (what ``shards.threads_per_shard``'s
    default gives a shard alone on a memory node of 2 CPUs) and with 1 (the old
    default), each alternating with the local table."""
    from memdist.cluster.actors import start_shards, stop_shards

    n_tokens = sum(idx.shape[0] for idx, _, _ in batches)
    plan = make_plan("row", rows, dim, 1)
    times: dict[int, tuple[list[float], list[float]]] = {}
    for threads in (2, 1):
        actors = start_shards(plan, ADAM, seed=0, threads=threads)
        times[threads], _ = time_paired(RemoteTable(plan, RayTransport(actors), ADAM), local,
                                        batches, repeats)  # fmt: skip
        stop_shards(actors)
    one = statistics.median(times[1][0])
    return [{
        "impl": f"ray/row/tcp_lines/{threads}-threads", "shards": 1, "threads": threads,
        "us_per_token": statistics.median(mine) / n_tokens * 1e6,
        "local_us_per_token_interleaved": statistics.median(peer) / n_tokens * 1e6,
        "vs_local_interleaved": statistics.median(mine) / statistics.median(peer),
        "vs_one_thread": statistics.median(mine) / one,
    } for threads, (mine, peer) in times.items()]  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("tables", []) if r["shards"]]
    cpu = [r for r in rows if "cpu_ms_per_step" in r]
    steps = result.get("model_steps", [])
    far = [r for r in result.get("far", []) if r["shards"] == 2]
    pin = result.get("pin", [])
    panels = int(bool(rows)) + int(bool(cpu)) + int(bool(steps)) + int(bool(far)) + int(bool(pin))
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if rows:
        a = axes.pop(0)
        for impl in sorted({r["impl"] for r in rows}):
            pts = [r for r in rows if r["impl"] == impl]
            a.plot([r["shards"] for r in pts], [r["vs_local"] for r in pts], "o-", label=impl)
        a.axhline(1.0, color="gray", lw=1, ls="--", label="local table")
        a.set_xlabel("shards")
        a.set_ylabel("lookup+backward+step time / local")
        a.legend()
        a.grid(True, alpha=0.3)
    if cpu:  # where the CPU goes: worker and shards stacked, the local table beside
        e = axes.pop(0)
        at = range(len(cpu))
        worker = [r["cpu_ms_per_step"]["worker"] for r in cpu]
        shards = [r["cpu_ms_per_step"]["shards"] for r in cpu]
        e.bar([x - 0.2 for x in at], worker, 0.4, label="worker's process")
        e.bar([x - 0.2 for x in at], shards, 0.4, bottom=worker, label="shard actors")
        e.bar([x + 0.2 for x in at], [r["cpu_ms_per_step"]["peer"] for r in cpu], 0.4,
              label="local table (interleaved)")  # fmt: skip
        e.set_xticks(list(at), [f"{r['impl']} {r['shards']}" for r in cpu], rotation=60,
                     ha="right", fontsize=7)  # fmt: skip
        e.set_ylabel("CPU ms a step")
        e.legend(fontsize=7)
        e.grid(True, axis="y", alpha=0.3)
    if steps:
        b = axes.pop(0)
        b.plot([r["rows"] for r in steps], [r["step_ms"] for r in steps], "o-")
        b.set_xscale("log")
        b.set_xlabel(f"table rows (forward FLOPs/token {steps[0]['flops_per_token']:.0f} for all)")
        b.set_ylabel("training step (ms)")
        b.set_ylim(bottom=0)
        b.grid(True, alpha=0.3)
    if far:
        c = axes.pop(0)
        kinds = sorted({r["impl"].split("/")[1] for r in far})
        bars = ["local", "tcp_lines", "ray_calls"]
        for i, name in enumerate(bars):
            us = []
            for kind in kinds:
                r = next(r for r in far if r["impl"].split("/")[1] == kind)
                if name == "local":
                    us.append(r["local_us_per_token_interleaved"])
                else:
                    us.append(
                        next(x for x in far if x["impl"] == f"ray/{kind}/{name}")["us_per_token"]
                    )
            c.bar([k + (i - 1) * 0.27 for k in range(len(kinds))], us, 0.27, label=name)
        c.set_xticks(range(len(kinds)), [f"2 {k} shards on another node" for k in kinds])
        c.set_ylabel("lookup+backward+step (us/token)")
        c.legend()
        c.grid(True, axis="y", alpha=0.3)
    if pin:
        d = axes.pop(0)
        for i, key in enumerate(("free_vs_local", "pinned_vs_local")):
            d.bar([k + (i - 0.5) * 0.4 for k in range(len(pin))], [r[key] for r in pin], 0.4,
                  label=key.split("_")[0])  # fmt: skip
        d.axhline(1.0, color="gray", lw=1, ls="--", label="local table")
        d.set_xticks(range(len(pin)), [f"2 {r['impl'].split('/')[1]} shards" for r in pin])
        d.set_ylabel("time / local table (medians, taking turns)")
        d.legend()
        d.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--big", action="store_true", help="also a 16M-row table (8 GB of values)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--spin", type=int, default=None, help=spin.HELP)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="passes over the batches per layout (default 5, --quick 2)",
    )
    parts = ("tables", "pin", "clip", "cache", "model_steps", "far")
    p.add_argument("--only", choices=parts, action="append", help="run only these parts")
    args = p.parse_args(argv)
    run = set(args.only or parts)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, dim, tokens, bag = 65536, 128, (512 if args.quick else 2048), 64
    repeats = args.repeats or (2 if args.quick else 5)
    started = time.time()
    result = {
        "benchmark": "sharded",
        "machine": machine(),
        "versions": versions("ray"),
        "config": {
            "rows": rows,
            "dim": dim,
            "tokens": tokens,
            "bag": bag,
            "repeats": repeats,
            "value_optimizer": "adam",
            "payload": "fp32",
            "quick": args.quick,
        },  # fmt: skip
    }
    if "tables" in run:
        result["tables"] = bench_tables(
            rows, dim, tokens, bag, [1, 2, 4], ["inprocess", "ray", "collective"], repeats
        )
    if "pin" in run:
        result["pin"] = bench_pin(rows, dim, tokens, bag, 5 * repeats)
    if "clip" in run:
        result["clip"] = bench_clip(rows, dim, tokens, bag, 4 * repeats)
    if "cache" in run:  # a quarter of the cached table must hold one step's rows
        result["cache"] = bench_cache(8 * tokens * bag, 64, tokens, bag, repeats)
    if "model_steps" in run:
        n_keys = [256, 1024] + ([4096] if args.big else [])
        result["model_steps"] = bench_model_steps(n_keys, 3 if args.quick else 8)
    if "far" in run:  # last: it restarts Ray as a two-node cluster
        result["far"] = bench_far(rows, dim, tokens, bag, 3 * repeats)
    result["seconds"] = time.time() - started
    ray.shutdown()
    return write(result, args.out, "sharded", plot)


if __name__ == "__main__":
    main()
