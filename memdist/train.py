"""``memdist train`` and ``memdist eval``: the driver of a run.

``train(cfg, run_dir)`` owns the run folder: it starts the shard servers (when the
tables live in shards), runs one ``memdist.trainer.Trainer`` here or several Ray
Train workers (``memdist.workers``), writes the weights and the final metrics, and
stops what it started. ``evaluate_run`` re-evaluates a finished run folder.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memdist import checkpoint
from memdist.assembly import build_model, resolve_runtime, unique_tables
from memdist.checkpointing import Checkpointer
from memdist.config import RunConfig
from memdist.data.prepare import prepare_data
from memdist.errors import ConfigError
from memdist.runlog import RunReport, load_run_config, read_metrics
from memdist.trainer import Trainer, WorkerContext, run_eval


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM (a spot instance's notice) or a first Ctrl-C sets the event: the run
    stops after the current step and saves a checkpoint. A second Ctrl-C interrupts
    at once. Outside the main thread, nothing is installed."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# The most table (rows and optimizer state) the driver gathers into the run folder; the
# driver holds about twice that while it saves (the shards' pieces and the whole).
GATHER_VALUES_MB = 4096.0


def gathers_values(cfg: RunConfig) -> bool:
    """Whether the run folder gets ``values.safetensors``: the driver would gather each
    table whole with its optimizer state, which only a small table allows. A larger one
    is kept by checkpoints, where each shard writes its own region, so they must be on."""
    from memdist.from_checkpoint import table_mb

    gathered = table_mb(cfg, with_state=True)
    if not cfg.train.save_tables:
        return False
    if gathered <= GATHER_VALUES_MB:
        return True
    if cfg.train.checkpoint.dir is None:
        raise ConfigError(
            f"a value table of {gathered:.0f} MB with its optimizer state is more than the "
            f"driver gathers into the run folder ({GATHER_VALUES_MB:g} MB): set "
            "train.checkpoint.dir (--checkpoint-dir), "
            "where each shard saves its own region"
        )
    return False


def uses_workers(cfg: RunConfig) -> bool:
    """Whether the backbone trains in Ray Train workers: several of them, a cluster, or
    recovery from failures (Ray Train restarts the workers)."""
    c = cfg.cluster
    return c.workers > 1 or c.address is not None or c.max_failures > 0


def train(
    cfg: RunConfig, run_dir: Path, *, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train ``cfg`` and return the final metrics (also written to ``run_dir``).

    ``run_dir`` must be new or empty (one run per folder); ``overwrite`` empties a
    previous run's folder first. Either is settled before any shard or worker starts.
    With ``shards.count`` > 0 the value tables live in shard servers, started here
    and stopped when training ends (or fails). With ``cluster.workers`` > 1 (or a
    cluster address) the backbone trains in Ray Train workers; otherwise here.
    """
    run_dir = Path(run_dir)
    gathers = gathers_values(cfg)
    checkpointer = Checkpointer(cfg, world=max(1, cfg.cluster.workers))
    checkpointer.check()  # an unwritable checkpoint target fails now, not at step N
    if cfg.train.checkpoint.resume is not None:  # so does a checkpoint that cannot resume here
        checkpointer.check_resume(cfg.train.checkpoint.resume)
    report = RunReport(run_dir, cfg, progress=progress, overwrite=overwrite)
    group = None
    remote = None
    try:
        if cfg.model.memory is not None and cfg.shards.count > 0:
            from memdist.shards import start_remote_tables

            stores = cfg.shards.store_dir
            store_root = Path(stores) / run_dir.name if stores else run_dir / "shards"
            remote, group = start_remote_tables(cfg, store_root)
            for plan in group.plans:
                report.message(plan.describe())
            for where in group.where():
                report.handle({"kind": "placement", "role": "shard", **where})
        with stop_on_signals() as stop:
            if uses_workers(cfg):
                from memdist.workers import train_with_workers  # imports Ray Train

                final, state, tables = train_with_workers(cfg, report, group, stop)
            else:
                out = Trainer(cfg, remote, report.handle, stop_requested=stop.is_set).run()
                assert out is not None  # the only worker leads
                final, state, tables = out.final, out.state, out.tables
        checkpoint.save_weights(run_dir, state, tables if gathers else [])
        if not cfg.train.save_tables:
            report.message("the value tables were not saved (train.save_tables=false)")
        elif not gathers:
            report.message(
                f"the value tables stay in the checkpoints under {cfg.train.checkpoint.dir} "
                f"(over {GATHER_VALUES_MB:g} MB, the run folder keeps the backbone only)"
            )
        for i, table in enumerate(tables):  # the tables' (shards') counters and timers
            report.handle({"kind": "shards", "table": i, "stats": table.stats()})
        return report.finish(final)
    finally:
        report.close()
        if group is not None:
            group.stop()


def evaluate_checkpoint(uri: str, *, endpoint_url: str | None = None,
                        max_table_mb: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the model of a checkpoint (``memdist eval URI``), its tables in this
    process or, over ``max_table_mb``, in shard servers as the run had them."""
    from memdist.from_checkpoint import DEFAULT_MAX_TABLE_MB, load_model

    budget = DEFAULT_MAX_TABLE_MB if max_table_mb is None else max_table_mb
    with load_model(uri, endpoint_url=endpoint_url, max_table_mb=budget) as loaded:
        _, evals = prepare_data(loaded.cfg)
        result = run_eval(loaded.cfg, loaded.model, evals, WorkerContext())
    out = {"checkpoint": uri, "config": loaded.cfg.name, **result}
    if evals.chance_em is not None:
        out["qa_chance_em"] = evals.chance_em
    return out


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Re-evaluate a finished run from its folder (``memdist eval RUN_DIR``)."""
    cfg = load_run_config(run_dir)
    rt = resolve_runtime(cfg)
    _, evals = prepare_data(cfg)
    model, tables = build_model(cfg, rt.device)
    checkpoint.load_weights(run_dir, model, unique_tables(tables))
    result = run_eval(cfg, model, evals, WorkerContext())
    train_recs = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    last = train_recs[-1] if train_recs else {}
    out = {
        "step": last.get("step", 0),
        "loss": last.get("loss", float("nan")),
        "qa_em": result["qa_em"],
        "qa_f1": result["qa_f1"],
        "tokens_per_s": last.get("tokens_per_s", 0.0),
        "ppl": result["ppl"],
        "eval_loss": result["eval_loss"],
        "config": cfg.name,
        "run_dir": str(run_dir),
    }
    for key in ("key_usage", "key_kl"):
        if key in result:
            out[key] = result[key]
    if evals.chance_em is not None:
        out["qa_chance_em"] = evals.chance_em
    return out
