"""Building a run's value tables in shard servers: plan, start, connect, stop.

``start_remote_tables(cfg)`` returns one ``RemoteTable`` per table of the model
(the same object for layers sharing a table) and a ``ShardGroup`` to stop them. The
plan of each table is printed. With the Ray transport a local Ray instance is
started when none is running.

Data-parallel workers reach the same shards: ``ShardGroup.spec`` (plans and actor
handles, picklable) travels to each worker, and ``connect_tables(spec, worker)``
builds that worker's ``RemoteTable`` objects there.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memdist.assembly import table_seed, value_optimizer
from memdist.cluster.plan import ShardingPlan, cache_rows_for, choose_plan
from memdist.cluster.shard import ShardServer
from memdist.collective import CollectiveTransport, Rendezvous, host_store
from memdist.config import RunConfig
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable
from memdist.transport import InProcessTransport, RayTransport

PAYLOADS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class TablesSpec:
    """What a worker needs to reach a run's shards: one plan and actor list per table."""

    plans: list[ShardingPlan]
    actors: list[list[Any]]
    layers: int  # memory layers of the model
    shared: bool  # all layers read table 0
    payload: str
    timeout_s: float
    staleness: int
    optimizer: OptimizerSpec
    shared_memory: bool = True  # RayTransport's same-node path (memdist.shm)
    direct_lines: bool = True  # RayTransport's sockets to the actors (memdist.line)
    rendezvous: list[Rendezvous] | None = None  # per table, for the collective transport


def _transport(spec: TablesSpec, table: int, worker: int) -> RayTransport | CollectiveTransport:
    actors = spec.actors[table]
    if spec.rendezvous is None:
        return RayTransport(actors, timeout_s=spec.timeout_s, worker=worker,
                            shared_memory=spec.shared_memory,
                            direct_lines=spec.direct_lines)  # fmt: skip
    return CollectiveTransport(actors, spec.rendezvous[table], worker, timeout_s=spec.timeout_s)


def connect_tables(spec: TablesSpec, worker: int) -> list[RemoteTable]:
    """Worker ``worker``'s view of the shards: one RemoteTable per memory layer."""
    tables = [
        RemoteTable(
            plan,
            _transport(spec, i, worker),
            spec.optimizer,
            PAYLOADS[spec.payload],
            worker=worker,
            staleness=spec.staleness,
        )  # fmt: skip
        for i, plan in enumerate(spec.plans)
    ]
    return [tables[0] if spec.shared else tables[i] for i in range(spec.layers)]


