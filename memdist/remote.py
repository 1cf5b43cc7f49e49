"""A value table whose rows live in shard servers, behind the same seam as a local table.

``RemoteTable.lookup`` sends the indices and scores to every shard at once and
combines the replies: row-wise shards return partial sums (added up here),
column-wise shards return column slices (concatenated). Backward sends the output
gradient (whole, or each shard's slice) and sums the partial score gradients; the
row gradients stay on the shards until ``step()``. DeepSpeed never sees the values.

With several data-parallel workers each holds its own ``RemoteTable`` (with its
``worker`` rank) over the same shards; the shards apply a step once every worker's
``step`` arrived (see ``memdist.cluster.shard``).

Bounded staleness (``staleness=1``, off by default): ``step()`` sends the step and
returns without waiting, so the next step's lookups overlap the update; the reply
is awaited before the next backward. A lookup may then read rows from before the
previous update (on some shards and not others), and its backward uses the
updated rows: training is no longer identical to a local table, and not
deterministic. The lag never exceeds one step.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memdist.cluster.plan import ShardingPlan
from memdist.transport import Transport
from memdist.wire import PackedIndices


class _RemoteBag(torch.autograd.Function):
    """Forward collects replies to a lookup already sent; backward sends the gradient."""

    @staticmethod
    def forward(ctx, scores_NK, pending):
        ctx.save_for_backward(scores_NK)
        ctx.table = pending.table
        ctx.packed = pending.packed  # the same de-duplicated indices travel with the backward
        return pending.table._combine(pending.handles).to(scores_NK.dtype)

    @staticmethod
    def backward(ctx, dy_ND):
        (scores_NK,) = ctx.saved_tensors
        payload = ctx.table.payload
        dscores = ctx.table._backward(ctx.packed, scores_NK.detach().to(payload), dy_ND.to(payload))
        return dscores.to(scores_NK.dtype), None


class PendingLookup:
    """A lookup whose requests are on their way to the shards; ``wait()`` gives y."""

    def __init__(self, table: RemoteTable, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> None:
        self.table = table
        self.scores_NK = scores_NK
        self.packed = PackedIndices.pack(idx_NK.detach().cpu())
        payload = scores_NK.detach().cpu().to(table.payload)
        self.handles = [
            table.transport.submit(s, "lookup", self.packed, payload)
            for s in range(table.plan.shards)
        ]

    def wait(self) -> torch.Tensor:
        device, dtype = self.scores_NK.device, self.scores_NK.dtype
        if not torch.is_grad_enabled():
            return self.table._combine(self.handles).to(device, dtype)
        return _RemoteBag.apply(self.scores_NK, self).to(device)


class RemoteTable:
    """Value rows held by the shards of ``plan``, reached through ``transport``."""

    def __init__(
        self,
        plan: ShardingPlan,
        transport: Transport,
        payload: torch.dtype = torch.float32,
        *,
        worker: int = 0,
        staleness: int = 0,
    ) -> None:
        """``payload`` is the dtype scores, outputs and gradients travel in (fp32, bf16, fp16);
        the shards compute in fp32 either way. ``worker`` is this worker's rank among
        the workers sharing the shards."""
        self.plan = plan
        self.transport = transport
        self.payload = payload
        self.worker = worker
        self.staleness = staleness
        self.num_rows = plan.num_rows
        self.dim = plan.dim
        self.rows_touched_last_step = 0
        self.wait_seconds = 0.0  # time spent waiting on the shards (for step-time shares)
        self._step_in_flight: list[Any] | None = None
        self._prefetches: list[Any] = []  # hints sent, replies not yet collected
        self.rows_prefetched = 0  # rows the shards read from zarr on this worker's hints

    def _wait(self, handles: list[Any], what: str) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return self.transport.wait(handles, what)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _call_all(self, method: str, args_per_shard: list[tuple[Any, ...]]) -> list[Any]:
        self._settle()
        handles = [self.transport.submit(s, method, *args) for s, args in enumerate(args_per_shard)]
        return self._wait(handles, method)

    def _settle(self) -> None:
        """Wait for a step sent without waiting (bounded staleness)."""
        if self._step_in_flight is not None:
            handles, self._step_in_flight = self._step_in_flight, None
            self._record_touched(self._wait(handles, "step"))

    def _record_touched(self, touched: list[int]) -> None:
        # Column shards each touch every row read; row shards touch disjoint rows.
        self.rows_touched_last_step = touched[0] if self.plan.kind == "column" else sum(touched)

    def _combine(self, handles: list[Any]) -> torch.Tensor:
        parts = [p.float() for p in self._wait(handles, "lookup")]
        if self.plan.kind == "column":
            return torch.cat(parts, dim=1)
        y = parts[0]
        for part in parts[1:]:
            y = y + part
        return y

    def _backward(
        self, idx_NK: PackedIndices, scores_NK: torch.Tensor, dy_ND: torch.Tensor
    ) -> torch.Tensor:
        scores_NK, dy_ND = scores_NK.cpu(), dy_ND.cpu()
        if self.plan.kind == "column":
            args = [
                (idx_NK, scores_NK, dy_ND[:, r.col_start : r.col_stop].contiguous(), self.worker)
                for r in self.plan.regions
            ]
        else:
            args = [(idx_NK, scores_NK, dy_ND, self.worker)] * self.plan.shards
        parts = [p.float() for p in self._call_all("backward", args)]
        dscores = parts[0]
        for part in parts[1:]:
            dscores = dscores + part
        return dscores

    def lookup_async(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> PendingLookup:
        """Send the lookup now; the caller does other work and then ``wait()``s."""
        return PendingLookup(self, idx_NK, scores_NK)

    def lookup(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        return self.lookup_async(idx_NK, scores_NK).wait()

    def prefetch(self, idx_NK: torch.Tensor) -> None:
        """Tell the shards which rows a coming lookup will read, without waiting: a shard
        whose region lives in zarr behind a row cache loads them meanwhile. Only where
        rows are changes, never a value. Replies are collected at the next ``step()``."""
        rows_U = torch.unique(idx_NK.detach().cpu().to(torch.int64))
        for s, r in enumerate(self.plan.regions):
            mine = rows_U[(rows_U >= r.row_start) & (rows_U < r.row_stop)]  # column: all
            if mine.numel():
                self._prefetches.append(self.transport.submit(s, "prefetch", mine))

    def _collect_prefetches(self) -> None:
        handles, self._prefetches = self._prefetches, []
        if handles:
            self.rows_prefetched += sum(self._wait(handles, "prefetch"))

    def step(self, grad_scale: float = 1.0) -> int:
        """This worker's step. ``grad_scale`` must be the same on every worker (1/workers
        for an average, as DeepSpeed averages dense gradients). Returns the rows updated
        (with staleness on: by the previous step, whose reply was awaited here)."""
        self._settle()
        self._collect_prefetches()
        handles = [
            self.transport.submit(s, "step", grad_scale, self.worker)
            for s in range(self.plan.shards)
        ]
        if self.staleness:
            self._step_in_flight = handles
        else:
            self._record_touched(self._wait(handles, "step"))
        return self.rows_touched_last_step

    def flush(self) -> None:
        """Wait for anything still in flight (a step sent under bounded staleness, hints)."""
        self._settle()
        self._collect_prefetches()

    def zero_grad(self) -> None:
        self._call_all("zero_grad", [()] * self.plan.shards)

    def values(self) -> torch.Tensor:
        """The whole table gathered from the shards (for tests and small tables only)."""
        parts = self._call_all("values", [()] * self.plan.shards)
        return torch.cat(parts, dim=1 if self.plan.kind == "column" else 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Rows and optimizer state of the whole table, as a local table would have them."""
        parts = self._call_all("state_dict", [()] * self.plan.shards)
        out = {"steps": parts[0]["steps"]}
        for key in parts[0]:
            if key == "steps":
                continue
            per_row = parts[0][key].ndim == 1  # per-row state (Adam step, Adagrad sum)
            if self.plan.kind == "column" and per_row:
                out[key] = parts[0][key]  # every column shard holds the same per-row state
            else:
                dim = 1 if self.plan.kind == "column" else 0
                out[key] = torch.cat([p[key] for p in parts], dim=dim)
        return out

    def stats(self) -> list[dict[str, Any]]:
        return self._call_all("stats", [()] * self.plan.shards)
