"""Saving and loading a run's weights with safetensors (nothing is unpickled on load).

``model.safetensors`` holds the backbone's dense parameters; ``values.safetensors``
holds each value table's rows and optimizer state under ``table{i}.``. Files are
written to a temporary name and renamed, so a crash never leaves a half-written file
under the real name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memdist.errors import CheckpointError
from memdist.table import ValueTable

MODEL_FILE = "model.safetensors"
VALUES_FILE = "values.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {exc}") from exc


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state, gathering ZeRO-3 partitioned parameters first."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_weights(
    run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], tables: list[ValueTable]
) -> None:
    """``model`` is the backbone, or its state already gathered by ``full_state_dict``."""
    run_dir = Path(run_dir)
    state = model if isinstance(model, dict) else full_state_dict(model)
    _atomic_save(state, run_dir / MODEL_FILE)
    if not tables:  # a table too large to gather lives in the run's checkpoints
        return
    values = {}
    for i, table in enumerate(tables):
        values.update({f"table{i}.{k}": v for k, v in table.state_dict().items()})
    _atomic_save(values, run_dir / VALUES_FILE)


def load_weights(
    run_dir: Path, model: torch.nn.Module, tables: list[ValueTable], *, optimizer_state: bool = True
) -> None:
    """Load a run folder's backbone into ``model`` and its values into ``tables``; without
    ``optimizer_state`` only the rows are replaced and each table keeps its own optimizer
    state and step count (a new run starting from these weights)."""
    run_dir = Path(run_dir)
    state = _load(run_dir / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{run_dir / MODEL_FILE} does not match the run's config: {exc}"
        ) from exc
    values = _load(run_dir / VALUES_FILE)
    for i, table in enumerate(tables):
        prefix = f"table{i}."
        saved = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        if not optimizer_state and "weight" in saved:
            saved = {**table.state_dict(), "weight": saved["weight"]}
        table.load_state_dict(saved)
