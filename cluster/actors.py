"""Shard servers as Ray actors, placed by resources.

``start_shards`` starts one actor per region of a plan. A shard asks for a GPU when
``gpus_per_shard`` > 0 (and keeps its rows there), and for the cluster's
``memdist_shard`` custom resource when the cluster defines one; otherwise it packs
onto whatever node has room. ``stop_shards`` kills them.

Actors are threaded (``max_concurrency``): while some workers wait at a shard's
step barrier, the others' lookups and backwards are served (in arrival order, on
one thread of their own).
"""

from __future__ import annotations

from typing import Any

import ray

from memdist.cluster.plan import ShardingPlan
from memdist.cluster.shard import ShardServer

SHARD_RESOURCE = "memdist_shard"


@ray.remote(concurrency_groups={"rows": 1})  # type: ignore[call-overload]
class ShardActor(ShardServer):
    """A ShardServer in its own process; torch uses ``threads`` intra-op threads there.

    Lookups, backwards and prefetch hints run on one thread (the ``rows`` group), so a
    worker's requests are served in the order it sent them (a hint before the lookup it
    prepares); steps, which may wait at the barrier, and control calls run beside them.
    """

    def __init__(self, *args: Any, threads: int = 1, **kwargs: Any) -> None:
        import torch

        torch.set_num_threads(threads)
        super().__init__(*args, **kwargs)

    @ray.method(concurrency_group="rows")
    def lookup(self, *args: Any) -> Any:
        return super().lookup(*args)

    @ray.method(concurrency_group="rows")
    def backward(self, *args: Any) -> Any:
        return super().backward(*args)

    @ray.method(concurrency_group="rows")
    def prefetch(self, *args: Any) -> Any:
        return super().prefetch(*args)

    def serve_collective(self, rendezvous: Any, rank: int) -> None:
        """Answer lookups, backwards and steps over the collective transport's group too
        (in a thread; this returns at once, the group forms when every worker joined)."""
        import threading

        from memdist.collective import serve

        threading.Thread(target=serve, args=(self, rendezvous, rank), daemon=True).start()


def shard_options(gpus_per_shard: float, cpus_per_shard: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": cpus_per_shard, "num_gpus": gpus_per_shard}
    if ray.cluster_resources().get(SHARD_RESOURCE, 0) > 0:
        opts["resources"] = {SHARD_RESOURCE: 1}
    return opts


def start_shards(
    plan: ShardingPlan,
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
        ShardActor.options(**opts).remote(
            region,
            plan.kind,
            plan.dim,
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