@dataclass
class ShardGroup:
    plans: list[ShardingPlan] = field(default_factory=list)
    actors: list[Any] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)
    spec: TablesSpec | None = None  # set for Ray shards, which other processes can reach
    store: Any = None  # the collective transport's rendezvous store, alive while shards are

    def where(self) -> list[dict[str, Any]]:
        """Host, process and device of each shard actor (empty for in-process shards)."""
        if not self.actors:
            return []
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def stop(self) -> None:
        if self.actors:
            from memdist.cluster.actors import stop_shards

            stop_shards(self.actors)
            self.actors = []
        self.store = None
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.temp_dirs = []


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address``; with None, to the cluster of the Ray job this
    runs in (``RAY_ADDRESS``, set by ``memdist cluster submit``), else start a local
    instance (never one that happens to be recorded on this machine by ``ray start``)."""
    import os

    import ray

    # Ray's token authentication stays on: a local instance started here makes a token
    # (in ~/.ray/auth_token) and requires it; joining a cluster presents the token found
    # in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local",
                 include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        token = Path.home() / ".ray" / "auth_token"  # Ray writes it readable by all users
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)


def start_remote_tables(
    cfg: RunConfig, store_root: Path | None = None
) -> tuple[list[RemoteTable], ShardGroup]:
    """``store_root`` holds the zarr groups of shards whose region exceeds the budget."""
    mem, sh = cfg.model.memory, cfg.shards
    assert mem is not None and sh.count > 0
    v_dim = mem.v_dim if mem.v_dim is not None else cfg.model.dim
    n_tables = 1 if mem.shared_table else len(mem.layers)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    budget = int(sh.budget_mb * 2**20) if sh.budget_mb is not None else None
    state = mem.state_floats_per_value(v_dim)
    optimizer = value_optimizer(mem)
    group = ShardGroup()
    tables = []
    actors_per_table = []
    for i in range(n_tables):
        plan = choose_plan(
            sh.plan, mem.rows, v_dim, sh.count, tokens=tokens, bag=mem.heads * mem.knn,
            budget_bytes=budget, state_floats_per_value=state, optimizer=optimizer.name,
        )  # fmt: skip
        group.plans.append(plan)
        seed = table_seed(cfg.train.seed, i)
        per_shard: list[dict[str, Any]] = []
        for r in plan.regions:
            cache_rows = cache_rows_for(r, budget, state)
            if cache_rows is None:
                per_shard.append({})
                continue
            if store_root is None:
                store_root = Path(tempfile.mkdtemp(prefix="memdist-shards-"))
                group.temp_dirs.append(store_root)
            path = store_root / f"table{i}" / f"shard{r.shard}"
            per_shard.append({"store_path": str(path), "cache_rows": cache_rows})
        if sh.transport == "inprocess":
            servers = [
                ShardServer(
                    r,
                    plan.kind,
                    plan.dim,
                    optimizer,
                    seed=seed,
                    backend=mem.backend,
                    device="cuda" if sh.gpus_per_shard > 0 else "cpu",  # as Ray places them
                    **per_shard[r.shard],
                )  # fmt: skip
                for r in plan.regions
            ]
            transport = InProcessTransport(servers)
            tables.append(RemoteTable(plan, transport, optimizer, PAYLOADS[sh.payload]))
            continue
        ensure_ray(cfg.cluster.address)
        from memdist.cluster.actors import start_shards

        actors = start_shards(
            plan, optimizer, seed=seed, backend=mem.backend, gpus_per_shard=sh.gpus_per_shard,
            cpus_per_shard=sh.cpus_per_shard, threads=sh.threads_per_shard, per_shard=per_shard, workers=cfg.cluster.workers,
            max_restarts=cfg.cluster.max_failures, memory_nodes=sh.memory_nodes,
            start_timeout_s=sh.start_timeout_s,
            # The barrier gives up before the worker's own wait, so its error (naming
            # the missing workers) is the one that reaches the worker.
            barrier_timeout_s=0.9 * sh.timeout_s,
        )  # fmt: skip
        group.actors += actors
        actors_per_table.append(actors)
    if sh.transport == "inprocess":
        return (tables if not mem.shared_table else [tables[0] for _ in mem.layers]), group
    if sh.pin_cores:  # over every table's shards: they share the nodes' cores
        from memdist.cluster.actors import pin_shards

        pin_shards(group.actors)
    rendezvous = None
    if sh.transport == "collective":
        import ray

        group.store = host_store()
        host, port = group.store.host, group.store.port
        rendezvous = [
            Rendezvous(host, port, f"memdist/table{i}", sh.count, cfg.cluster.workers)
            for i in range(n_tables)
        ]
        for rdv, actors in zip(rendezvous, actors_per_table, strict=True):
            ray.get([a.serve_collective.remote(rdv, s) for s, a in enumerate(actors)])
    group.spec = TablesSpec(
        plans=group.plans, actors=actors_per_table, layers=len(mem.layers),
        shared=mem.shared_table, payload=sh.payload, timeout_s=sh.timeout_s,
        staleness=sh.staleness, optimizer=optimizer, rendezvous=rendezvous,
        shared_memory=sh.shared_memory, direct_lines=sh.direct_lines,
    )  # fmt: skip
    return connect_tables(group.spec, 0), group
