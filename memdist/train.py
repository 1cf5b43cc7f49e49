"""The training loop: data, model, DeepSpeed engine, sparse value updates, logging, eval.

``train(cfg, run_dir)`` is what ``memdist train`` runs. Dense parameters step in the
DeepSpeed engine; value tables step their own sparse optimizer at the same
gradient-accumulation boundary, so both see the same (averaged) gradients.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from memdist import checkpoint
from memdist.assembly import build_model, make_engine, resolve_runtime, unique_tables
from memdist.config import RunConfig
from memdist.data.prepare import EvalSets, prepare_data
from memdist.evaluate import evaluate
from memdist.model import flops_per_token
from memdist.runlog import RunLog
from memdist.step import train_step


@dataclass(slots=True)
class StepStats:
    loss: float
    tokens: int
    seconds: float


def run_eval(model, evals: EvalSets, cfg: RunConfig) -> dict[str, Any]:
    return evaluate(
        model,
        evals.qa,
        evals.ppl_texts,
        max_qa=cfg.eval.max_qa,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )


def train(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` and return the final metrics (also written to ``run_dir``).

    With ``shards.count`` > 0 the value tables live in shard servers, started here
    and stopped when training ends (or fails).
    """
    group = None
    remote = None
    if cfg.shards.count > 0:
        from memdist.shards import start_remote_tables

        remote, group = start_remote_tables(cfg, Path(run_dir) / "shards")
        for plan in group.plans:
            tqdm.write(plan.describe(), file=sys.stderr)
    try:
        return _train(cfg, run_dir, remote, progress)
    finally:
        if group is not None:
            group.stop()


def _train(cfg: RunConfig, run_dir: Path, remote, progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rt = resolve_runtime(cfg)
    log = RunLog(run_dir, cfg)
    stream, evals = prepare_data(cfg)
    model, tables = build_model(cfg, rt.device, remote)
    tables = unique_tables(tables)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    n_dense = sum(p.numel() for p in model.parameters())
    n_values = sum(t.num_rows * t.dim for t in tables)
    header = {
        "kind": "start",
        "config": cfg.name,
        "device": str(rt.device),
        "dtype": str(rt.dtype),
        "dense_params": n_dense,
        "value_params": n_values,
        "flops_per_token": flops["forward"],
        "train_flops_per_token": flops["train"],
        "shards": cfg.shards.count,
        "plans": [t.plan.kind for t in tables if hasattr(t, "plan")],
    }
    log.log(header)
    tqdm.write(json.dumps({k: v for k, v in header.items() if k != "kind"}), file=sys.stderr)
    engine = make_engine(cfg, model, rt)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    deadline = t_start + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    batches = iter(stream)
    # In a log file (no terminal) redraw rarely, so the log stays readable.
    bar = tqdm(
        total=cfg.train.steps, desc=cfg.name, unit="step", disable=not progress,
        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )  # fmt: skip
    window: list[StepStats] = []
    step, tokens, last_loss = 0, 0, float("nan")
    train_seconds = 0.0
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        last_loss = train_step(engine, tables, micro, rt.device)
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens += tokens_per_step
        window.append(StepStats(last_loss, tokens_per_step, dt))
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            w_tokens = sum(s.tokens for s in window)
            rec = {
                "kind": "train",
                "step": step,
                "tokens": tokens,
                "loss": sum(s.loss for s in window) / len(window),
                "lr": engine.get_lr()[0],
                "tokens_per_s": w_tokens / sum(s.seconds for s in window),
                "rows_touched": sum(t.rows_touched_last_step for t in tables),
            }
            log.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window = []
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            rec = {
                "kind": "eval",
                "step": step,
                "tokens": tokens,
                **run_eval(engine.module, evals, cfg),
            }
            log.log(rec)
            tqdm.write(
                json.dumps({k: rec[k] for k in ("step", "eval_loss", "qa_em", "qa_f1")}),
                file=sys.stderr,
            )
        if deadline is not None and time.perf_counter() > deadline:
            tqdm.write(
                f"stopping at step {step}: train.max_minutes={cfg.train.max_minutes} reached",
                file=sys.stderr,
            )
            break
    bar.close()

    result = run_eval(engine.module, evals, cfg)
    log.log({"kind": "eval", "step": step, "tokens": tokens, **result})
    checkpoint.save_weights(run_dir, engine.module, tables)
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
        "seconds": time.perf_counter() - t_start,
        "run_dir": str(run_dir),
    }
    for key in ("key_usage", "key_kl", "qa_chance_em"):
        if key in result:
            final[key] = result[key]
    if evals.chance_em is not None:
        final["qa_chance_em"] = evals.chance_em
    log.finish(final)
    return final


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Re-evaluate a finished run from its folder (``memdist eval RUN_DIR``)."""
    from memdist.runlog import load_run_config, read_metrics

    cfg = load_run_config(run_dir)
    rt = resolve_runtime(cfg)
    _, evals = prepare_data(cfg)
    model, tables = build_model(cfg, rt.device)
    checkpoint.load_weights(run_dir, model, unique_tables(tables))
    result = run_eval(model, evals, cfg)
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
