"""Rows with a sparse optimizer, and the value table that keeps them in this process.

``SparseRows`` is a block of rows (a whole table, or one shard's region) with its
optimizer state: row gradients arrive as (rows, grads) pairs and ``step`` applies
the optimizer to the touched rows only. ``LocalTable`` is the ``ValueTable``
(``memdist.table``) over one such block in this process (in memory, or a zarr
region behind a row cache); shard servers hold one per region. The dense
backbone's optimizer (DeepSpeed) never sees the values.

Letters: N tokens, K rows read per token (heads x knn), V table rows, D row width,
U unique rows touched in a step.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

import numpy as np
import torch

from memdist import kernels
from memdist.errors import ConfigError, ShapeError
from memdist.kernels import OptimizerSpec
from memdist.region_save import RegionSave
from memdist.storage import table_store
from memdist.table import PendingSave, ReadyLookup, StepResult, ValueTable

INIT_BLOCK_ROWS = 4096


def init_values(
    row_start: int,
    row_stop: int,
    dim: int,
    seed: int,
    *,
    col_start: int = 0,
    col_stop: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Rows ``[row_start, row_stop)`` (columns ``[col_start, col_stop)``) of a table whose
    values are N(0, dim^-1/2), the paper's initialisation.

    Values are drawn in blocks of ``INIT_BLOCK_ROWS`` rows, each from its own seed, so
    any region of a table is the same whether it is built whole in one process or
    piece by piece on shards that never hold the rest.
    """
    col_stop = dim if col_stop is None else col_stop
    out = kernels.cpp_ops.empty_table((row_stop - row_start, col_stop - col_start), dtype, device)
    first, last = row_start // INIT_BLOCK_ROWS, (row_stop - 1) // INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.empty(INIT_BLOCK_ROWS, dim).normal_(0.0, dim**-0.5, generator=gen)
        lo, hi = max(b0, row_start), min(b0 + INIT_BLOCK_ROWS, row_stop)
        out[lo - row_start : hi - row_start] = rows[lo - b0 : hi - b0, col_start:col_stop]
    return out


