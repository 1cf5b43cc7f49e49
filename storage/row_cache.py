"""A row cache over a zarr region: the shard's working set in memory, the rest on disk.

``CachedRows`` has the interface of ``memdist.values.SparseRows`` plus ``resolve``:
kernels run on cache slots, so a lookup first maps region-local rows to slots,
reading misses from zarr and evicting the least recently used unpinned slots
(writing back those that were updated). Rows with pending gradients are pinned
until ``step()``, which updates them in their slots and marks them dirty. The
optimizer math is per row, so results equal those of a fully resident table.

``prefetch`` loads rows a coming request will read (the next batch's, when the
worker knows them) into slots that are free or hold neither pinned rows nor the
hint's own rows, so the request then finds them resident. It never changes a value,
only where a row is, so training with or without it is the same.

Letters: C cache slots, D columns, U unique rows in a request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from memdist import kernels
from memdist.errors import ShardError
from memdist.kernels import OptimizerSpec
from memdist.storage.zarr_region import ZarrRegion
from memdist.values import SparseRows

STATE_DTYPES = {"sum_sq": "float32", "exp_avg": "float32", "exp_avg_sq": "float32", "step": "int64"}


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a method under the rows' lock: a save in the background reads the cache too."""

    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return fn(self, *args, **kwargs)

    return run


def state_spec(optimizer: str, cols: int) -> dict[str, tuple[tuple[int, ...], str]]:
    shapes = kernels.init_optimizer_state(optimizer, 1, cols, "cpu")
    return {name: (tuple(t.shape[1:]), STATE_DTYPES[name]) for name, t in shapes.items()}


