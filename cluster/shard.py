"""A shard server: one region of a value table, its optimizer state, and the lookups on it.

Plain Python over torch, so it runs in-process (tests, one machine) or inside a Ray
actor (``memdist.cluster.actors``). Requests carry global int64 indices; the shard
keeps nothing between a lookup and its backward (the client sends the indices and
scores again), so a lost reply never leaves half a step behind.

- ``lookup(idx_NK, scores_NK) -> y`` pooled partial output, fp32: for a row-wise
  region the weighted sum of its own rows (other rows weigh zero), shape (N, D); for
  a column-wise region its slice of every row, shape (N, cols).
- ``backward(idx_NK, scores_NK, dy) -> dscores_NK`` partial (summed over shards by the
  client); the region's row gradients are accumulated for ``step``.
- ``step(grad_scale, worker)`` applies the sparse optimizer to the touched rows.
- ``prefetch(rows)`` warms a zarr-backed shard's row cache with rows a coming
  lookup will read (a hint: values and results do not change).

Several data-parallel workers share a shard: each sends its own backward (tagged
with its rank) and its own ``step``. ``step`` is a barrier: the update is applied
once, when every worker's step has arrived, with the gradients summed in rank order
(so arrival order does not change the result), and every worker's call returns
after it. A worker that never arrives makes the others' calls fail after
``barrier_timeout_s`` with the step not applied: the table never holds half a step.
Methods take a lock, so a threaded actor can serve several workers at once.

Letters: N tokens, K rows per token, D row width, M entries that fall in the region.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from typing import Any

import torch

from memdist import kernels
from memdist.cluster.plan import ShardRegion
from memdist.errors import ConfigError, ShardError
from memdist.storage.row_cache import CachedRows, state_spec
from memdist.storage.zarr_region import ZarrRegion
from memdist.values import SparseRows, init_values
from memdist.wire import PackedIndices, unpack


class ShardServer:
    def __init__(
        self,
        region: ShardRegion,
        kind: str,
        dim: int,
        *,
        seed: int,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        backend: str = "auto",
        device: str = "cpu",
        store_path: str | None = None,
        cache_rows: int | None = None,
        workers: int = 1,
        barrier_timeout_s: float = 60.0,
    ) -> None:
        """With ``cache_rows`` smaller than the region, rows live in a zarr group at
        ``store_path`` and only ``cache_rows`` of them are held in memory. ``workers``
        is how many data-parallel workers send gradients and steps."""
        if workers < 1:
            raise ConfigError(f"shard {region.shard}: workers={workers} must be >= 1")
        self.region = region
        self.workers = workers
        self.barrier_timeout_s = barrier_timeout_s
        self._cond = threading.Condition(threading.RLock())
        self._arrived: dict[int, float] = {}  # worker -> grad_scale, for the step in progress
        self._generation = 0  # barrier rounds completed (applied or dropped)
        self._dropped = -1  # the last round dropped for inconsistent scales
        self._touched = 0
        self.kind = kind
        self.device = torch.device(device)
        opt = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, eps=eps, betas=betas,
                   backend=backend)  # fmt: skip
        self.rows: SparseRows | CachedRows
        if cache_rows is not None and cache_rows < region.rows:
            if store_path is None:
                raise ConfigError(
                    f"shard {region.shard}: a row cache of {cache_rows} < {region.rows} rows "
                    "needs a store_path for the zarr arrays"
                )
            store = ZarrRegion(
                store_path, region.rows, region.cols, state_spec(optimizer, region.cols),
                init_rows=lambda r0, r1: init_values(
                    region.row_start + r0, region.row_start + r1, dim, seed,
                    col_start=region.col_start, col_stop=region.col_stop,
                ).numpy(),
            )  # fmt: skip
            self.rows = CachedRows(store, cache_rows, device=self.device, **opt)
        else:
            values = init_values(
                region.row_start, region.row_stop, dim, seed,
                col_start=region.col_start, col_stop=region.col_stop, device=self.device,
            )  # fmt: skip
            self.rows = SparseRows(values, **opt)  # type: ignore[arg-type]
        self.backend = backend
        self.counters: Counter[str] = Counter()

    def _local(self, idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Region-local indices, and for a row-wise region the mask of entries it owns."""
        if self.kind == "column":
            return self.rows.to_slots(idx_NK), None
        r0, r1 = self.region.row_start, self.region.row_stop
        mask_NK = (idx_NK >= r0) & (idx_NK < r1)
        return self.rows.to_slots(torch.where(mask_NK, idx_NK - r0, 0)), mask_NK

    def _count_io(self, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.counters["bytes_in"] += sum(
            t.nbytes if isinstance(t, PackedIndices) else t.numel() * t.element_size()
            for t in inputs
        )
        self.counters["bytes_out"] += output.numel() * output.element_size()

    def lookup(self, idx: torch.Tensor | PackedIndices, scores_NK: torch.Tensor) -> torch.Tensor:
        with self._cond:
            return self._lookup(idx, scores_NK)

    def _lookup(self, idx: torch.Tensor | PackedIndices, scores_NK: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        wire_in = (idx, scores_NK)
        idx_NK, scores_NK = unpack(idx).to(self.device), scores_NK.to(self.device)
        local_NK, mask_NK = self._local(idx_NK)
        weights_NK = scores_NK.float() if mask_NK is None else scores_NK.float() * mask_NK
        y = kernels.bag_forward(self.rows.weight_VD, local_NK, weights_NK, backend=self.backend)
        self.counters["lookups"] += 1
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        self._count_io(wire_in, y)
        return y.to(wire_in[1].dtype).cpu()  # replies travel in the request's payload dtype

    def backward(
        self,
        idx: torch.Tensor | PackedIndices,
        scores_NK: torch.Tensor,
        dy: torch.Tensor,
        worker: int = 0,
    ) -> torch.Tensor:
        self._check_worker(worker)
        with self._cond:
            return self._backward(idx, scores_NK, dy, worker)

    def _backward(
        self, idx: torch.Tensor | PackedIndices, scores_NK: torch.Tensor, dy: torch.Tensor,
        worker: int,
    ) -> torch.Tensor:  # fmt: skip
        t0 = time.perf_counter()
        wire_in = (idx, scores_NK, dy)
        idx_NK, scores_NK = unpack(idx).to(self.device), scores_NK.to(self.device).float()
        dy = dy.to(self.device).float()
        local_NK, mask_NK = self._local(idx_NK)
        w = self.rows.weight_VD
        dscores_NK = kernels.bag_backward_scores(w, local_NK, dy, backend=self.backend)
        if mask_NK is None:
            rows_U, grad_UD = kernels.bag_backward_values(
                local_NK, scores_NK, dy, backend=self.backend
            )
        else:
            dscores_NK = dscores_NK * mask_NK
            # Only the entries this shard owns become row gradients, in flat position
            # order (the same order as a local table's reverse index), as bags of one.
            n_M, k_M = mask_NK.nonzero(as_tuple=True)
            rows_U, grad_UD = kernels.bag_backward_values(
                local_NK[n_M, k_M].view(-1, 1), scores_NK[n_M, k_M].view(-1, 1), dy[n_M],
                backend=self.backend,
            )  # fmt: skip
        self.rows.accumulate(rows_U, grad_UD, worker)
        self.counters["backwards"] += 1
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        self._count_io(wire_in, dscores_NK)
        return dscores_NK.to(wire_in[2].dtype).cpu()

    def prefetch(self, rows: torch.Tensor) -> int:
        """Load the given global rows (1-D, unique) of this region into the row cache ahead
        of the lookup that will read them; returns the rows read from zarr. A shard that
        holds its whole region in memory has nothing to do."""
        if not isinstance(self.rows, CachedRows):
            return 0
        with self._cond:
            t0 = time.perf_counter()
            r0, r1 = self.region.row_start, self.region.row_stop  # column regions: every row
            rows = rows.to(torch.int64).cpu()
            rows = rows[(rows >= r0) & (rows < r1)] - r0  # a hint's other rows are not ours
            if self.kind == "row":  # entries of other shards read local row 0 (weight 0)
                rows = torch.cat([rows, torch.zeros(1, dtype=torch.int64)])
            rows = torch.unique(rows)  # sorted, as zarr reads want
            loaded = self.rows.prefetch(rows.numpy())
            self.counters["prefetch_ns"] += int((time.perf_counter() - t0) * 1e9)
            self.counters["bytes_in"] += rows.numel() * rows.element_size()
            return loaded

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.workers:
            raise ShardError(
                f"shard {self.region.shard}: worker={worker} is not in [0, {self.workers}) "
                f"(the shard was started for {self.workers} workers)"
            )

    def step(self, grad_scale: float = 1.0, worker: int = 0) -> int:
        """Worker ``worker``'s step; returns the rows updated once all workers arrived."""
        self._check_worker(worker)
        with self._cond:
            gen = self._generation
            if worker in self._arrived:
                raise ShardError(
                    f"shard {self.region.shard}: worker {worker} sent step {gen} twice"
                )
            self._arrived[worker] = grad_scale
            if len(self._arrived) == self.workers:
                scales = sorted(set(self._arrived.values()))
                if len(scales) > 1:
                    self._arrived.clear()
                    self.rows.zero_grad()
                    self._dropped = gen  # the waiting workers fail too, at once
                    self._generation += 1
                    self._cond.notify_all()
                    raise ShardError(
                        f"shard {self.region.shard}: workers sent different grad_scale {scales} "
                        f"for step {gen}; the step was dropped"
                    )
                self._touched = self._apply(grad_scale)
                self._arrived.clear()
                self._generation += 1
                self._cond.notify_all()
                return self._touched
            if not self._cond.wait_for(lambda: self._generation != gen, self.barrier_timeout_s):
                missing = sorted(set(range(self.workers)) - set(self._arrived))
                self._arrived.pop(worker, None)
                raise ShardError(
                    f"shard {self.region.shard}: step {gen} barrier timed out after "
                    f"{self.barrier_timeout_s:g} s waiting for workers {missing} of "
                    f"{self.workers}; the step was not applied"
                )
            if self._dropped == gen:
                raise ShardError(
                    f"shard {self.region.shard}: step {gen} was dropped: the workers sent "
                    "different grad_scale values"
                )
            return self._touched

    def _apply(self, grad_scale: float) -> int:
        t0 = time.perf_counter()
        touched = self.rows.step(grad_scale)
        self.counters["steps"] += 1
        self.counters["rows_touched"] += touched
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        return touched

    def zero_grad(self) -> None:
        with self._cond:
            self.rows.zero_grad()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This region's rows and optimizer state, on the CPU."""
        with self._cond:
            return {k: v.detach().cpu().clone() for k, v in self.rows.state_dict().items()}

    def values(self) -> torch.Tensor:
        """This region's rows (a copy, on the CPU)."""
        return self.state_dict()["weight"]

    def stats(self) -> dict[str, Any]:
        r = self.region
        with self._cond:
            counters = dict(self.counters)
            cache = dict(self.rows.counters) if isinstance(self.rows, CachedRows) else {}
        return {
            "shard": r.shard,
            "region": [r.row_start, r.row_stop, r.col_start, r.col_stop],
            "device": str(self.device),
            "cached": isinstance(self.rows, CachedRows),
            "workers": self.workers,
            **counters,
            **cache,
        }

    def where(self) -> dict[str, Any]:
        """Where this shard runs: host, process and device (for the placement table)."""
        return {"shard": self.region.shard, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device)}  # fmt: skip

    def ping(self) -> int:
        return self.region.shard
