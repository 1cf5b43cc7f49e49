"""A shard server: one region of a value table, its optimizer state, and the lookups on it.

Plain Python over torch, so it runs in-process (tests, one machine) or inside a Ray
actor (``memdist.cluster.actors``). Requests carry global int64 indices. A lookup
made for training is kept (its indices and scores, at most ``KEPT_PER_WORKER`` per
worker) until its ``KeptBackward``, so only the output gradient travels back; row
gradients wait for the step, so a lost reply never leaves half a step behind.

Requests are the typed messages of ``memdist.wire``, answered by ``handle``:

- ``Lookup -> y`` pooled partial output, fp32: for a row-wise region the weighted
  sum of its own entries of each bag, shape (N, D) (a worker sends it only those, as
  bags of any length, ``wire.Lookup.bags``; sent every entry, it picks its own); for a
  column-wise region its slice of every row, shape (N, cols).
- ``Backward -> dscores`` the score gradients: a column region's partial sums (added
  over shards by the client), a row region's of its own entries (zero elsewhere in an
  N x K request); the region's row gradients are accumulated for the step.
  ``KeptBackward`` is the same for a kept lookup, named by its number.
- ``GradNorm`` and ``Step``: the squared norm of the region's gradient (for clipping
  over the whole table), and the sparse optimizer on the touched rows.
- ``Prefetch`` warms a zarr-backed shard's row cache with rows a coming lookup will
  read (a hint: values and results do not change).
- ``ReadRows``/``WriteRows``/``SetSteps``/``Flush``: state by row ranges.

Several data-parallel workers share a shard: each sends its own backward (tagged
with its rank) and its own ``GradNorm``/``Step``. Those are barriers: the work is
done once, when every worker's request has arrived, with the gradients summed in
rank order (so arrival order does not change the result), and every worker's call
returns its result. A worker that never arrives makes the others' calls fail after
``barrier_timeout_s`` with nothing applied: the table never holds half a step.
Methods take a lock, so a threaded actor can serve several workers at once.

Letters: N tokens, K rows per token, D row width, M entries that fall in the region.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from memdist import kernels
from memdist.cluster.plan import ShardRegion
from memdist.errors import CheckpointError, ConfigError, IndexOutOfRangeError, ShardError
from memdist.kernels import OptimizerSpec
from memdist.region_save import RegionSave
from memdist.storage import table_store
from memdist.storage.row_cache import CachedRows, state_spec
from memdist.storage.zarr_region import ZarrRegion
from memdist.values import SparseRows, init_values
from memdist.wire import (
    Backward,
    Flush,
    GradNorm,
    KeptBackward,
    LoadRegion,
    Lookup,
    PackedIndices,
    Prefetch,
    ReadRows,
    Request,
    SaveRegion,
    SaveStatus,
    SetSteps,
    Stats,
    Step,
    StepReply,
    WriteRows,
    ZeroGrad,
    unpack,
)  # fmt: skip


def process_disk_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (page faults on chunk maps
    included, page-cache hits not); None where the OS does not say (not Linux)."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return None


class _Own(NamedTuple):
    """A request as a shard computes it. A row region takes only the entries it holds (a
    worker sends it only those, ``wire.Lookup.bags``; from a request of every entry it
    picks them), as bags of any length."""

    idx: torch.Tensor  # global indices: N x K, or a row region's entries (E)
    scores: torch.Tensor  # fp32, idx's shape
    offsets_N1: torch.Tensor | None  # a row region's bags: entries [offsets[n], offsets[n + 1])
    positions_E: torch.Tensor | None  # their places in an N x K request of every entry
    shape: tuple[int, ...]  # the request's scores' shape, the score gradients' too


KEPT_PER_WORKER = 16  # kept lookups per worker; older ones are dropped (a backward never came)


class ShardServer:
    def __init__(
        self,
        region: ShardRegion,
        kind: str,
        dim: int,
        spec: OptimizerSpec,
        *,
        seed: int,
        backend: str = "auto",
        device: str = "cpu",
        store_path: str | None = None,
        cache_rows: int | None = None,
        workers: int = 1,
        barrier_timeout_s: float = 60.0,
        restarted: bool = False,
        fill_later: bool = False,
    ) -> None:
        """With ``cache_rows`` smaller than the region, rows live in a zarr group at
        ``store_path`` and only ``cache_rows`` of them are held in memory. ``workers``
        is how many data-parallel workers send gradients and steps. A ``restarted``
        shard (Ray brought it back after it died) holds initial rows, not the run's: it
        refuses lookups and steps until a checkpoint is loaded into it. With
        ``fill_later`` a new zarr region's chunks are written by ``fill_store``, which
        ``fill_progress`` follows, not here."""
        self.restarted = restarted
        if workers < 1:
            raise ConfigError(f"shard {region.shard}: workers={workers} must be >= 1")
        self.region = region
        self.workers = workers
        self.barrier_timeout_s = barrier_timeout_s
        self._cond = threading.Condition(threading.RLock())
        self._arrived: dict[int, tuple[Any, ...]] = {}  # worker -> its request's terms
        self._generation = 0  # barrier rounds completed (applied or dropped)
        self._dropped = -1  # the last round dropped for inconsistent requests
        self._outcome: Any = None  # the last round's result, for every worker
        self.kind = kind
        self.dim = dim  # the table's row width (a column region holds part of it)
        self.device = torch.device(device)
        self.rows: SparseRows
        if cache_rows is not None and cache_rows < region.rows:
            if store_path is None:
                raise ConfigError(
                    f"shard {region.shard}: a row cache of {cache_rows} < {region.rows} rows "
                    "needs a store_path for the zarr arrays"
                )
            store = ZarrRegion(
                store_path, region.rows, region.cols, state_spec(spec.name, region.cols),
                init_rows=lambda r0, r1: init_values(
                    region.row_start + r0, region.row_start + r1, dim, seed,
                    col_start=region.col_start, col_stop=region.col_stop,
                ).numpy(),
                fill=not fill_later,
            )  # fmt: skip
            self.rows = CachedRows(store, cache_rows, spec, backend=backend, device=self.device)
        else:
            values = init_values(
                region.row_start, region.row_stop, dim, seed,
                col_start=region.col_start, col_stop=region.col_stop, device=self.device,
            )  # fmt: skip
            self.rows = SparseRows(values, spec, backend=backend)
        self.backend = backend
        self.counters: Counter[str] = Counter()
        self._save: RegionSave | None = None  # the last save begun (written in a thread)
        # worker -> lookup number -> the lookup as computed (``_Own``), oldest first
        self._kept: dict[int, OrderedDict[int, _Own]] = {}

    def handle(self, req: Request) -> Any:
        """Answer one request (the only entry point transports use)."""
        if self.restarted and not isinstance(req, (LoadRegion, Stats)):
            raise ShardError(
                f"memory shard {self.region.shard} died and was restarted: it holds none of "
                f"the run's rows until a checkpoint is loaded (refused {type(req).__name__})"
            )
        match req:
            case Lookup(idx, scores, keep, worker, bags):
                return self.lookup(idx, scores, keep=keep, worker=worker, bags=bags)
            case Backward(idx, scores, dy, worker, bags):
                return self.backward(idx, scores, dy, worker, bags)
            case KeptBackward(lookup, dy, worker):
                return self.kept_backward(lookup, dy, worker)
            case GradNorm(scale, worker):
                return self._barrier(worker, ("grad_norm", scale), lambda: self.rows.grad_sq(scale))
            case Step(scale, worker, clip):
                return self._barrier(
                    worker, ("step", scale, clip), lambda: self._apply(scale, clip)
                )
            case Prefetch(rows):
                return self.prefetch(rows)
            case ZeroGrad():
                with self._cond:
                    return self.rows.zero_grad()
            case Flush(max_rows):
                with self._cond:
                    return self.rows.flush(max_rows)
            case ReadRows(start, stop):
                return self.read_rows(start, stop)
            case WriteRows(start, state):
                return self.write_rows(start, state)
            case SaveRegion(target, prefix, changed_only):
                return self.save_region(target, prefix, changed_only)
            case SaveStatus():
                return self.save_status()
            case LoadRegion(chain, prefix, num_rows):
                return self.load_region(chain, prefix, num_rows)
            case SetSteps(steps):
                with self._cond:
                    self.rows.steps = steps
                    return None
            case Stats():
                return self.stats()
        raise ShardError(f"shard {self.region.shard}: unknown request {req!r}")

    def _own(self, idx: torch.Tensor, scores: torch.Tensor, bags: torch.Tensor | None) -> _Own:
        """A request as this shard computes it (``_Own``)."""
        shape, scores = tuple(scores.shape), scores.float()
        if self.kind == "column":
            if bags is not None:
                raise ShardError(
                    f"shard {self.region.shard}: a column region computes every entry of "
                    "each bag; it got only some (a request with bags)"
                )
            return _Own(idx, scores, None, None, shape)
        r = self.region
        lo, hi = torch.aminmax(idx) if idx.numel() else (r.row_start, r.row_start)
        inside = r.row_start <= int(lo) and int(hi) < r.row_stop
        if bags is not None:
            if not inside:
                bad = idx[(idx < r.row_start) | (idx >= r.row_stop)][0]
                raise IndexOutOfRangeError(
                    f"shard {r.shard}: entry of row {int(bad)} sent to the region of rows "
                    f"[{r.row_start}, {r.row_stop}) (a row region gets only its own entries)"
                )
            return _Own(idx, scores, bags.to(self.device, torch.int64), None, shape)
        if inside:
            return _Own(idx, scores, None, None, shape)  # every entry is this shard's
        mine_NK = (idx >= r.row_start) & (idx < r.row_stop)
        positions_E = mine_NK.reshape(-1).nonzero().squeeze(1)
        offsets_N1 = torch.zeros(idx.shape[0] + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(mine_NK.sum(1), 0, out=offsets_N1[1:])
        flat = idx.reshape(-1)[positions_E], scores.reshape(-1)[positions_E]
        return _Own(*flat, offsets_N1, positions_E, shape)

    def _slots(self, idx: torch.Tensor) -> torch.Tensor:
        """Global indices of this region as places in the rows it holds."""
        return self.rows.to_slots(idx - self.region.row_start if self.kind == "row" else idx)

    def _count_io(self, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.counters["bytes_in"] += sum(
            t.nbytes if isinstance(t, PackedIndices) else t.numel() * t.element_size()
            for t in inputs
        )
        self.counters["bytes_out"] += output.numel() * output.element_size()

    def lookup(
        self,
        idx: torch.Tensor | PackedIndices,
        scores: torch.Tensor,
        *,
        keep: int = -1,
        worker: int = 0,
        bags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep`` >= 0: keep the indices and scores for ``worker``'s ``KeptBackward``.
        ``bags``: see ``wire.Lookup``."""
        if keep >= 0:
            self._check_worker(worker)
        with self._cond:
            return self._lookup(idx, scores, bags, keep, worker)

    def _lookup(
        self, idx: torch.Tensor | PackedIndices, scores: torch.Tensor, bags: torch.Tensor | None,
        keep: int, worker: int,
    ) -> torch.Tensor:  # fmt: skip
        t0 = time.perf_counter()
        wire_in = (idx, scores) if bags is None else (idx, scores, bags)
        own = self._own(unpack(idx).to(self.device), scores.to(self.device), bags)
        idx, scores, offsets_N1 = own.idx, own.scores, own.offsets_N1
        w = self.rows.weight_VD
        if offsets_N1 is None:
            y = kernels.bag_forward(w, self._slots(idx), scores, backend=self.backend)
        else:
            y = kernels.entries_forward(w, self._slots(idx), scores, offsets_N1,
                                        backend=self.backend)  # fmt: skip
        if keep >= 0:
            kept = self._kept.setdefault(worker, OrderedDict())
            kept.pop(keep, None)  # a number used again (a new table view) goes last
            kept[keep] = own
            while len(kept) > KEPT_PER_WORKER:
                kept.popitem(last=False)
        self.counters["lookups"] += 1
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        self._count_io(wire_in, y)
        return y.to(wire_in[1].dtype).cpu()  # replies travel in the request's payload dtype

    def backward(
        self,
        idx: torch.Tensor | PackedIndices,
        scores: torch.Tensor,
        dy: torch.Tensor,
        worker: int = 0,
        bags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_worker(worker)
        with self._cond:
            t0 = time.perf_counter()
            wire_in = (idx, scores, dy) if bags is None else (idx, scores, dy, bags)
            own = self._own(unpack(idx).to(self.device), scores.to(self.device), bags)
            return self._backward(own, dy, worker, t0=t0, wire_in=wire_in)

    def kept_backward(self, lookup: int, dy: torch.Tensor, worker: int = 0) -> torch.Tensor:
        """``backward`` of the lookup ``worker`` sent with ``keep=lookup``."""
        self._check_worker(worker)
        with self._cond:
            kept = self._kept.get(worker, OrderedDict())
            if lookup not in kept:
                raise ShardError(
                    f"shard {self.region.shard}: lookup {lookup} of worker {worker} is not kept "
                    f"here (kept: {list(kept)}; a shard keeps the last {KEPT_PER_WORKER} lookups "
                    "of each worker until their backward, and none after a restart)"
                )
            return self._backward(kept.pop(lookup), dy, worker, t0=time.perf_counter(),
                                  wire_in=(dy,))  # fmt: skip

    def _backward(
        self, own: _Own, dy: torch.Tensor, worker: int, *, t0: float,
        wire_in: tuple[Any, ...],
    ) -> torch.Tensor:  # fmt: skip
        """The backward of a request as ``_own`` made it; the partial score gradients go
        back in the shape the scores came in (N x K, or one per entry sent)."""
        idx, scores, offsets_N1, positions_E = own.idx, own.scores, own.offsets_N1, own.positions_E
        dy_in = dy
        dy = dy.to(self.device).float()
        w, slots = self.rows.weight_VD, self._slots(idx)
        if offsets_N1 is None:
            dscores, rows_U, grad_UD = kernels.bag_backward(
                w, slots, scores, dy, backend=self.backend
            )
        else:
            dscores, rows_U, grad_UD = kernels.entries_backward(
                w, slots, scores, offsets_N1, dy, backend=self.backend
            )
        if positions_E is not None:  # the request sent every entry: the others' stay zero
            every = torch.zeros(own.shape, dtype=dscores.dtype, device=dscores.device)
            every.view(-1)[positions_E] = dscores
            dscores = every
        self.rows.accumulate(rows_U, grad_UD, worker)
        self.counters["backwards"] += 1
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        self._count_io(wire_in, dscores)
        return dscores.to(dy_in.dtype).cpu()

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

    def _barrier(self, worker: int, terms: tuple[Any, ...], action: Callable[[], Any]) -> Any:
        """Run ``action`` once every worker sent a request with the same ``terms``; every
        worker's call returns its result. Different terms drop the round (pending
        gradients too) and fail every caller at once."""
        self._check_worker(worker)
        with self._cond:
            gen = self._generation
            if worker in self._arrived:
                raise ShardError(
                    f"shard {self.region.shard}: worker {worker} sent round {gen} twice"
                )
            self._arrived[worker] = terms
            if len(self._arrived) == self.workers:
                sent = sorted(set(self._arrived.values()))
                self._arrived.clear()
                self._generation += 1
                if len(sent) > 1:
                    self.rows.zero_grad()
                    self._dropped = gen  # the waiting workers fail too, at once
                    self._cond.notify_all()
                    raise ShardError(
                        f"shard {self.region.shard}: workers sent different requests {sent} "
                        f"in round {gen}; the step was dropped"
                    )
                try:
                    self._outcome = action()
                finally:
                    self._cond.notify_all()
                return self._outcome
            if not self._cond.wait_for(lambda: self._generation != gen, self.barrier_timeout_s):
                missing = sorted(set(range(self.workers)) - set(self._arrived))
                self._arrived.pop(worker, None)
                raise ShardError(
                    f"shard {self.region.shard}: {terms[0]} round {gen} barrier timed out "
                    f"after {self.barrier_timeout_s:g} s waiting for workers {missing} of "
                    f"{self.workers}; the step was not applied"
                )
            if self._dropped == gen:
                raise ShardError(
                    f"shard {self.region.shard}: round {gen} was dropped: the workers sent "
                    "different requests"
                )
            return self._outcome

    def _apply(self, grad_scale: float, clip: float) -> StepReply:
        t0 = time.perf_counter()
        grad_sq = self.rows.grad_sq(grad_scale)
        touched = self.rows.step(grad_scale, clip)
        self.counters["steps"] += 1
        self.counters["rows_touched"] += touched
        self.counters["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        return StepReply(touched, grad_sq)

    def _part(self, start: int, stop: int) -> tuple[int, int]:
        """Global rows ``[start, stop)`` clipped to this region, as region-local rows."""
        r = self.region
        lo, hi = max(start, r.row_start), min(stop, r.row_stop)
        return lo - r.row_start, max(lo, hi) - r.row_start

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """This region's part of global rows ``[start, stop)``: values and state (CPU)."""
        lo, hi = self._part(start, stop)
        with self._cond:
            return self.rows.read_rows(lo, hi)

    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        """``state`` holds global rows from ``start`` (this region's columns); the rows
        that fall in this region are written."""
        n = state["weight"].shape[0]
        lo, hi = self._part(start, start + n)
        if hi <= lo:
            return
        offset = lo + self.region.row_start - start
        with self._cond:
            self.rows.write_rows(lo, {k: v[offset : offset + hi - lo] for k, v in state.items()})

    def save_region(self, target: Any, prefix: str, changed_only: bool = False) -> None:
        """Begin writing this region (from memory or its zarr store) under ``prefix``: the
        snapshot is of the step now done; it is written while later steps run."""
        with self._cond:
            if self._save is not None and not self._save.done:
                raise CheckpointError(
                    f"shard {self.region.shard}: the previous save is still being written"
                )
            self._save = RegionSave(
                self.rows, target, prefix, self.region, changed_only=changed_only
            )

    def save_status(self) -> dict[str, Any]:
        if self._save is None:
            raise CheckpointError(f"shard {self.region.shard}: no save was begun")
        status = self._save.progress()
        if status["done"]:
            status["objects"] = self._save.result()  # raises if the save failed
        return status

    def load_region(self, chain: list[table_store.Source], prefix: str, num_rows: int) -> None:
        """Replace the region by a checkpoint's. What a failed run left half done goes:
        gradients of a step never applied, a barrier round some workers never joined
        (its waiters fail), a save no manifest will name (it is let finish first)."""
        self._settle_save()
        with self._cond:
            attrs = table_store.load_region_from(
                chain, prefix, self.region, self._write_local, num_rows=num_rows, dim=self.dim
            )
            self.rows.steps = int(attrs["steps"])
            self.rows.changed[:] = False
            self.rows.zero_grad()
            self.restarted = False
            if self._arrived:
                self._arrived.clear()
                self._dropped = self._generation
                self._generation += 1
                self._cond.notify_all()

    def _settle_save(self) -> None:
        save = self._save
        if save is not None and not save.done:
            with contextlib.suppress(Exception):  # that save's checkpoint is abandoned anyway
                save.result()

    def _write_local(self, lo: int, state: dict[str, torch.Tensor]) -> None:
        self.rows.write_rows(lo, state)

    def stats(self) -> dict[str, Any]:
        r = self.region
        with self._cond:
            counters = dict(self.counters)
            kept = sum(len(k) for k in self._kept.values())  # lookups awaiting a backward
            cache = {}
            if isinstance(self.rows, CachedRows):
                cache = dict(self.rows.counters)
                cache["store_bytes"] = self.rows.store.bytes_on_disk()
                cache["process_disk_read_bytes"] = process_disk_read_bytes()
        return {
            "shard": r.shard,
            "region": [r.row_start, r.row_stop, r.col_start, r.col_stop],
            "device": str(self.device),
            "cached": isinstance(self.rows, CachedRows),
            "optimizer_steps": self.rows.steps,
            "workers": self.workers,
            "kept_lookups": kept,
            **counters,
            **cache,
        }

    def fill_store(self) -> None:
        """Write a new zarr region's initial chunks (a shard made with ``fill_later``)."""
        if isinstance(self.rows, CachedRows):
            self.rows.store.fill()

    def fill_progress(self) -> tuple[int, int]:
        """(rows written, rows) of the zarr region; (0, 0) for a shard held in memory."""
        if isinstance(self.rows, CachedRows):
            return self.rows.store.rows_filled, self.rows.store.rows
        return 0, 0

    def where(self) -> dict[str, Any]:
        """Where this shard runs: host, process and device (for the placement table)."""
        return {"shard": self.region.shard, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device)}  # fmt: skip

    def ping(self) -> int:
        return self.region.shard