class CachedRows(SparseRows):
    """``SparseRows`` whose ``weight_VD`` and state hold cache slots, not region rows."""

    where = "a zarr region behind a row cache"

    def __init__(
        self,
        store: ZarrRegion,
        cache_rows: int,
        spec: OptimizerSpec,
        *,
        backend: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        self.store = store
        self.capacity = min(cache_rows, store.rows)
        self.device = torch.device(device)
        weight_CD = torch.zeros(self.capacity, store.cols, device=self.device)
        super().__init__(weight_CD, spec, backend=backend)
        self.slot_of = np.full(store.rows, -1, dtype=np.int64)  # region row -> slot
        self.row_of = np.full(self.capacity, -1, dtype=np.int64)  # slot -> region row
        self.dirty = np.zeros(self.capacity, dtype=bool)
        self.pinned = np.zeros(self.capacity, dtype=bool)
        self.last_used = np.zeros(self.capacity, dtype=np.int64)
        self.prefetched = np.zeros(self.capacity, dtype=bool)  # loaded by a hint, not yet read
        self.clock = 0

    @property
    def region_rows(self) -> int:
        return self.store.rows

    # -- residency ---------------------------------------------------------------
    def _evict(self, slots: np.ndarray) -> None:
        rows = self.row_of[slots]
        dirty = slots[self.dirty[slots] & (rows >= 0)]
        if dirty.size:
            self._write_back(dirty[np.argsort(self.row_of[dirty])])
        self.slot_of[rows[rows >= 0]] = -1
        self.row_of[slots] = -1
        self.dirty[slots] = False
        self.prefetched[slots] = False

    def _write_back(self, slots: np.ndarray) -> None:
        """Write the rows in ``slots`` (in region row order) and their state to zarr."""
        t = torch.from_numpy(slots).to(self.device)
        data = {"values": self.weight_VD[t].cpu().numpy()}
        data.update({k: v[t].cpu().numpy() for k, v in self.state.items()})
        self.store.write(self.row_of[slots], data)
        self.counters["writebacks"] += int(slots.size)

    def _room(self, need: int) -> tuple[np.ndarray, np.ndarray]:
        """Free slots, and when they are fewer than ``need`` the slots that may be evicted
        (least recently used first): resident, not pinned, not used at the current clock."""
        free = np.flatnonzero(self.row_of < 0)
        if free.size >= need:  # no eviction: skip sorting the whole cache
            return free, free[:0]
        candidates = np.flatnonzero(
            (self.row_of >= 0) & ~self.pinned & (self.last_used < self.clock)
        )
        return free, candidates[np.argsort(self.last_used[candidates], kind="stable")]

    def _load(self, load_rows: np.ndarray, free: np.ndarray, victims: np.ndarray) -> np.ndarray:
        """Read ``load_rows`` from zarr into free slots, evicting as many victims as needed."""
        need = load_rows.size
        if free.size < need:
            victims = victims[: need - free.size]
            self._evict(victims)
            self.counters["evictions"] += int(victims.size)
            free = np.flatnonzero(self.row_of < 0)
        new_slots = free[:need]
        data = self.store.read(load_rows)
        t = torch.from_numpy(new_slots).to(self.device)
        self.weight_VD[t] = torch.from_numpy(data["values"]).to(self.device)
        for k, v in self.state.items():
            v[t] = torch.from_numpy(data[k]).to(self.device)
        self.slot_of[load_rows] = new_slots
        self.row_of[new_slots] = load_rows
        return new_slots

    @_locked
    def resolve(self, rows_U: np.ndarray) -> np.ndarray:
        """Slots holding region rows ``rows_U`` (unique), loading misses from zarr."""
        self.clock += 1
        slots = self.slot_of[rows_U]
        miss = slots < 0
        hits = slots[~miss]
        self.counters["cache_hits"] += int(hits.size)
        self.counters["cache_misses"] += int(miss.sum())
        self.counters["prefetch_hits"] += int(self.prefetched[hits].sum())
        self.prefetched[hits] = False
        if miss.any():
            self.last_used[hits] = self.clock  # keep this request's hits
            free, victims = self._room(int(miss.sum()))
            if free.size + victims.size < miss.sum():
                raise ShardError(
                    f"row cache of {self.capacity} rows cannot hold the {rows_U.size} rows of "
                    f"one request plus {int(self.pinned.sum())} rows awaiting their step: "
                    "raise shards.budget_mb or use more shards"
                )
            self._load(rows_U[miss], free, victims)
            slots = self.slot_of[rows_U]
        self.last_used[slots] = self.clock
        return slots

    @_locked
    def prefetch(self, rows_U: np.ndarray) -> int:
        """Load the region rows ``rows_U`` (unique) that are not resident, as many as fit
        without evicting pinned rows or the hint's own; returns how many were read."""
        self.clock += 1
        resident = self.slot_of[rows_U] >= 0
        self.last_used[self.slot_of[rows_U[resident]]] = self.clock  # the hint keeps these
        free, victims = self._room(int((~resident).sum()))
        load_rows = rows_U[~resident][: free.size + victims.size]
        if load_rows.size:
            slots = self._load(load_rows, free, victims)
            self.last_used[slots] = self.clock
            self.prefetched[slots] = True
        self.counters["prefetched"] += int(load_rows.size)
        self.counters["prefetch_skipped"] += int((~resident).sum()) - int(load_rows.size)
        return int(load_rows.size)

    def to_slots(self, local_NK: torch.Tensor, *, pin: bool = False) -> torch.Tensor:
        """Region-local row indices mapped to cache slots (same shape); ``pin`` keeps
        them resident until the next step or ``zero_grad``."""
        kernels.check_indices(local_NK, self.store.rows)  # the kernels see only slots
        rows_U, inverse = torch.unique(local_NK.cpu(), sorted=True, return_inverse=True)
        slots_U = self.resolve(rows_U.numpy())
        if pin:
            self.pinned[slots_U] = True
        return torch.from_numpy(slots_U)[inverse].to(local_NK.device)

    # -- gradients and steps run on slots; pinned slots stay until their step ---
    @_locked
    def accumulate(self, slots_U: torch.Tensor, grad_UD: torch.Tensor, source: int = 0) -> None:
        self.pinned[slots_U.cpu().numpy()] = True
        super().accumulate(slots_U, grad_UD, source)

    def _after_step(self, slots_U: torch.Tensor) -> None:
        self.dirty[slots_U.cpu().numpy()] = True
        self.pinned[:] = False

    def region_index(self, slots_U: torch.Tensor) -> np.ndarray:
        return self.row_of[slots_U.cpu().numpy()]

    @_locked
    def read_row_indices(self, local_U: np.ndarray) -> dict[str, torch.Tensor]:
        """Region rows ``local_U`` (sorted) and their state: resident rows from their
        slots, the others from zarr. Nothing is written back, so a read of any size
        costs no flush of the cache (a large one outlasts a shard's request timeout)."""
        data = self.store.read(local_U)
        out = {"weight": torch.from_numpy(data["values"])}
        out.update({f"state.{k}": torch.from_numpy(data[k]) for k in self.state})
        slots = self.slot_of[local_U]
        at = np.flatnonzero(slots >= 0)
        if at.size:  # the cache's copy is the newest
            t = torch.from_numpy(slots[at]).to(self.device)
            out["weight"][at] = self.weight_VD[t].cpu()
            for k, v in self.state.items():
                out[f"state.{k}"][at] = v[t].cpu()
        return out

    def zero_grad(self) -> None:
        super().zero_grad()
        self.pinned[:] = False

    @_locked
    def flush(self, max_rows: int | None = None) -> int:
        """Write updated rows back to zarr (the cache keeps its contents), the lowest
        region rows first and at most ``max_rows`` of them, so that a caller bounded in
        time can write a large cache back in pieces; the files are synced once no row is
        left. Returns the number of updated rows still to write."""
        dirty = np.flatnonzero(self.dirty & (self.row_of >= 0))
        dirty = dirty[np.argsort(self.row_of[dirty])]
        now = dirty[: dirty.size if max_rows is None else max_rows]
        if now.size:
            self._write_back(now)
            self.dirty[now] = False
        if now.size < dirty.size:
            return int(dirty.size - now.size)
        self.store.sync()
        return 0

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Region rows ``[start, stop)`` and their state (``read_row_indices``)."""
        return self.read_row_indices(np.arange(start, stop))

    @_locked
    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        """Write region rows ``[start, start + R)`` to zarr; resident copies are dropped
        (their pending gradients with them), so the next read loads the new rows."""
        rows = np.arange(start, start + state["weight"].shape[0])
        self.zero_grad()
        slots = self.slot_of[rows]
        slots = slots[slots >= 0]
        self.dirty[slots] = False  # overwritten: nothing to write back
        self._evict(slots)
        data = {"values": state["weight"].cpu().numpy()}
        data.update({k: state[f"state.{k}"].cpu().numpy() for k in self.state})
        self.store.write(rows, data)
        self.store.sync()
