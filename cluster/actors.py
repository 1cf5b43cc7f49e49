"""Shard servers as Ray actors, placed by resources.

``start_shards`` starts one actor per region of a plan. A shard asks for a GPU when
``gpus_per_shard`` > 0 (and keeps its rows there), and for the cluster's
``memdist_shard`` custom resource when the cluster defines one; otherwise it packs
onto whatever node has room. ``stop_shards`` kills them.

Actors are threaded (``max_concurrency``): while some workers wait at a shard's
step barrier, the others' lookups and backwards are served. Ray does not promise a
threaded actor runs one caller's tasks in the order they were sent, so each
worker's lookups, backwards and hints carry a sequence number and wait for their
turn (a hint must be served before the lookup it prepares).
"""

from __future__ import annotations

import functools
from typing import Any

import ray

from memdist.cluster.plan import ShardingPlan
from memdist.cluster.shard import ShardServer
from memdist.kernels import OptimizerSpec

SHARD_RESOURCE = "memdist_shard"


class _ShardActor(ShardServer):
    """A ShardServer in its own process; torch uses ``threads`` intra-op threads there.

    Lookups, backwards and prefetch hints come through ``handle_ordered`` (the ``rows``
    group, a few threads) and each worker's run in the order it sent them; steps, which
    may wait at the barrier, and control requests come through ``handle`` and run
    beside them.
    """

    def __init__(self, *args: Any, threads: int = 1, **kwargs: Any) -> None:
        import threading

        import torch

        torch.set_num_threads(threads)
        super().__init__(*args, **kwargs)
        self._turns = threading.Condition()
        self._next: dict[int, int] = {}  # worker -> sequence number of its next request

    @ray.method(concurrency_group="rows")
    def handle_ordered(self, req: Any, worker: int, seq: int) -> Any:
        """A worker's ``seq``-th lookup, backward or hint (``memdist.wire.ORDERED``), run
        after its predecessors. A sender that starts again (a new table view) starts at
        0; a predecessor lost on the way holds the rest up for the barrier timeout at most."""
        with self._turns:
            if seq == 0:
                self._next[worker] = 0
            self._turns.wait_for(lambda: self._next.get(worker, 0) >= seq, self.barrier_timeout_s)
        try:
            return self.handle(req)
        finally:
            with self._turns:
                self._next[worker] = max(self._next.get(worker, 0), seq + 1)
                self._turns.notify_all()

    def serve_collective(self, rendezvous: Any, rank: int) -> None:
        """Answer lookups, backwards and steps over the collective transport's group too
        (in a thread; this returns at once, the group forms when every worker joined)."""
        import threading

        from memdist.collective import serve

        threading.Thread(target=serve, args=(self, rendezvous, rank), daemon=True).start()


@functools.cache
def actor_class(workers: int) -> Any:
    """The actor class for shards serving ``workers`` workers: the ``rows`` group has a
    thread per worker (each may wait for its turn) and one more."""
    return ray.remote(concurrency_groups={"rows": workers + 1})(_ShardActor)  # type: ignore[call-overload]


ShardActor = actor_class(1)


def shard_options(gpus_per_shard: float, cpus_per_shard: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": cpus_per_shard, "num_gpus": gpus_per_shard}
    if ray.cluster_resources().get(SHARD_RESOURCE, 0) > 0:
        opts["resources"] = {SHARD_RESOURCE: 1}
    return opts


def start_shards(
    plan: ShardingPlan,
    spec: OptimizerSpec,
    *,
    seed: int,
    gpus_per_shard: float = 0.0,
    cpus_per_shard: float = 0.0,
    threads: int = 1,
    per_shard: list[dict[str, Any]] | None = None,
    workers: int = 1,
    **server_kwargs: Any,
) -> list[Any]:
    """One ShardActor per region; returns the handles once every shard answered a ping.

    ``per_shard[s]`` adds keyword arguments for shard s only (its store path, cache size).
    """
    opts = shard_options(gpus_per_shard, cpus_per_shard)
    opts["max_concurrency"] = 2 * workers + 4  # barrier waiters + other workers' requests
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
            **server_kwargs,
            **extra[region.shard],
        )  # fmt: skip
        for region in plan.regions
    ]
    ray.get([a.ping.remote() for a in actors])
    return actors


def stop_shards(actors: list[Any]) -> None:
    for actor in actors:
        ray.kill(actor)
