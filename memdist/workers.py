"""Data-parallel training: backbone workers under Ray Train, sharing the memory shards.

``train_with_workers`` runs ``cluster.workers`` Ray Train workers (``TorchTrainer``),
each with a DeepSpeed engine over the backbone and its own ``RemoteTable`` view of
the run's shard actors. Every worker reads the same global batches and trains on
its slice of rows; DeepSpeed averages dense gradients and the shards apply a step
once every worker's row gradients arrived (scaled by 1/workers), so N workers train
the model one process would train on the same global batch.

The driver (this process) owns the run folder: the lead worker streams its records
through the run's desk (``memdist.desk``) and hands back the final metrics and the
backbone's state; the driver gathers the values from the shards itself. Workers want a
GPU each when the cluster has GPUs (``cluster.gpus_per_worker``); who runs where is
printed at start.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import torch

from memdist.assembly import unique_tables
from memdist.config import RunConfig
from memdist.desk import Outbox, start_desk, take
from memdist.errors import WorkerError
from memdist.recovery import Attempt, RecoveryClock, attempt_config, describe
from memdist.runlog import RunReport
from memdist.shards import ShardGroup, TablesSpec, connect_tables, ensure_ray
from memdist.trainer import Trainer, WorkerContext


def driver_node() -> Any:
    """A scheduling strategy that keeps an actor on this (the driver's) node: the run's
    desk must not die with a worker's or a shard's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` less its placement group cleaner, a detached actor that
    asks Ray's state API every second whether the run's controller still lives, to remove
    the workers' placement group if it died. The state API's client finds its cluster
    through the machine's record of the last ``ray start`` (``ray_current_cluster`` in
    Ray's temp folder), not through the cluster it runs in. Where a cluster started that
    way went without ``ray stop`` (a killed head), each ask waited 40 s for its GCS and
    every ``fit`` ended by waiting out the cleaner's stop timeout, 12 s after the workers
    were done (a 6-step run ended 15.3 s after its last record, 3.6 s without the
    cleaner); with no record the asks fail at once, and the cleaner cost a process and
    about 2 s a run. memdist needs no cleaner: when the controller dies, ``fit`` raises,
    the run ends, and with it the driver's job and the placement group (a library caller
    whose process lives on holds the group until it calls ``ray.shutdown``)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            # Train v2's method; mypy reads TorchTrainer as v1's class, which has none.
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return LeanTorchTrainer


def worker_gpus(cfg: RunConfig) -> float:
    """GPUs per worker: the configured number, or 1 when the cluster has a GPU per worker."""
    import ray

    if cfg.cluster.gpus_per_worker is not None:
        return cfg.cluster.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= cfg.cluster.workers else 0.0


class StopSignal:
    """The driver's SIGTERM or Ctrl-C as the lead worker sees it: a look at the run's
    desk that never blocks a step (the answer to one look is read at a later step)."""

    def __init__(self, desk: Any) -> None:
        self.desk = desk
        self._pending: Any = None
        self._set = False

    def __call__(self) -> bool:
        import ray

        if not self._set:
            if self._pending is None:
                self._pending = self.desk.stopping.remote()
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._set, self._pending = ray.get(self._pending), None
        return self._set


def _worker_loop(config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs."""
    import ray.train

    spec: TablesSpec | None = config["spec"]
    desk = config["desk"]
    context = ray.train.get_context()
    ctx = WorkerContext(rank=context.get_world_rank(), world=context.get_world_size())
    attempt: Attempt = ray.get(desk.join.remote(ctx.rank))
    try:
        _train_attempt(config["cfg"], attempt, spec, ctx, desk)
    except BaseException as exc:
        desk.failed.remote(attempt.number, ctx.rank, describe(exc))
        raise


def _train_attempt(
    cfg: RunConfig, attempt: Attempt, spec: TablesSpec | None, ctx: WorkerContext, desk: Any
) -> None:
    """One worker's part of one attempt: after a failure, from the ledger's checkpoint."""
    import ray

    cfg = attempt_config(cfg, attempt)
    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    elif cfg.train.threads is None:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    outbox = Outbox(desk)

    def sink(record: dict[str, Any]) -> None:
        """To the driver; after a recovery each record says which attempt wrote it."""
        if record["kind"] == "checkpoint_done":  # where a later attempt would start
            desk.saved.remote(record["uri"], record["step"])
        outbox.put({**record, "attempt": attempt.number} if attempt.number else record)

    sink({"kind": "placement", "role": "worker", "worker": ctx.rank, "host": socket.gethostname(),
          "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
          "device": device})  # fmt: skip
    if attempt.number and ctx.lead:
        sink({"kind": "recovery", "from_step": attempt.step, "uri": attempt.resume,
              "cause": attempt.cause})  # fmt: skip

    remote = connect_tables(spec, ctx.rank) if spec is not None else None
    stop = StopSignal(desk) if ctx.lead else bool  # the lead decides for all
    out = Trainer(cfg, remote, sink, ctx, stop_requested=stop).run()
    if out is not None:
        outbox.put({"kind": "result", "final": out.final, "state": out.state})
    outbox.flush()  # every record is on the desk before the worker's function returns


def train_with_workers(
    cfg: RunConfig, report: RunReport, group: ShardGroup | None,
    stop: threading.Event | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[Any]]:  # fmt: skip
    """Train with Ray Train workers; returns the final metrics, backbone state and tables.
    ``stop`` set (the driver's SIGTERM or Ctrl-C) ends the run after the current step."""
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig

    ensure_ray(cfg.cluster.address)
    c = cfg.cluster
    gpus = worker_gpus(cfg)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    here = driver_node()  # the driver's helpers live and die with the driver's node
    desk = start_desk(cfg, here)
    clock = RecoveryClock()
    stop_sent = False
    spec = group.spec if group is not None else None
    trainer = trainer_class()(
        _worker_loop,
        train_loop_config={
            "cfg": cfg,
            "spec": spec,
            "desk": desk,
        },  # fmt: skip
        scaling_config=ScalingConfig(
            num_workers=c.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RayRunConfig(
            name="train",
            storage_path=str((report.dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as exc:  # reported by the driver below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="memdist-ray-train", daemon=True)
    thread.start()
    result: dict[str, Any] | None = None
    while True:
        if stop is not None and stop.is_set() and not stop_sent:
            desk.stop.remote()
            stop_sent = True
        done = not thread.is_alive()  # then what is still on the desk is the last
        for record in take(desk, 0.0 if done else 0.5):
            if record["kind"] == "result":
                result = record
            else:
                for out in clock.see(record):
                    report.handle(out)
        if done:
            break
    thread.join()
    causes = ray.get(desk.history.remote())
    ray.kill(desk)
    if "error" in outcome:
        tried = f" after {len(causes) - 1} restarts (cluster.max_failures={c.max_failures})"
        raise WorkerError(
            f"training with {c.workers} workers failed{tried if c.max_failures else ''}: "
            f"{causes[-1] if causes else outcome['error']}"
        ) from outcome["error"]
    if result is None:
        raise WorkerError(f"training with {c.workers} workers ended without a result")
    tables = connect_tables(spec, 0) if spec is not None else []
    return result["final"], result["state"], unique_tables(tables)
