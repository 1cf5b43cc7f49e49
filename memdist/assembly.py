"""Assembling a run: where values live, which device, and the DeepSpeed engine.

The model code is single-device; this module decides the rest. ``build_tables``
materialises local value tables (one per memory block, or one shared pool);
``build_model`` builds the backbone around them; ``make_engine`` wraps the backbone
(and only the backbone) in a DeepSpeed engine with the configured ZeRO stage.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memdist.config import MemoryConfig, ModelConfig, RunConfig
from memdist.errors import ConfigError
from memdist.kernels import OptimizerSpec, jit_build
from memdist.model import Transformer
from memdist.values import LocalTable


@dataclass(frozen=True, slots=True)
class Runtime:
    """Device and precision a run resolved to."""

    device: torch.device
    dtype: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def resolve_runtime(cfg: RunConfig) -> Runtime:
    """``auto`` means CUDA + bf16 when a GPU is there, else CPU + fp32."""
    dev = cfg.train.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if dev == "cuda" else "fp32"
    return Runtime(torch.device(dev), torch.bfloat16 if prec == "bf16" else torch.float32)


def table_seed(run_seed: int, table: int) -> int:
    """The init seed of the ``table``-th value table of a run."""
    return run_seed * 1000 + table


def value_optimizer(mem: MemoryConfig) -> OptimizerSpec:
    """The values' optimizer, built once from the config and handed down to the kernels."""
    return OptimizerSpec(
        name=mem.value_optimizer, lr=mem.value_lr, eps=mem.value_eps,
        betas=(mem.value_betas[0], mem.value_betas[1]), weight_decay=mem.value_weight_decay,
        grad_clip=mem.value_grad_clip,
    )  # fmt: skip


def build_tables(cfg: ModelConfig, device: torch.device, seed: int) -> list[LocalTable]:
    """One local table per memory block, or the same object for all when shared."""
    mem = cfg.memory
    if mem is None:
        return []
    v_dim = mem.v_dim if mem.v_dim is not None else cfg.dim
    spec = value_optimizer(mem)

    def make(i: int) -> LocalTable:
        return LocalTable(
            mem.rows, v_dim, spec, backend=mem.backend, device=device, seed=table_seed(seed, i)
        )

    if mem.shared_table:
        shared = make(0)
        return [shared for _ in mem.layers]
    return [make(i) for i in range(len(mem.layers))]


def unique_tables(tables: list[Any]) -> list[Any]:
    """Each table once, in order (a shared pool appears once)."""
    seen: dict[int, Any] = {}
    for t in tables:
        seen.setdefault(id(t), t)
    return list(seen.values())


def build_model(
    cfg: RunConfig, device: torch.device, tables: Sequence[Any] | None = None
) -> tuple[Transformer, list[Any]]:
    """The backbone around ``tables`` (default: fresh local tables on ``device``)."""
    torch.manual_seed(cfg.train.seed)
    built: list[Any] = (
        list(tables) if tables is not None else build_tables(cfg.model, device, cfg.train.seed)
    )
    model = Transformer(cfg.model, built).to(device)
    return model, built


def lr_lambda(cfg: RunConfig):
    """Linear warmup to optim.lr, then cosine decay to optim.lr * min_lr_ratio."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg: RunConfig, rt: Runtime, *,
                     universal: bool = False) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The engine's config and one note per value of the user's JSON memdist replaced.

    Without ``train.deepspeed`` memdist writes the whole config from its own keys. With
    it the user's JSON is the config; memdist fills only what the data loader and
    precision fix (micro-batch, accumulation, bf16/fp16) and what is missing
    (ZeRO stage, clipping), and drops ``train_batch_size`` (DeepSpeed derives it from
    the world size). An ``optimizer`` or ``scheduler`` section replaces memdist's.
    ``universal``: the engine will load a DeepSpeed universal checkpoint (a ZeRO
    checkpoint of another worker count, converted on resume).
    """
    must: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "bf16": {"enabled": rt.bf16},
        "fp16": {"enabled": False},
    }
    if universal:
        must["checkpoint"] = {"load_universal": True}
    if cfg.train.freeze_backbone:
        must["gradient_clipping"] = 0.0  # no backbone gradient to clip (DeepSpeed's fails)
    defaults: dict[str, Any] = {
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.train.deepspeed is None:
        return {**defaults, **must}, []
    user = load_deepspeed_json(cfg.train.deepspeed)
    notes = []
    for key, value in must.items():
        if key in user and _differs(user[key], value):
            notes.append(f"{key}: {user[key]!r} -> {value!r} (memdist's data and precision)")
    if "train_batch_size" in user:
        notes.append(f"train_batch_size: {user['train_batch_size']!r} dropped (derived)")
    merged = {k: v for k, v in user.items() if k != "train_batch_size"}
    merged.update(must)
    for key, value in defaults.items():
        merged.setdefault(key, value)
    return merged, notes


def _differs(user: Any, ours: Any) -> bool:
    if isinstance(ours, dict) and isinstance(user, dict):
        return any(user.get(k) != v for k, v in ours.items())
    return user != ours


def load_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed={path!r} is not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed={path!r} must hold a JSON object, not {type(data)}")
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A one-process gloo group for DeepSpeed when no launcher set one up."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(
        dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False
    )


def make_optimizer(cfg: RunConfig, model: torch.nn.Module):
    """AdamW over the backbone (no decay on norms, biases and product keys) and its schedule."""
    o = cfg.optim
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "keys" not in n]
    no_decay = [p for n, p in trained if p.ndim < 2 or "keys" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def make_engine(cfg: RunConfig, model: torch.nn.Module, rt: Runtime, *, universal: bool = False):
    """A DeepSpeed engine over the backbone's parameters (never the value tables); with
    ``train.freeze_backbone`` it updates none of them.

    The user's DeepSpeed JSON may bring its own optimizer and scheduler sections;
    DeepSpeed builds those. Without an optimizer section memdist's AdamW is used (with
    memdist's schedule unless the JSON has a scheduler); an optimizer section without a
    scheduler trains at that optimizer's constant rate.
    """
    if rt.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    jit_build.deepspeed_comm_op()

    if cfg.train.freeze_backbone:
        # Only the values train, by their own optimizer outside the engine: no backbone
        # parameter asks for a gradient, so none is computed, clipped, reduced or stepped.
        model.requires_grad_(False)
    init_single_process()
    ds_config, _ = deepspeed_config(cfg, rt, universal=universal)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if cfg.train.freeze_backbone and (stage != 0 or "optimizer" in ds_config):
        raise ConfigError(
            f"train.freeze_backbone=true needs ZeRO stage 0 and memdist's optimizer (got stage "
            f"{stage}{', an optimizer section' if 'optimizer' in ds_config else ''} from "
            f"train.deepspeed={cfg.train.deepspeed!r}): DeepSpeed's ZeRO and JSON optimizers "
            "need at least one trainable parameter"
        )
    optimizer, scheduler = make_optimizer(cfg, model)
    kwargs: dict[str, Any] = {}
    if "optimizer" in ds_config:
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    else:
        kwargs["optimizer"] = optimizer
        # Frozen, the optimizer's groups are empty (DeepSpeed drops them): nothing to schedule.
        if "scheduler" not in ds_config and not cfg.train.freeze_backbone:
            kwargs["lr_scheduler"] = scheduler
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kwargs)
    return engine
