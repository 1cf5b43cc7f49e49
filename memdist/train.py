"""The training loop: data, model, DeepSpeed engine, sparse value updates, logging, eval.

``train(cfg, run_dir)`` is what ``memdist train`` runs. Dense parameters step in the
DeepSpeed engine; value tables step their own sparse optimizer at the same
gradient-accumulation boundary, so both see the same (averaged) gradients.

``run_worker`` is one worker's loop, the same code whether it runs in this process
or as one of several Ray Train workers (``memdist.workers``). It hands records
(header, train, eval, messages) to a sink; the process that owns the run folder
(``RunReport``) logs them and draws the progress bar.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memdist import checkpoint
from memdist.assembly import (
    build_model,
    deepspeed_config,
    make_engine,
    resolve_runtime,
    unique_tables,
)
from memdist.config import RunConfig
from memdist.data.prepare import EvalSets, prepare_data
from memdist.evaluate import all_sum, evaluate
from memdist.model import Transformer, flops_per_token
from memdist.runlog import RunReport, Sink
from memdist.step import train_step


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """Which data-parallel worker this process is (rank 0 of 1 when training alone)."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0


@dataclass(slots=True)
class WorkerResult:
    """What the lead worker hands back: final metrics and the backbone's whole state."""

    final: dict[str, Any]
    state: dict[str, torch.Tensor]
    tables: list[Any]


def run_eval(cfg: RunConfig, model, evals: EvalSets, ctx: WorkerContext) -> dict[str, Any]:
    """Every worker evaluates its slice; torchmetrics combines the slices' results."""
    return evaluate(
        model,
        evals.qa,
        evals.ppl_texts,
        max_qa=cfg.eval.max_qa,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        rank=ctx.rank,
        world=ctx.world,
    )


def uses_workers(cfg: RunConfig) -> bool:
    return cfg.cluster.workers > 1 or cfg.cluster.address is not None