def clip_coef(grad_sq: float, max_norm: float | None) -> float:
    """The factor that scales a gradient of squared norm ``grad_sq`` to at most
    ``max_norm`` (torch's ``clip_grad_norm_`` rule); 1.0 when off or already within."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(grad_sq) + 1e-6))


class SparseRows:
    """Rows with a sparse optimizer: gradients for touched rows add up until ``step()``.

    Gradients of several backward passes (gradient accumulation, or several layers
    sharing the table) add up; ``grad_scale`` lets the trainer average them the same
    way it averages dense gradients, and ``clip`` scales them once more (the factor
    from ``clip_coef`` over the whole table's norm, which a shard cannot know alone).
    Used whole by ``LocalTable`` and per region by shard servers, so both apply
    exactly the same update.
    """

    def __init__(self, weight_VD: torch.Tensor, spec: OptimizerSpec, *, backend: str = "auto"):
        self.weight_VD = weight_VD
        self.num_rows, self.dim = weight_VD.shape
        self.spec = spec
        self.backend = backend
        self.state = kernels.init_optimizer_state(
            spec.name, self.num_rows, self.dim, weight_VD.device
        )
        self._grads: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps = 0
        self.counters: Counter[str] = Counter()
        # A save writing in the background reads blocks under this lock; steps and
        # writes take it too, so a block is never read half updated.
        self.lock = threading.RLock()
        self.changed = np.zeros(self.region_rows, dtype=bool)  # since the last save began
        self.snapshot: Any = None  # a full save's copy-on-write record (memdist.region_save)

    where = "memory"

    @property
    def region_rows(self) -> int:
        """Rows of the table or region these rows stand for (all resident here)."""
        return self.num_rows

    def accumulate(self, rows_U: torch.Tensor, grad_UD: torch.Tensor, source: int = 0) -> None:
        """Add a row gradient. ``source`` (a worker's rank) fixes the summation order:
        gradients are added up by source, then in arrival order, so several workers
        whose gradients arrive in any order give the same sums."""
        self._grads.append((source, rows_U, grad_UD.float()))
        self._merged = None

    def pending_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The accumulated sparse gradient as (unique rows, summed grads), or None."""
        if not self._grads:
            return None
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def _merge(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._grads) == 1:
            return self._grads[0][1], self._grads[0][2]
        ordered = sorted(self._grads, key=lambda g: g[0])  # stable: arrival order per source
        rows = torch.cat([r for _, r, _ in ordered])
        grads = torch.cat([g for _, _, g in ordered])
        rows_U, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        grad_UD = torch.zeros(rows_U.numel(), self.dim, dtype=grads.dtype, device=grads.device)
        grad_UD.index_add_(0, inverse, grads)
        return rows_U, grad_UD

    def grad_sq(self, grad_scale: float = 1.0) -> float:
        """Squared norm of the pending gradient times ``grad_scale`` (float64 sum, so the
        sum of shards' parts equals one table's total to double precision)."""
        pending = self.pending_grads()
        if pending is None:
            return 0.0
        # Squares summed without a float64 copy (at 16M rows a step touches ~130K rows:
        # the copy, scaling and squaring took ~25 ms of a ~250 ms step).
        return kernels.sum_squares(pending[1], backend=self.backend) * grad_scale**2

    def step(self, grad_scale: float = 1.0, clip: float = 1.0) -> int:
        """Apply the sparse optimizer to the rows touched since the last step, with their
        gradients times ``grad_scale * clip``."""
        with self.lock:
            pending = self.pending_grads()
            self.zero_grad()
            if pending is None:
                self._after_step(torch.empty(0, dtype=torch.int64))
                return 0
            rows_U, grad_UD = pending
            if grad_scale != 1.0:
                grad_UD = grad_UD * grad_scale
            if clip != 1.0:
                grad_UD = grad_UD * clip
            local_U = self.region_index(rows_U)
            if self.snapshot is not None:  # a save is under way: keep what it has not written
                self.snapshot.keep(local_U, lambda sel: self.gather(rows_U[sel]))
            kernels.sparse_update_(
                self.spec, self.weight_VD, self.state, rows_U, grad_UD, backend=self.backend
            )
            self.changed[local_U] = True
            self.steps += 1
            self._after_step(rows_U)
            return int(rows_U.numel())

    def region_index(self, rows_U: torch.Tensor) -> np.ndarray:
        """Region rows of the rows the kernels saw (here the same; slots in a row cache)."""
        return rows_U.cpu().numpy()

    def gather(self, rows_U: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Copies of the weight and state of ``rows_U`` as the kernels index them."""
        rows = torch.as_tensor(rows_U, dtype=torch.int64, device=self.weight_VD.device)
        out = {"weight": self.weight_VD[rows].detach().cpu()}
        out.update({f"state.{k}": v[rows].cpu() for k, v in self.state.items()})
        return out

    def read_row_indices(self, local_U: np.ndarray) -> dict[str, torch.Tensor]:
        """Region rows ``local_U`` (sorted) and their state, as ``read_rows`` gives ranges."""
        with self.lock:
            return self.gather(local_U)

    def _after_step(self, rows_U: torch.Tensor) -> None:
        """Hook for subclasses that track which rows changed (a row cache)."""

    def zero_grad(self) -> None:
        self._grads = []
        self._merged = None

    def flush(self, max_rows: int | None = None) -> int:
        """Rows held elsewhere are written back (a row cache), at most ``max_rows`` of
        them; returns how many are still to write (resident rows: nothing, 0)."""
        return 0

    def to_slots(self, local_NK: torch.Tensor, *, pin: bool = False) -> torch.Tensor:
        """Where rows sit in ``weight_VD``: the identity, every row is resident. ``pin``
        keeps them there until the next step (a row cache's business)."""
        return local_NK

    def prefetch(self, rows_U: np.ndarray) -> int:
        """Make rows resident ahead of a request; returns rows loaded (none here)."""
        return 0

    def state_names(self) -> list[str]:
        return [f"state.{k}" for k in self.state]

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` of this block and their optimizer state (CPU copies)."""
        with self.lock:
            out = {"weight": self.weight_VD[start:stop].detach().cpu().clone()}
            out.update({f"state.{k}": v[start:stop].cpu().clone() for k, v in self.state.items()})
            return out

    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        """Overwrite rows ``[start, start + R)`` with ``state``; pending gradients go."""
        stop = start + check_rows_state(state, self.dim, self.state_names())
        with self.lock:
            self.zero_grad()
            self.weight_VD[start:stop] = state["weight"].to(self.weight_VD)
            for k, v in self.state.items():
                v[start:stop] = state[f"state.{k}"].to(v)


def check_rows_state(state: dict[str, torch.Tensor], dim: int, names: list[str]) -> int:
    """Rows in ``state`` after checking it holds the weight and every state array."""
    missing = sorted({"weight", *names} - set(state))
    if missing:
        raise ShapeError(f"row state is missing {missing}")
    weight = state["weight"]
    if weight.ndim != 2 or weight.shape[1] != dim:
        raise ShapeError(f"row state weight has shape {tuple(weight.shape)}, expected (R, {dim})")
    rows = weight.shape[0]
    bad = [n for n in names if state[n].shape[0] != rows]
    if bad:
        raise ShapeError(f"row state arrays {bad} do not have the weight's {rows} rows")
    return rows


class LocalTable(ValueTable):
    """A value table whose rows are in this process: ``SparseRows`` in memory (the
    default), or any other block of rows such as a zarr region behind a row cache
    (``LocalTable.over``)."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        spec: OptimizerSpec | None = None,
        *,
        backend: str = "auto",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise ConfigError(f"value table of {num_rows} rows x {dim} columns must be non-empty")
        weight_VD = init_values(0, num_rows, dim, seed, dtype=dtype, device=device)
        self._use(SparseRows(weight_VD, spec or OptimizerSpec(), backend=backend))

    @classmethod
    def over(cls, rows: SparseRows) -> LocalTable:
        """A table over rows built elsewhere (e.g. ``CachedRows`` over a zarr region)."""
        table = cls.__new__(cls)
        table._use(rows)
        return table

    def _use(self, rows: SparseRows) -> None:
        self.rows = rows
        self.num_rows, self.dim = rows.region_rows, rows.dim
        self._last = StepResult()

    @property
    def spec(self) -> OptimizerSpec:
        return self.rows.spec

    @property
    def weight_VD(self) -> torch.Tensor:  # noqa: N802
        """The rows in memory (all of them unless a row cache holds only some)."""
        return self.rows.weight_VD

    def lookup_async(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> ReadyLookup:
        """Pooled rows ``y_ND = sum_k scores_NK[:, k] * V[idx_NK[:, k]]``; grads go to scores
        through autograd and to the rows through this table's ``accumulate``."""
        sink = self.rows.accumulate if torch.is_grad_enabled() else None
        values = self.rows.weight_VD
        # Rows read under autograd stay resident until the step that their gradients feed.
        slots_NK = self.rows.to_slots(idx_NK, pin=sink is not None)
        y_ND = kernels.weighted_embedding_bag(
            values, slots_NK, scores_NK.to(values.dtype), sink, backend=self.rows.backend
        )
        return ReadyLookup(y_ND.to(scores_NK.dtype))

    def prefetch(self, idx_NK: torch.Tensor) -> None:
        self.rows.prefetch(torch.unique(idx_NK.detach().cpu()).numpy())

    def step(self, grad_scale: float = 1.0) -> StepResult:
        grad_sq = self.rows.grad_sq(grad_scale)
        rows = self.rows.step(grad_scale, clip_coef(grad_sq, self.rows.spec.grad_clip))
        self._last = StepResult(rows, math.sqrt(grad_sq))
        return self._last

    def zero_grad(self) -> None:
        self.rows.zero_grad()

    def flush(self) -> None:
        self.rows.flush()

    @property
    def last_step(self) -> StepResult:
        return self._last

    @property
    def wait_seconds(self) -> float:
        return 0.0

    @property
    def rows_prefetched(self) -> int:
        return int(self.rows.counters["prefetched"])

    def describe(self) -> str:
        return f"local table of {self.num_rows} x {self.dim} in {self.rows.where}"

    def stats(self) -> list[dict[str, Any]]:
        return [{"rows": self.num_rows, "steps": self.rows.steps, **self.rows.counters}]

    def state_names(self) -> list[str]:
        return self.rows.state_names()

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        self.check_range(start, stop)
        return self.rows.read_rows(start, stop)

    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        rows = check_rows_state(state, self.dim, self.state_names())
        self.check_range(start, start + rows)
        self.rows.write_rows(start, state)

    @property
    def steps(self) -> int:
        return self.rows.steps

    def set_steps(self, steps: int) -> None:
        self.rows.steps = steps

    def _region(self) -> table_store.Region:
        return table_store.Region(0, 0, self.num_rows, 0, self.dim)

    def begin_save(self, target: Any, prefix: str, *, changed_only: bool = False) -> PendingSave:
        """This process holds every row: it writes the one region itself, in a thread."""
        job = RegionSave(self.rows, target, prefix, self._region(), changed_only=changed_only)
        meta = {"optimizer": self.spec.name, "steps": self.steps,
                "kind": "delta" if changed_only else "full"}  # fmt: skip

        def finish() -> table_store.Objects:
            objects = dict(job.result())
            objects.update(table_store.save_table_group(
                target, prefix, num_rows=self.num_rows, dim=self.dim, plan="local",
                regions=[self._region()], meta=meta,
            ))  # fmt: skip
            return objects

        return PendingSave(lambda: [job.progress()], finish)

    def load(self, chain: list[table_store.Source], prefix: str) -> None:
        self.zero_grad()
        attrs = table_store.load_region_from(
            chain, prefix, self._region(), self.rows.write_rows, num_rows=self.num_rows,
            dim=self.dim,
        )  # fmt: skip
        self.set_steps(int(attrs["steps"]))
        self.rows.changed[:] = False
