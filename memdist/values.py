"""Value tables: the rows a memory layer reads, trained by their own sparse optimizer.

A table is the seam between the model and where its values live. The memory layer
only calls ``table.lookup(idx_NK, scores_NK) -> y_ND``; gradients for the scores flow
back through autograd, and gradients for the rows arrive at the table as
(rows, grads) pairs, which ``step()`` applies to the touched rows only. The dense
backbone's optimizer (DeepSpeed) never sees the values. ``LocalTable`` keeps the
rows in this process; remote shards implement the same methods.

Letters: N tokens, K rows read per token (heads x knn), V table rows, D row width,
U unique rows touched in a step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from memdist import kernels
from memdist.errors import CheckpointError, ConfigError, ShapeError

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
    out = torch.empty(row_stop - row_start, col_stop - col_start, dtype=dtype, device=device)
    first, last = row_start // INIT_BLOCK_ROWS, (row_stop - 1) // INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.empty(INIT_BLOCK_ROWS, dim).normal_(0.0, dim**-0.5, generator=gen)
        lo, hi = max(b0, row_start), min(b0 + INIT_BLOCK_ROWS, row_stop)
        out[lo - row_start : hi - row_start] = rows[lo - b0 : hi - b0, col_start:col_stop]
    return out


class ValueTable(Protocol):
    """What a memory layer needs from its values, wherever they live."""

    num_rows: int
    dim: int

    def lookup(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor: ...

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...


class SparseRows:
    """Rows with a sparse optimizer: gradients for touched rows add up until ``step()``.

    Gradients of several backward passes (gradient accumulation, or several layers
    sharing the table) add up; ``grad_scale`` lets the trainer average them the same
    way it averages dense gradients. Used whole by ``LocalTable`` and per region by
    shard servers, so both apply exactly the same update.
    """

    def __init__(
        self,
        weight_VD: torch.Tensor,
        *,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        backend: str = "auto",
    ) -> None:
        self.weight_VD = weight_VD
        self.num_rows, self.dim = weight_VD.shape
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.eps = eps
        self.betas = betas
        self.backend = backend
        self.state = kernels.init_optimizer_state(
            optimizer, self.num_rows, self.dim, weight_VD.device
        )
        self._grads: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.steps = 0
        self.rows_touched_last_step = 0

    def accumulate(self, rows_U: torch.Tensor, grad_UD: torch.Tensor, source: int = 0) -> None:
        """Add a row gradient. ``source`` (a worker's rank) fixes the summation order:
        gradients are added up by source, then in arrival order, so several workers
        whose gradients arrive in any order give the same sums."""
        self._grads.append((source, rows_U, grad_UD.float()))

    def pending_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The accumulated sparse gradient as (unique rows, summed grads), or None."""
        if not self._grads:
            return None
        if len(self._grads) == 1:
            return self._grads[0][1:]
        ordered = sorted(self._grads, key=lambda g: g[0])  # stable: arrival order per source
        rows = torch.cat([r for _, r, _ in ordered])
        grads = torch.cat([g for _, _, g in ordered])
        rows_U, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        grad_UD = torch.zeros(rows_U.numel(), self.dim, dtype=grads.dtype, device=grads.device)
        grad_UD.index_add_(0, inverse, grads)
        return rows_U, grad_UD

    def step(self, grad_scale: float = 1.0) -> int:
        """Apply the sparse optimizer to the rows touched since the last step."""
        pending = self.pending_grads()
        self._grads = []
        if pending is None:
            self.rows_touched_last_step = 0
            self._after_step(torch.empty(0, dtype=torch.int64))
            return 0
        rows_U, grad_UD = pending
        if grad_scale != 1.0:
            grad_UD = grad_UD * grad_scale
        kernels.sparse_update_(
            self.optimizer,
            self.weight_VD,
            self.state,
            rows_U,
            grad_UD,
            lr=self.lr,
            eps=self.eps,
            betas=self.betas,
            weight_decay=self.weight_decay,
            backend=self.backend,
        )
        self.steps += 1
        self.rows_touched_last_step = int(rows_U.numel())
        self._after_step(rows_U)
        return self.rows_touched_last_step

    def _after_step(self, rows_U: torch.Tensor) -> None:
        """Hook for subclasses that track which rows changed (a row cache)."""

    def zero_grad(self) -> None:
        self._grads = []

    def to_slots(self, local_NK: torch.Tensor) -> torch.Tensor:
        """Where rows sit in ``weight_VD``: the identity, every row is resident."""
        return local_NK

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight_VD}
        out.update({f"state.{k}": v for k, v in self.state.items()})
        out["steps"] = torch.tensor(self.steps)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {"weight", "steps", *(f"state.{k}" for k in self.state)}
        missing = sorted(expected - set(sd))
        if missing:
            raise CheckpointError(f"value table state is missing {missing}")
        if tuple(sd["weight"].shape) != (self.num_rows, self.dim):
            raise ShapeError(
                f"value table weight has shape {tuple(sd['weight'].shape)}, "
                f"expected ({self.num_rows}, {self.dim})"
            )
        self.weight_VD.copy_(sd["weight"])
        for k in self.state:
            self.state[k].copy_(sd[f"state.{k}"])
        self.steps = int(sd["steps"])


class LocalTable(SparseRows):
    """A value table held whole in this process."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        backend: str = "auto",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise ConfigError(f"value table of {num_rows} rows x {dim} columns must be non-empty")
        super().__init__(
            init_values(0, num_rows, dim, seed, dtype=dtype, device=device),
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, eps=eps, betas=betas,
            backend=backend,
        )  # fmt: skip

    def lookup(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        """Pooled rows ``y_ND = sum_k scores_NK[:, k] * V[idx_NK[:, k]]``; grads go to scores."""
        sink = self.accumulate if torch.is_grad_enabled() else None
        values = self.weight_VD
        y_ND = kernels.weighted_embedding_bag(
            values, idx_NK, scores_NK.to(values.dtype), sink, backend=self.backend
        )
        return y_ND.to(scores_NK.dtype)