def train(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` and return the final metrics (also written to ``run_dir``).

    With ``shards.count`` > 0 the value tables live in shard servers, started here
    and stopped when training ends (or fails). With ``cluster.workers`` > 1 (or a
    cluster address) the backbone trains in Ray Train workers; otherwise here.
    """
    run_dir = Path(run_dir)
    report = RunReport(run_dir, cfg, progress=progress)
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
        if uses_workers(cfg):
            from memdist.workers import train_with_workers

            final, state, tables = train_with_workers(cfg, report, group)
        else:
            out = run_worker(cfg, remote, report.handle)
            assert out is not None  # the only worker leads
            final, state, tables = out.final, out.state, out.tables
        checkpoint.save_weights(run_dir, state, tables)
        for i, table in enumerate(tables):  # the shards' own counters and timers
            if hasattr(table, "stats"):
                report.handle({"kind": "shards", "table": i, "stats": table.stats()})
        return report.finish(final)
    finally:
        report.close()
        if group is not None:
            group.stop()


def global_batch_slices(stream, ctx: WorkerContext, batch_size: int):
    """This worker's rows of each global batch: every worker reads the same stream of
    ``world x batch_size`` rows, so a run is the same training for any worker count."""
    lo, hi = ctx.rank * batch_size, (ctx.rank + 1) * batch_size
    for inputs_BT, targets_BT in stream:
        yield inputs_BT[lo:hi], targets_BT[lo:hi]


def eval_model(cfg: RunConfig, engine, tables, ctx: WorkerContext):
    """The backbone to evaluate: the engine's own, or under ZeRO-3 with several workers a
    whole copy (each worker decodes its own questions, so forwards are not in step and
    ZeRO-3's parameter gathers would wait on each other)."""
    if ctx.world == 1 or engine.zero_optimization_stage() != 3:
        return engine.module
    device = next(engine.module.parameters()).device
    copy = Transformer(cfg.model, tables).to(device)
    copy.load_state_dict(checkpoint.full_state_dict(engine.module))
    return copy


def prefetch_hint(model: Transformer):
    """A ``train_step`` hint: the rows the first memory layer will read for the coming
    inputs, sent to its shards ahead of the lookup (``shards.prefetch``)."""

    def hint(inputs_BT: torch.Tensor) -> None:
        found = model.first_memory_rows(inputs_BT)
        if found is not None and hasattr(found[0].table, "prefetch"):
            found[0].table.prefetch(found[1])

    return hint


def run_worker(
    cfg: RunConfig, remote, sink: Sink, ctx: WorkerContext = WorkerContext()
) -> WorkerResult | None:
    """One worker's training loop; the lead worker (rank 0) reports and returns the result.

    ``remote`` are this worker's ``RemoteTable`` objects, one per memory layer (None:
    local tables). ``sink(record)`` is called on the lead worker only.
    """
    t_start = time.perf_counter()
    emit = sink if ctx.lead else (lambda record: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rt = resolve_runtime(cfg)
    b = cfg.data.batch_size
    global_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=b * ctx.world)
    )
    stream, evals = prepare_data(global_cfg)
    model, tables = build_model(cfg, rt.device, remote)
    tables = unique_tables(tables)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    n_dense = sum(p.numel() for p in model.parameters())
    n_values = sum(t.num_rows * t.dim for t in tables)
    engine = make_engine(cfg, model, rt)
    emit({
        "kind": "start",
        "config": cfg.name,
        "device": str(rt.device),
        "dtype": str(rt.dtype),
        "dense_params": n_dense,
        "value_params": n_values,
        "flops_per_token": flops["forward"],
        "train_flops_per_token": flops["train"],
        "shards": cfg.shards.count,
        "workers": ctx.world,
        "zero_stage": engine.zero_optimization_stage(),
        "plans": [t.plan.kind for t in tables if hasattr(t, "plan")],
        "deepspeed_overrides": deepspeed_config(cfg, rt)[1],
    })  # fmt: skip

    tokens_per_step = b * ctx.world * cfg.data.seq_len * cfg.train.grad_accum
    deadline = t_start + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    batches = global_batch_slices(stream, ctx, b)
    hint = prefetch_hint(engine.module) if cfg.shards.prefetch and remote is not None else None
    window_loss, window_seconds = 0.0, 0.0
    window_steps = 0
    step, tokens, last_loss = 0, 0, float("nan")
    train_seconds = 0.0
    wait0 = sum(getattr(t, "wait_seconds", 0.0) for t in tables)

    def take() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(batches) for _ in range(cfg.train.grad_accum)]

    upcoming = take()  # read one step ahead, so the next step's rows can be hinted
    if hint is not None:
        hint(upcoming[0][0].to(rt.device))
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        micro, upcoming = upcoming, (take() if step < cfg.train.steps else [])
        next_inputs = upcoming[0][0] if upcoming else None
        loss = train_step(engine, tables, micro, rt.device, hint=hint, next_inputs=next_inputs)
        dt = time.perf_counter() - t0
        out_of_time = deadline is not None and time.perf_counter() > deadline
        # Workers agree on the mean loss and on stopping (the lead's clock decides).
        agreed = torch.tensor([loss, float(out_of_time and ctx.lead)], dtype=torch.float64)
        loss_sum, stop = all_sum(agreed, ctx.world).tolist()
        last_loss = loss_sum / ctx.world
        train_seconds += dt
        tokens += tokens_per_step
        emit({"kind": "tick", "step": step})
        window_loss, window_seconds, window_steps = (
            window_loss + last_loss,
            window_seconds + dt,
            window_steps + 1,
        )
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or stop:
            wait = sum(getattr(t, "wait_seconds", 0.0) for t in tables)
            rec = {
                "kind": "train",
                "step": step,
                "tokens": tokens,
                "loss": window_loss / window_steps,
                "lr": engine.get_lr()[0],
                "tokens_per_s": tokens_per_step * window_steps / window_seconds,
                "rows_touched": sum(t.rows_touched_last_step for t in tables),
            }
            if remote is not None:  # the share of step time workers waited on shards
                waited = all_sum(torch.tensor([wait - wait0], dtype=torch.float64), ctx.world)
                rec["memory_wait_share"] = float(waited) / ctx.world / window_seconds
            if hint is not None:  # rows this worker's hints had the shards read so far
                rec["rows_prefetched"] = sum(getattr(t, "rows_prefetched", 0) for t in tables)
            wait0 = wait
            emit(rec)
            window_loss, window_seconds, window_steps = 0.0, 0.0, 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            result = run_eval(cfg, eval_model(cfg, engine, tables, ctx), evals, ctx)
            emit({"kind": "eval", "step": step, "tokens": tokens, **result})
        if stop:
            emit({
                "kind": "message",
                "text": f"stopping at step {step}: train.max_minutes={cfg.train.max_minutes} reached",
            })  # fmt: skip
            break
    for table in tables:
        if hasattr(table, "flush"):
            table.flush()

    result = run_eval(cfg, eval_model(cfg, engine, tables, ctx), evals, ctx)
    emit({"kind": "eval", "step": step, "tokens": tokens, **result})
    state = checkpoint.full_state_dict(engine.module)  # a collective under ZeRO-3
    if not ctx.lead:
        return None
    final = {
        "step": step,
        "loss": last_loss,
        "qa_em": result["qa_em"],
        "qa_f1": result["qa_f1"],
        "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
        "ppl": result["ppl"],
        "eval_loss": result["eval_loss"],
        "tokens": tokens,
        "config": cfg.name,
        "flops_per_token": flops["forward"],
        "dense_params": n_dense,
        "value_params": n_values,
        "workers": ctx.world,
        "seconds": time.perf_counter() - t_start,
    }
    for key in ("key_usage", "key_kl"):
        if key in result:
            final[key] = result[key]
    if evals.chance_em is not None:
        final["qa_chance_em"] = evals.chance_em
    return WorkerResult(final, state, tables)


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Re-evaluate a finished run from its folder (``memdist eval RUN_DIR``)."""
    from memdist.runlog import load_run_config, read_metrics

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
