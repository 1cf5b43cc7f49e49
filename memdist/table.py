"""The value-table contract: what the model and the trainer may ask of a table of values.

A memory layer reads rows through ``lookup_async(idx_NK, scores_NK).wait()`` (or
``lookup``): the result is differentiable in the scores, and its backward delivers
the rows' gradients to the table, which keeps them until ``step``. The trainer
steps, flushes, reads statistics and moves state through the methods below. Every
implementation (``memdist.values.LocalTable`` over rows in memory or in a zarr
region, ``memdist.remote.RemoteTable`` over shard servers on any transport) passes
one conformance suite (``tests/test_table_contract.py``); nothing outside this module
probes a table for optional features.

State is moved by row ranges, so a checkpoint can stream a table of any size in
pieces no process must hold whole: ``read_rows(start, stop)`` gives the rows'
values and optimizer state in the layout of ``memdist.kernels.init_optimizer_state``
(``weight`` (R, D), ``state.<name>`` (R, ...)), and ``write_rows`` puts them back.

Letters: N tokens, K rows read per token, D row width, R rows of a range.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memdist.errors import CheckpointError, IndexOutOfRangeError, ShapeError


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a table's ``step`` did: rows it updated, and the norm of the (summed, scaled)
    value gradient before clipping (0.0 when nothing was touched)."""

    rows: int = 0
    grad_norm: float = 0.0


class PendingLookup(ABC):
    """A lookup that has been started; ``wait()`` gives the pooled rows ``y_ND``."""

    @abstractmethod
    def wait(self) -> torch.Tensor: ...


class ReadyLookup(PendingLookup):
    """A lookup computed when it was started (a table in this process)."""

    def __init__(self, y_ND: torch.Tensor) -> None:
        self._y_ND = y_ND

    def wait(self) -> torch.Tensor:
        return self._y_ND


class PendingSave:
    """A table save that has begun: the snapshot is taken, so training may go on while
    the regions are written. ``progress()`` lists each region's (rows written, rows to
    write, bytes, done); ``result()`` waits and gives the objects written."""

    def __init__(self, progress: Callable[[], list[dict[str, Any]]],
                 finish: Callable[[], dict[str, dict[str, Any]]]) -> None:  # fmt: skip
        self._progress, self._finish = progress, finish
        self._objects: dict[str, dict[str, Any]] | None = None

    def progress(self) -> list[dict[str, Any]]:
        return self._progress()

    def result(self) -> dict[str, dict[str, Any]]:
        if self._objects is None:
            self._objects = self._finish()
        return self._objects


class PendingStep(ABC):
    """A table step that has been started; ``wait()`` gives what it did."""

    @abstractmethod
    def wait(self) -> StepResult: ...


class ReadyStep(PendingStep):
    """A step done when it was started (a table in this process)."""

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def wait(self) -> StepResult:
        return self._result


