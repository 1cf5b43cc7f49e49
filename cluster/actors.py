"""Shard servers as Ray actors, placed by resources.

``start_shards`` starts one actor per region of a plan. A shard asks for a GPU when
``gpus_per_shard`` > 0 (and keeps its rows there), and for the cluster's
``memdist_shard`` custom resource (``shards.memory_nodes``; by default when the
cluster has nodes with it, or its launcher config a node type that the autoscaler
starts for the shards); otherwise it packs onto whatever node has room. ``stop_shards`` kills them.

Actors are threaded (``max_concurrency``): while some workers wait at a shard's
step barrier, the others' lookups and backwards are served. Ray does not promise a
threaded actor runs one caller's tasks in the order they were sent, so each
worker's lookups, backwards, hints and steps sent ahead carry a sequence number and
wait for their turn (a hint must be served before the lookup it prepares, a step
before the lookups that must see it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from memdist import line, shm, wire
from memdist.cluster.plan import ShardingPlan
from memdist.cluster.shard import ShardServer
from memdist.errors import ShardError
from memdist.kernels import OptimizerSpec

SHARD_RESOURCE = "memdist_shard"
PINNABLE = hasattr(os, "sched_setaffinity")  # Linux: threads can be held to cores


def node_threads() -> int:
    """A shard's torch threads when none are set: on a memory node (one offering
    ``memdist_shard``, kept for shards) its CPUs shared among the shards it takes;
    elsewhere 1, the node's cores being its workers' too."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        offers = node.get("Resources", {})
        if node.get("NodeID") == here and offers.get(SHARD_RESOURCE, 0) >= 1:
            return max(1, int(offers.get("CPU", 1) // offers[SHARD_RESOURCE]))
    return 1


class _ShardActor(ShardServer):
    """A ShardServer in its own process; torch uses ``threads`` intra-op threads there
    (None: ``node_threads``).

    Lookups, backwards, prefetch hints and steps sent ahead come through
    ``handle_ordered`` (the ``rows`` group, a few threads per worker; or the direct
    line of a worker on this node, ``line``) and each worker's run in the order it sent
    them; other steps, which may wait at the barrier, and
    control requests come through ``handle`` and run beside them.
    """

    def __init__(self, *args: Any, threads: int | None = None, **kwargs: Any) -> None:
        import shutil
        import threading

        import torch

        torch.set_num_threads(threads if threads is not None else node_threads())
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        store = kwargs.get("store_path")
        if restarted and store is not None:
            # Ray restarted this shard after it died: the run goes back to a checkpoint,
            # which replaces every row, so what the dead shard left on disk is discarded.
            shutil.rmtree(store, ignore_errors=True)
        # A restarted shard's region is written here: the run's recovery loads into it.
        kwargs["fill_later"] = kwargs.get("fill_later", False) and not restarted
        super().__init__(*args, restarted=restarted, **kwargs)
        self._turns = threading.Condition()
        self._next: dict[int, int] = {}  # worker -> sequence number of its next request
        self._mapped = shm.Mapped(ray.get_runtime_context().get_node_id())
        self._listeners: dict[bool, line.Listener] = {}  # by ``near``
        self._listener_lock = threading.Lock()

    @ray.method(concurrency_group="rows")
    def handle_ordered(self, req: Any, worker: int, seq: int) -> Any:
        """A worker's ``seq``-th lookup, backward, hint or step sent ahead
        (``memdist.wire.in_order``), run after its predecessors. A sender that starts again (a new table view) starts at
        0; a predecessor lost on the way holds the rest up for the barrier timeout at most."""
        return self._in_turn(req, worker, seq)

    def _in_turn(self, req: Any, worker: int, seq: int) -> Any:
        with self._turns:
            if seq == 0:
                self._next[worker] = 0
            self._turns.wait_for(lambda: self._next.get(worker, 0) >= seq, self.barrier_timeout_s)
        try:
            return self.handle_arrays(req)
        finally:
            with self._turns:
                self._next[worker] = max(self._next.get(worker, 0), seq + 1)
                self._turns.notify_all()

    def handle_arrays(self, req: Any) -> Any:
        """``handle`` for a request in ``wire.to_arrays`` form (how RayTransport sends
        them); the reply goes back in that form too. A ``ShmRequest``'s arrays are read
        from, and its reply's written to, the worker's shared memory."""
        if not isinstance(req, shm.ShmRequest):
            return wire.to_arrays(self.handle(wire.from_arrays(req)))
        reply = self.handle(wire.from_arrays(self._mapped.request(req)))
        return self._mapped.reply(req, wire.to_arrays(reply))

    def line(self, near: bool = True) -> tuple[line.Address, bytes]:
        """The address and token of this shard's direct line (``memdist.line``; opened on
        the first call) for workers on its node (``near``: a Unix socket) or on others
        (TCP at this node's address): their ordered requests come through it, served as
        ``handle_ordered`` serves them, without Ray's actor calls."""
        with self._listener_lock:
            if near not in self._listeners:
                host = None if near else ray.util.get_node_ip_address()
                self._listeners[near] = line.Listener(
                    self._in_turn, host, send_timeout_s=self.barrier_timeout_s
                )
            return self._listeners[near].address, self._listeners[near].token

    def where(self) -> dict[str, Any]:
        import torch

        return {**super().where(), "node": ray.get_runtime_context().get_node_id(),
                "threads": torch.get_num_threads(),
                "cores": sorted(os.sched_getaffinity(0)) if PINNABLE else []}  # fmt: skip

    def pin(self, cores: list[int]) -> list[int]:
        """Every thread of this process on ``cores`` from now on (threads started later
        inherit it); returns the cores this process may use."""
        if not PINNABLE:
            raise ShardError(
                f"shards.pin_cores=true needs Linux's CPU affinity; {sys.platform} has none"
            )
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(tid), cores)
        return sorted(os.sched_getaffinity(0))

    def serve_collective(self, rendezvous: Any, rank: int) -> None:
        """Answer lookups, backwards and steps over the collective transport's group too
        (in a thread; this returns at once, the group forms when every worker joined)."""
        import threading

        from memdist.collective import serve

        threading.Thread(target=serve, args=(self, rendezvous, rank), daemon=True).start()


@functools.cache
def actor_class(workers: int) -> Any:
    """The actor class for shards serving ``workers`` workers: the ``rows`` group has
    three threads per worker (its step waiting at the barrier, and its next hint and
    lookup waiting for their turn) and one more."""
    return ray.remote(concurrency_groups={"rows": 3 * workers + 1})(_ShardActor)  # type: ignore[call-overload]


ShardActor = actor_class(1)


BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where Ray's launcher puts it


def cluster_offers_shard_nodes() -> bool:
    """Whether the cluster has memory nodes now, or (seen from the head of a cluster
    started by Ray's launcher) its autoscaling config has a node type offering them."""
    if ray.cluster_resources().get(SHARD_RESOURCE, 0) > 0:
        return True
    bootstrap = BOOTSTRAP_CONFIG.expanduser()
    if not bootstrap.is_file():
        return False
    import yaml

    types = (yaml.safe_load(bootstrap.read_text()) or {}).get("available_node_types", {})
    return any(SHARD_RESOURCE in (t.get("resources") or {}) for t in types.values())


def shard_options(
    gpus_per_shard: float, cpus_per_shard: float, memory_nodes: bool | None = None
) -> dict[str, Any]:
    """Ray options of a shard actor. ``memory_nodes``: True asks for a ``memdist_shard``
    node (the autoscaler starts one when there is none), False packs anywhere, None
    asks when ``cluster_offers_shard_nodes``."""
    opts: dict[str, Any] = {"num_cpus": cpus_per_shard, "num_gpus": gpus_per_shard}
    if memory_nodes or (memory_nodes is None and cluster_offers_shard_nodes()):
        opts["resources"] = {SHARD_RESOURCE: 1}
    return opts


def start_shards(
    plan: ShardingPlan,
    spec: OptimizerSpec,
    *,
    seed: int,
    gpus_per_shard: float = 0.0,
    cpus_per_shard: float = 0.0,
    threads: int | None = None,
    per_shard: list[dict[str, Any]] | None = None,
    workers: int = 1,
    max_restarts: int = 0,
    memory_nodes: bool | None = None,
    start_timeout_s: float = 900.0,
    **server_kwargs: Any,
) -> list[Any]:
    """One ShardActor per region; returns the handles once every shard answered a ping.

    ``threads``: each shard's torch threads; None: ``cpus_per_shard`` where it reserves
    one or more, else ``node_threads`` (a memory node's CPUs, 1 elsewhere).
    ``per_shard[s]`` adds keyword arguments for shard s only (its store path, cache size).
    ``max_restarts``: how often Ray restarts a shard that died (on another node if its
    node is gone); a restarted shard holds its initial rows until a checkpoint is loaded
    into it. Requests in flight when it died fail (no retries): the run decides.
    """
    opts = shard_options(gpus_per_shard, cpus_per_shard, memory_nodes)
    if threads is None and cpus_per_shard >= 1:
        threads = int(cpus_per_shard)
    opts["max_concurrency"] = 2 * workers + 4  # barrier waiters + other workers' requests
    opts["max_restarts"] = max_restarts
    opts["max_task_retries"] = 0
    device = "cuda" if gpus_per_shard > 0 else "cpu"
    extra = per_shard or [{} for _ in plan.regions]
    actors = [
        actor_class(workers)
        .options(**opts)
        .remote(
            region,
            plan.kind,
            plan.dim,
            spec,
            seed=seed,
            device=device,
            threads=threads,
            workers=workers,
            fill_later=True,  # fill_stores writes new zarr regions, with progress
            **server_kwargs,
            **extra[region.shard],
        )  # fmt: skip
        for region in plan.regions
    ]
    try:
        ray.get([a.ping.remote() for a in actors], timeout=start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        stop_shards(actors)
        where = f"nodes with the {SHARD_RESOURCE!r} resource" if "resources" in opts else "room"
        raise ShardError(
            f"{len(actors)} memory shards did not start within {start_timeout_s:g} s "
            f"(shards.start_timeout_s): the cluster found no {where} for them "
            f"({opts['num_cpus']:g} CPUs, {opts['num_gpus']:g} GPUs each)"
        ) from None
    try:
        fill_stores(actors, start_timeout_s)
    except BaseException:
        stop_shards(actors)
        raise
    return actors


def core_sets(places: list[dict[str, Any]]) -> list[list[int]]:
    """Disjoint cores for shards sharing a node: ``places`` are their ``where()``s; the
    shards of a node split the cores they may use into contiguous blocks, in order (more
    shards than cores: one core each, round the node)."""
    by_node: dict[Any, list[int]] = {}
    for s, w in enumerate(places):
        by_node.setdefault(w["node"], []).append(s)
    out: list[list[int]] = [[] for _ in places]
    for shards in by_node.values():
        cores = places[shards[0]]["cores"]
        k, n = len(shards), len(cores)
        for j, s in enumerate(shards):
            out[s] = cores[j * n // k : (j + 1) * n // k] if k <= n else [cores[j % n]]
    return out


def pin_shards(actors: list[Any]) -> list[list[int]]:
    """Each shard's threads on cores of their own among the shards on its node
    (``shards.pin_cores``): two shards on one node no longer share a core while another
    stands idle, nor move between cores. A shard Ray restarts runs unpinned."""
    cores = core_sets(ray.get([a.where.remote() for a in actors]))
    return ray.get([a.pin.remote(c) for a, c in zip(actors, cores, strict=True)])


def fill_stores(actors: list[Any], stall_timeout_s: float, poll_s: float = 2.0) -> None:
    """Have zarr-backed shards write their new regions' chunks (a region of hundreds of
    GB takes many minutes), showing rows written as a progress bar on a terminal; a
    fill that writes no row for ``stall_timeout_s`` fails the start, naming it."""
    progress = ray.get([a.fill_progress.remote() for a in actors])
    todo = [(s, a) for s, (a, (done, rows)) in enumerate(zip(actors, progress, strict=True))
            if done < rows]  # fmt: skip
    if not todo:
        return
    from tqdm import tqdm

    fills = [a.fill_store.remote() for _, a in todo]
    total = sum(progress[s][1] for s, _ in todo)
    last = [progress[s][0] for s, _ in todo]
    moved = [time.monotonic()] * len(todo)
    with tqdm(total=total, unit="rows", desc="writing zarr regions", disable=None) as bar:
        while True:
            ready, pending = ray.wait(fills, num_returns=len(fills), timeout=poll_s)
            ray.get(ready)  # a fill that failed raises its error here
            done = [d for d, _ in ray.get([a.fill_progress.remote() for _, a in todo])]
            bar.update(sum(done) - bar.n)
            if not pending:
                return
            now = time.monotonic()
            for i, (s, _) in enumerate(todo):
                if done[i] > last[i]:
                    last[i], moved[i] = done[i], now
                elif done[i] < progress[s][1] and now - moved[i] > stall_timeout_s:
                    raise ShardError(
                        f"memory shard {s} wrote no row of its zarr region for "
                        f"{stall_timeout_s:g} s (shards.start_timeout_s; {done[i]} of "
                        f"{progress[s][1]} rows written): is its disk full or stalled?"
                    )


def stop_shards(actors: list[Any]) -> None:
    for actor in actors:
        ray.kill(actor)
