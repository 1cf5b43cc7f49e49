"""One worker's training: data, model, DeepSpeed engine, sparse value steps, logs, eval.

``Trainer(cfg, remote, sink, ctx).run()`` is the same code whether it runs in the
driver's process or as one of several Ray Train workers (``memdist.workers``). It
hands records (header, train, eval, messages) to a sink; the process that owns the
run folder (``memdist.runlog.RunReport``) logs them and draws the progress bar.

The run has fixed phases, each a method, so later features have one place to hook:
``_setup`` (build everything), ``_restore`` (state to start from, before the first
step), ``_train_step`` / ``_after_step`` (logging, evaluation, and where a
checkpoint is taken), ``_finish`` (flush the tables, final eval, the result), and
``_on_failure`` (what a failed run leaves behind).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
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
from memdist.checkpointing import Checkpointer
from memdist.config import RunConfig
from memdist.data.prepare import EvalSets, prepare_data
from memdist.evaluate import all_sum, evaluate
from memdist.model import Transformer, flops_per_token
from memdist.runlog import Sink
from memdist.step import train_step
from memdist.table import ValueTable


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
    tables: list[ValueTable]


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


def global_batch_slices(stream, ctx: WorkerContext, batch_size: int):
    """This worker's rows of each global batch: every worker reads the same stream of
    ``world x batch_size`` rows, so a run is the same training for any worker count."""
    lo, hi = ctx.rank * batch_size, (ctx.rank + 1) * batch_size
    for inputs_BT, targets_BT in stream:
        yield inputs_BT[lo:hi], targets_BT[lo:hi]


def prefetch_hint(model: Transformer):
    """A ``train_step`` hint: the rows the first memory layer will read for the coming
    inputs, sent to its table ahead of the lookup (``shards.prefetch``)."""

    def hint(inputs_BT: torch.Tensor) -> None:
        found = model.first_memory_rows(inputs_BT)
        if found is not None:
            found[0].table.prefetch(found[1])

    return hint


@dataclass(slots=True)
class _Window:
    """Steps since the last train record."""

    loss: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    waited: float = 0.0  # of those seconds, spent waiting on shards


class Trainer:
    """One worker's loop; the lead worker (rank 0) reports and returns the result.

    ``remote`` are this worker's remote tables, one per memory layer (None: local
    tables built here). ``sink(record)`` is called on the lead worker only.
    """

    def __init__(
        self, cfg: RunConfig, remote: Sequence[ValueTable] | None, sink: Sink,
        ctx: WorkerContext = WorkerContext(), *, stop_requested: Callable[[], bool] = bool,
    ) -> None:  # fmt: skip
        """``stop_requested()`` true (a SIGTERM or Ctrl-C in the driver) ends the run after
        the current step, with a checkpoint when checkpoints are on."""
        self.cfg = cfg
        self.remote = remote
        self.ctx = ctx
        self.stop_requested = stop_requested
        self.checkpointer = Checkpointer(cfg, ctx.rank, ctx.world)
        self.saved_step = -1
        self.emit: Sink = sink if ctx.lead else (lambda record: None)
        self.step = 0
        self.tokens = 0
        self.last_loss = float("nan")
        self.train_seconds = 0.0

    # -- phases ----------------------------------------------------------------------
    def run(self) -> WorkerResult | None:
        self.t_start = time.perf_counter()
        self._setup()
        try:
            self._restore()
            self._loop()
        except BaseException as exc:
            self._on_failure(exc)
            raise
        return self._finish()

    def _setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.rt = resolve_runtime(cfg)
        b = cfg.data.batch_size
        global_cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, batch_size=b * ctx.world)
        )
        stream, self.evals = prepare_data(global_cfg)
        self.batches = global_batch_slices(stream, ctx, b)
        model, tables = build_model(cfg, self.rt.device, self.remote)
        self.tables: list[ValueTable] = unique_tables(tables)
        if cfg.train.init_from is not None:
            # Before the engine: DeepSpeed broadcasts and partitions what it is given, and
            # its set-up is where workers wait for each other, so no worker reads a row
            # before the lead has written the tables (shard servers hold one copy).
            checkpoint.load_weights(
                Path(cfg.train.init_from).expanduser(), model,
                self.tables if ctx.lead else [], optimizer_state=False,
            )  # fmt: skip
        self.flops = flops_per_token(cfg.model, cfg.data.seq_len)
        self.n_dense = sum(p.numel() for p in model.parameters())
        self.n_values = sum(t.num_rows * t.dim for t in self.tables)
        resume = cfg.train.checkpoint.resume
        universal = resume is not None and self.checkpointer.check_resume(resume)
        self.engine = make_engine(cfg, model, self.rt, universal=universal)
        self.tokens_per_step = b * ctx.world * cfg.data.seq_len * cfg.train.grad_accum
        self.hint = prefetch_hint(self.engine.module) if cfg.shards.prefetch else None
        self.emit({
            "kind": "start",
            "config": cfg.name,
            "device": str(self.rt.device),
            "dtype": str(self.rt.dtype),
            "dense_params": self.n_dense,
            "value_params": self.n_values,
            "flops_per_token": self.flops["forward"],
            "train_flops_per_token": self.flops["train"],
            "shards": cfg.shards.count,
            "workers": ctx.world,
            "zero_stage": self.engine.zero_optimization_stage(),
            "tables": [t.describe() for t in self.tables],
            "deepspeed_overrides": deepspeed_config(cfg, self.rt)[1],
        })  # fmt: skip

    def _restore(self) -> None:
        """The state the first step starts from: a fresh run starts from the built model
        and step 0; resuming loads the checkpoint here, before any batch is read, and
        skips the batches the saved steps consumed (the data stream is deterministic)."""
        where = self.cfg.train.checkpoint.resume
        if where is None:
            return
        self.emit({"kind": "message", "text": f"loading checkpoint {where}"})
        state = self.checkpointer.restore(where, self.engine, self.tables)
        self.step = self.saved_step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_seconds = float(state["train_seconds"])
        for _ in range(self.step * self.cfg.train.grad_accum):
            next(self.batches)
        mb, seconds = state["loaded_mb"], state["load_seconds"]
        self.emit({"kind": "message", "text": f"resumed from {state['uri']} at step {self.step} "
                   f"(read {mb:.1f} MB in {seconds:.1f} s, {mb / max(seconds, 1e-9):.1f} MB/s)"})  # fmt: skip

    def _save(self) -> None:
        """A checkpoint of the step just finished (every worker takes part)."""
        state = {"tokens": self.tokens, "train_seconds": self.train_seconds}
        uri = self.checkpointer.save(self.step, self.engine, self.tables, state)
        self.saved_step = self.step
        self.emit({"kind": "checkpoint", "step": self.step, "uri": uri})

    def _take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(self.batches) for _ in range(self.cfg.train.grad_accum)]

    def _loop(self) -> None:
        cfg = self.cfg
        deadline = self.t_start + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
        self.window = _Window()
        upcoming = self._take()  # read one step ahead, so the next step's rows can be hinted
        if self.hint is not None:
            self.hint(upcoming[0][0].to(self.rt.device))
        for step in range(self.step + 1, cfg.train.steps + 1):
            micro, upcoming = upcoming, (self._take() if step < cfg.train.steps else [])
            next_inputs = upcoming[0][0] if upcoming else None
            stop = self._train_step(step, micro, next_inputs, deadline)
            self._after_step(step, stop is not None)
            if stop is not None:
                self.emit({"kind": "message", "text": f"stopping at step {step}: {stop}"})
                break

    def _train_step(self, step: int, micro, next_inputs, deadline: float | None) -> str | None:
        """One optimizer step; returns why the workers agreed to stop after it, or None."""
        t0, waited0 = time.perf_counter(), self._waited()
        loss = train_step(
            self.engine, self.tables, micro, self.rt.device, hint=self.hint,
            next_inputs=next_inputs,
        )  # fmt: skip
        dt = time.perf_counter() - t0
        self.window.waited += self._waited() - waited0  # not evaluation's or a save's waits
        out_of_time = deadline is not None and time.perf_counter() > deadline
        # Workers agree on the mean loss and on stopping (the lead's clock decides).
        lead = self.ctx.lead
        agreed = torch.tensor(
            [loss, float(out_of_time and lead), float(self.stop_requested() and lead)],
            dtype=torch.float64,
        )
        loss_sum, timed_out, interrupted = all_sum(agreed, self.ctx.world).tolist()
        self.step = step
        self.last_loss = loss_sum / self.ctx.world
        self.train_seconds += dt
        self.tokens += self.tokens_per_step
        w = self.window
        w.loss, w.seconds, w.steps = w.loss + self.last_loss, w.seconds + dt, w.steps + 1
        if interrupted:
            return "interrupted (SIGTERM or Ctrl-C)"
        if timed_out:
            return f"train.max_minutes={self.cfg.train.max_minutes} reached"
        return None

    def _after_step(self, step: int, stopping: bool) -> None:
        """Progress, the periodic train record and evaluation; a checkpoint goes here."""
        cfg = self.cfg
        self.emit({"kind": "tick", "step": step})
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or stopping:
            self.emit(self._train_record(step))
        every = cfg.train.checkpoint.every
        if self.checkpointer.enabled and every and step % every == 0 and step < cfg.train.steps:
            self._save()
        for record in self.checkpointer.drain():  # saves finished in the background
            self.emit(record)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            result = run_eval(cfg, self._eval_model(), self.evals, self.ctx)
            self.emit({"kind": "eval", "step": step, "tokens": self.tokens, **result})

    def _waited(self) -> float:
        return sum(t.wait_seconds for t in self.tables)

    def _train_record(self, step: int) -> dict[str, Any]:
        w = self.window
        rec = {
            "kind": "train",
            "step": step,
            "tokens": self.tokens,
            "loss": w.loss / w.steps,
            "lr": next(iter(self.engine.get_lr()), None),  # None: a frozen backbone
            "tokens_per_s": self.tokens_per_step * w.steps / w.seconds,
            "rows_touched": sum(t.rows_touched_last_step for t in self.tables),
            # The values' gradient norm (before clipping) of the last step, all tables.
            "value_grad_norm": math.sqrt(sum(t.last_step.grad_norm**2 for t in self.tables)),
        }
        if self.remote is not None:  # the share of step time workers waited on shards
            # Each worker's share of its own step time, averaged: a worker's steps may be
            # shorter than another's waits (the lead writes records between its steps).
            shares = all_sum(torch.tensor([w.waited / w.seconds], dtype=torch.float64),
                             self.ctx.world)  # fmt: skip
            rec["memory_wait_share"] = float(shares) / self.ctx.world
        if self.hint is not None:  # rows this worker's hints had the shards read so far
            rec["rows_prefetched"] = sum(t.rows_prefetched for t in self.tables)
        self.window = _Window()
        return rec

    def _eval_model(self):
        """The backbone to evaluate: the engine's own, or under ZeRO-3 with several
        workers a whole copy (each worker decodes its own questions, so forwards are not
        in step and ZeRO-3's parameter gathers would wait on each other)."""
        engine = self.engine
        if self.ctx.world == 1 or engine.zero_optimization_stage() != 3:
            return engine.module
        device = next(engine.module.parameters()).device
        tables = [layer.table for layer in engine.module.memory_layers()]
        copy = Transformer(self.cfg.model, tables).to(device)
        copy.load_state_dict(checkpoint.full_state_dict(engine.module))
        return copy

    def _on_failure(self, exc: BaseException) -> None:
        """A failed run stops here. Nothing half-applied is left to undo: a table applies
        a step whole or not at all (the shards' barrier); recovering from the last
        checkpoint will start from this point. A save being written is let finish."""
        self.checkpointer.wait(raise_error=False)
        self.emit({"kind": "message", "text": f"worker {self.ctx.rank} failed at step "
                   f"{self.step + 1}: {type(exc).__name__}: {exc}"})  # fmt: skip

    def _finish(self) -> WorkerResult | None:
        cfg, ctx = self.cfg, self.ctx
        for table in self.tables:
            table.flush()
        if self.checkpointer.enabled and self.saved_step != self.step:
            self._save()
        result = run_eval(cfg, self._eval_model(), self.evals, ctx)  # while the save is written
        self.checkpointer.wait(emit=self.emit)  # the last checkpoint is complete at the end
        for record in self.checkpointer.drain():
            self.emit(record)
        self.emit({"kind": "eval", "step": self.step, "tokens": self.tokens, **result})
        state = checkpoint.full_state_dict(self.engine.module)  # a collective under ZeRO-3
        if not ctx.lead:
            return None
        final = {
            "step": self.step,
            "loss": self.last_loss,
            "qa_em": result["qa_em"],
            "qa_f1": result["qa_f1"],
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else 0.0,
            "ppl": result["ppl"],
            "eval_loss": result["eval_loss"],
            "tokens": self.tokens,
            "config": cfg.name,
            "flops_per_token": self.flops["forward"],
            "dense_params": self.n_dense,
            "value_params": self.n_values,
            "workers": ctx.world,
            "seconds": time.perf_counter() - self.t_start,
        }
        for key in ("key_usage", "key_kl"):
            if key in result:
                final[key] = result[key]
        if self.evals.chance_em is not None:
            final["qa_chance_em"] = self.evals.chance_em
        return WorkerResult(final, state, self.tables)