class ValueTable(ABC):
    """Rows a memory layer reads, trained by their own sparse optimizer."""

    num_rows: int
    dim: int

    # -- reading -------------------------------------------------------------------
    @abstractmethod
    def lookup_async(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> PendingLookup:
        """Start ``y_ND = sum_k scores_NK[:, k] * V[idx_NK[:, k]]``. Under autograd the
        result's backward gives the scores' gradient and hands the rows' to the table."""

    def lookup(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        return self.lookup_async(idx_NK, scores_NK).wait()

    @abstractmethod
    def prefetch(self, idx_NK: torch.Tensor) -> None:
        """A hint: these rows will be read soon (a table with rows on disk loads them).
        Never changes a value or a result."""

    # -- training ------------------------------------------------------------------
    @abstractmethod
    def step(self, grad_scale: float = 1.0) -> StepResult:
        """Apply the sparse optimizer to the rows whose gradients arrived since the last
        step, scaled by ``grad_scale`` (and clipped if the optimizer spec says so)."""

    def expect_step(self, grad_scale: float = 1.0) -> None:
        """Say, before the backward of a step's last micro-batch, that
        ``step_async(grad_scale)`` follows it: a table whose rows are elsewhere may send
        the step right behind its last gradient, with no round trip between; the step
        is then collected as usual. Nothing to do for a table in this process."""
        return None

    def step_async(self, grad_scale: float = 1.0) -> PendingStep:
        """``step`` without waiting for it where the rows are elsewhere: every later call
        (a lookup included) sees the update; ``wait()`` gives its result (or raises its
        error). The training loop steps this way, so the update overlaps the dense
        optimizer's step. A table in this process steps at once."""
        return ReadyStep(self.step(grad_scale))

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the gradients collected since the last step."""

    @abstractmethod
    def flush(self) -> None:
        """Wait for work still in flight (a step sent ahead, hints), and write rows held
        in memory back to their store, so reads and saves see every update."""

    # -- what the trainer reports ----------------------------------------------------
    @property
    @abstractmethod
    def last_step(self) -> StepResult:
        """What the last step that completed did (with bounded staleness: the last one
        whose reply arrived)."""

    @property
    def rows_touched_last_step(self) -> int:
        return self.last_step.rows

    @property
    @abstractmethod
    def wait_seconds(self) -> float:
        """Seconds this process waited on the table (0 for a table in this process)."""

    @property
    @abstractmethod
    def rows_prefetched(self) -> int:
        """Rows the table loaded from its store because of this process's hints."""

    @abstractmethod
    def describe(self) -> str:
        """Where the rows live, in one line (the plan of a sharded table)."""

    @abstractmethod
    def stats(self) -> list[dict[str, Any]]:
        """Counters and timers, one dict per part holding rows (a shard, or the table)."""

    # -- state, by row ranges ----------------------------------------------------------
    @abstractmethod
    def state_names(self) -> list[str]:
        """Names of the per-row state arrays beside ``weight`` (``state.exp_avg``, ...)."""

    @abstractmethod
    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Values and optimizer state of rows ``[start, stop)``, on the CPU."""

    @abstractmethod
    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        """Overwrite rows ``[start, start + R)`` with ``state`` (as ``read_rows`` gives it);
        pending gradients are dropped."""

    @property
    @abstractmethod
    def steps(self) -> int:
        """Optimizer steps applied so far."""

    @abstractmethod
    def set_steps(self, steps: int) -> None: ...

    # -- checkpoints ----------------------------------------------------------------------
    @abstractmethod
    def begin_save(self, target: Any, prefix: str, *, changed_only: bool = False) -> PendingSave:
        """Begin writing the table as a zarr group under ``prefix`` of ``target`` (a
        ``memdist.storage.targets.CheckpointTarget``), each region by the process that
        holds it. Returns once every region has its snapshot: steps taken meanwhile do
        not reach the save. ``changed_only`` writes only the rows changed since the
        previous save began (an incremental save, ``kind: "delta"``)."""

    def save(
        self, target: Any, prefix: str, *, changed_only: bool = False
    ) -> dict[str, dict[str, Any]]:
        """``begin_save`` and wait: the objects written (key -> size and SHA-256)."""
        return self.begin_save(target, prefix, changed_only=changed_only).result()

    @abstractmethod
    def load(self, chain: list[Any], prefix: str) -> None:
        """Replace rows, optimizer state and step count with the table saved under
        ``prefix`` of a chain of checkpoints (``memdist.storage.table_store.Source``: a
        full save, then incremental ones in order), under any plan and shard count,
        checking each object read against its manifest before it is deserialised;
        pending gradients are dropped, and the rows count as unchanged since a save."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole table (small tables and tests only: a large one is moved by ranges)."""
        out = self.read_rows(0, self.num_rows)
        out["steps"] = torch.tensor(self.steps)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {"weight", "steps", *self.state_names()}
        missing = sorted(expected - set(sd))
        if missing:
            raise CheckpointError(f"value table state is missing {missing}")
        if tuple(sd["weight"].shape) != (self.num_rows, self.dim):
            raise ShapeError(
                f"value table weight has shape {tuple(sd['weight'].shape)}, "
                f"expected ({self.num_rows}, {self.dim})"
            )
        self.write_rows(0, {k: v for k, v in sd.items() if k != "steps"})
        self.set_steps(int(sd["steps"]))

    def check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexOutOfRangeError(
                f"row range [{start}, {stop}) is outside the table's {self.num_rows} rows"
            )
