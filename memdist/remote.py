"""A value table whose rows live in shard servers, behind the same seam as a local table.

``RemoteTable.lookup`` sends the indices and scores to every shard at once and
combines the replies: row-wise shards return partial sums (added up here),
column-wise shards return column slices (concatenated). Under autograd the shards
keep the lookup's indices and scores, and the backward sends only the output
gradient (whole, or each shard's slice) and sums the partial score gradients; the
row gradients stay on the shards until ``step()``. DeepSpeed never sees the values.

With several data-parallel workers each holds its own ``RemoteTable`` (with its
``worker`` rank) over the same shards; the shards apply a step once every worker's
``step`` arrived (see ``memdist.cluster.shard``). With ``spec.grad_clip`` a step is
two rounds: the shards' squared gradient norms are summed (every worker sums the
same parts in the same order, so all agree on the factor), then the step is sent
with the clipping factor: exact over shards and workers.

``step_async()`` (how the training loop steps) sends the step without waiting: the
shards serve this worker's later lookups, backwards and hints after it, so training
stays exact, and the update overlaps the dense optimizer's step; the loop then
collects the reply (``wait()``), so a step is done, or has failed, before the next.
When the loop said so first (``expect_step``, before the last micro-batch's backward)
the step goes out right behind the backward of the last lookup still awaiting one, in
the same order on every shard as if sent later, and ``step_async`` only collects it:
one round trip a step fewer, and the update overlaps the rest of the backward too.
With ``grad_clip`` the step needs the summed gradient norm first: the norm's request
goes out there instead (in order, behind the backwards), so ``step_async`` finds the
norms computed and sends the step with its factor. Not with staleness.

Bounded staleness (``staleness=1``, off by default): ``step()`` sends the step and
returns without waiting, and lookups may overtake it, so the next step's lookups
overlap the update; the reply is awaited before the next backward. A lookup may
then read rows from before the previous update (on some shards and not others), and
its backward uses the updated rows: training is no longer identical to a local
table, and not deterministic. The lag never exceeds one step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memdist import kernels, wire
from memdist.cluster.plan import ShardingPlan
from memdist.errors import CheckpointError, ConfigError, ShardError
from memdist.kernels import OptimizerSpec, cpp_ops
from memdist.storage import table_store
from memdist.table import PendingLookup, PendingSave, PendingStep, StepResult, ValueTable
from memdist.transport import Transport
from memdist.values import check_rows_state, clip_coef
from memdist.wire import PackedIndices

INT32_ROWS = 2**31 - 1  # tables up to this many rows send their lookups' indices as int32

SAVE_POLL_S = 0.1  # how often a waiting save asks the shards how far they are
# Rows a shard writes back per flush request: each request must end within
# shards.timeout_s however large the cache (16384 rows of 128 columns under Adam are
# ~25 MB, whose pages may all have to be read from disk first).
FLUSH_ROWS = 16384


class _RemoteBag(torch.autograd.Function):
    """Forward collects replies to a lookup already sent; backward sends the gradient
    (the shards kept the lookup's indices and scores)."""

    @staticmethod
    def forward(ctx, scores_NK, pending):
        ctx.table, ctx.keep, ctx.entries = pending.table, pending.keep, pending.entries
        ctx.device, ctx.dtype = scores_NK.device, scores_NK.dtype
        return pending.table._combine(pending.handles).to(scores_NK.device, scores_NK.dtype)

    @staticmethod
    def backward(ctx, dy_ND):
        dscores = ctx.table._backward(ctx.keep, dy_ND.to(ctx.table.payload), ctx.entries)
        return dscores.to(ctx.device, ctx.dtype), None  # the shards' device may not be ours


@dataclass(frozen=True, slots=True)
class RowEntries:
    """A lookup's entries as row shards get them: per row region of the plan, the flat
    positions of the entries whose rows it holds, in order, and where each bag begins
    among them (N + 1 offsets, int32). Each row shard so computes only its own entries,
    1/shards of the work, instead of every entry with the others' weighing zero."""

    shape: tuple[int, ...]  # the lookup's N x K
    parts: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def split(cls, idx_NK: torch.Tensor, plan: ShardingPlan) -> RowEntries:
        """The C++ kernels' two passes over the entries (2048 x 64 into 2 shards on 2
        threads: 0.29 ms against 0.85 ms for a mask pass per shard), where they build;
        else ``split_by_masks``, which gives the same parts."""
        if not cpp_ops.available():
            return cls.split_by_masks(idx_NK, plan)
        starts_M1 = torch.tensor([r.row_start for r in plan.regions] + [plan.num_rows])
        positions_E, offsets_MN1 = cpp_ops.row_entries(idx_NK, starts_M1)
        sizes = offsets_MN1[:, -1].tolist()
        return cls(
            tuple(idx_NK.shape), list(zip(positions_E.split(sizes), offsets_MN1, strict=True))
        )

    @classmethod
    def split_by_masks(cls, idx_NK: torch.Tensor, plan: ShardingPlan) -> RowEntries:
        parts = []
        for r in plan.regions:
            mine_NK = (idx_NK >= r.row_start) & (idx_NK < r.row_stop)
            offsets_N1 = torch.zeros(idx_NK.shape[0] + 1, dtype=torch.int32)
            torch.cumsum(mine_NK.sum(1, dtype=torch.int32), 0, out=offsets_N1[1:])
            parts.append((mine_NK.view(-1).nonzero().squeeze(1), offsets_N1))
        return cls(tuple(idx_NK.shape), parts)

    def gather(self, t_NK: torch.Tensor, s: int) -> torch.Tensor:
        """Region ``s``'s entries of ``t_NK`` (1-D, in order)."""
        return t_NK.reshape(-1).index_select(0, self.parts[s][0])

    def scatter(self, per_shard: list[torch.Tensor]) -> torch.Tensor:
        """An N x K tensor of the shards' values of their own entries."""
        out = torch.empty(self.shape, dtype=per_shard[0].dtype)
        for (positions_E, _), part in zip(self.parts, per_shard, strict=True):
            out.view(-1).index_copy_(0, positions_E, part)  # each entry is in one region
        return out


class RemoteLookup(PendingLookup):
    """A lookup whose requests are on their way to the shards; ``wait()`` gives y. Under
    autograd the shards keep its indices and scores for the backward (``keep``)."""

    def __init__(self, table: RemoteTable, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> None:
        self.table = table
        self.scores_NK = scores_NK
        training = torch.is_grad_enabled() and scores_NK.requires_grad
        self.keep = table._next_keep() if training else -1
        cpu = idx_NK.detach().cpu()
        # int32 indices take no more bytes than packed ones (whose positions are int32)
        # and cost nothing to make (packing took ~1 ms of a `small` lookup); a table past
        # int32 rows sends each distinct row once as int64.
        narrow = table.num_rows <= INT32_ROWS
        indices = cpu.to(torch.int32) if narrow else cpu
        payload = scores_NK.detach().cpu().to(table.payload)
        # Row shards get only their own entries, column shards every entry.
        split = table.plan.kind == "row" and table.plan.shards > 1  # one holds every row
        self.entries = RowEntries.split(cpu, table.plan) if split else None
        if (e := self.entries) is None:
            idx = indices if narrow else PackedIndices.pack(indices)
            reqs = [wire.Lookup(idx, payload, self.keep, table.worker)] * table.plan.shards
        else:
            reqs = [
                wire.Lookup(
                    e.gather(indices, s) if narrow else PackedIndices.pack(e.gather(indices, s)),
                    e.gather(payload, s),
                    self.keep,
                    table.worker,
                    bags,
                )  # fmt: skip
                for s, (_, bags) in enumerate(e.parts)
            ]
        self.handles = table.transport.submit_all(reqs)

    def wait(self) -> torch.Tensor:
        device, dtype = self.scores_NK.device, self.scores_NK.dtype
        if not torch.is_grad_enabled():
            return self.table._combine(self.handles).to(device, dtype)
        return _RemoteBag.apply(self.scores_NK, self)


def _rescaled(scale: float, announced: float, sent: str) -> ConfigError:
    return ConfigError(
        f"step(grad_scale={scale}) after expect_step(grad_scale={announced}): the {sent} "
        f"was sent with {announced} already; announce the scale the step uses"
    )


class _RemoteStep(PendingStep):
    def __init__(self, table: RemoteTable) -> None:
        self.table = table

    def wait(self) -> StepResult:
        self.table._settle()
        return self.table._last


class RemoteTable(ValueTable):
    """Value rows held by the shards of ``plan``, reached through ``transport``."""

    def __init__(
        self,
        plan: ShardingPlan,
        transport: Transport,
        spec: OptimizerSpec,
        payload: torch.dtype = torch.float32,
        *,
        worker: int = 0,
        staleness: int = 0,
    ) -> None:
        """``spec`` is the shards' optimizer (this side needs its ``grad_clip``).
        ``payload`` is the dtype scores, outputs and gradients travel in (fp32, bf16,
        fp16); the shards compute in fp32 either way. ``worker`` is this worker's rank
        among the workers sharing the shards."""
        self.plan = plan
        self.transport = transport
        self.spec = spec
        self.payload = payload
        self.worker = worker
        self.staleness = staleness
        self.num_rows = plan.num_rows
        self.dim = plan.dim
        self._last = StepResult()
        self._waited = 0.0  # time spent waiting on the shards (for step-time shares)
        self._step_in_flight: tuple[list[Any], float | None] | None = None
        self._prefetches: list[Any] = []  # hints sent, replies not yet collected
        self._prefetched = 0  # rows the shards read from zarr on this worker's hints
        self._kept = 0  # the number the next lookup under autograd is kept by on the shards
        self._backwards_due = 0  # lookups kept on the shards whose backward has not run
        self._expected: float | None = None  # grad_scale of the step ``expect_step`` announced
        self._sent_early: float | None = None  # grad_scale of a step sent behind a backward
        # a gradient norm's requests sent behind a backward (grad_clip), and their grad_scale
        self._norm_early: tuple[list[Any], float] | None = None

    def _wait(self, handles: list[Any], what: str) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return self.transport.wait(handles, what)
        finally:
            self._waited += time.perf_counter() - t0

    def _call_all(self, reqs: Sequence[wire.Request], what: str) -> list[Any]:
        self._settle()
        return self._wait(self.transport.submit_all(reqs), what)

    def _each(self, req: wire.Request, what: str) -> list[Any]:
        return self._call_all([req] * self.plan.shards, what)

    def _settle(self) -> None:
        """Wait for a step sent without waiting (``step_async``, bounded staleness)."""
        if self._step_in_flight is not None:
            (handles, grad_sq), self._step_in_flight = self._step_in_flight, None
            self._record(self._wait(handles, "step"), grad_sq)

    def _record(self, replies: list[wire.StepReply], grad_sq: float | None) -> None:
        # Column shards each touch every row read; row shards touch disjoint rows.
        rows = [r.rows for r in replies]
        touched = rows[0] if self.plan.kind == "column" else sum(rows)
        if grad_sq is None:
            grad_sq = sum(r.grad_sq for r in replies)
        self._last = StepResult(touched, math.sqrt(grad_sq))

    def _combine(self, handles: list[Any]) -> torch.Tensor:
        parts = [p.float() for p in self._wait(handles, "lookup")]
        if self.plan.kind == "column":
            return torch.cat(parts, dim=1)
        y = parts[0]
        for part in parts[1:]:
            y = y + part
        return y

    def _next_keep(self) -> int:
        keep, self._kept = self._kept, self._kept + 1
        self._backwards_due += 1
        return keep

    def _backward(self, keep: int, dy_ND: torch.Tensor, entries: RowEntries | None) -> torch.Tensor:
        """The score gradients of the lookup kept as ``keep``: column shards' partial sums
        added up, or row shards' own entries' (``entries``) put in their places."""
        dy_ND = dy_ND.cpu()
        if self.plan.kind == "column":
            reqs = [
                wire.KeptBackward(
                    keep, dy_ND[:, r.col_start : r.col_stop].contiguous(), self.worker
                )
                for r in self.plan.regions
            ]
        else:
            reqs = [wire.KeptBackward(keep, dy_ND, self.worker)] * self.plan.shards
        self._settle()
        handles = self.transport.submit_all(reqs)
        self._backwards_due -= 1
        if self._expected is not None and self._backwards_due == 0:  # the step's last gradient
            scale, self._expected = self._expected, None
            if self.spec.grad_clip is None:
                self._sent_early = scale
                self._send_step(scale)
            else:  # the step needs the norm: that goes now, the step when asked
                norm = wire.GradNorm(scale, self.worker, ordered=True)
                self._norm_early = (self.transport.submit_all([norm] * self.plan.shards), scale)
        parts = [p.float() for p in self._wait(handles, "backward")]
        if entries is not None:
            return entries.scatter(parts)
        dscores = parts[0]
        for part in parts[1:]:
            dscores = dscores + part
        return dscores

    def lookup_async(self, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> RemoteLookup:
        """Send the lookup now; the caller does other work and then ``wait()``s."""
        kernels.check_indices(idx_NK, self.num_rows)
        return RemoteLookup(self, idx_NK, scores_NK)

    def prefetch(self, idx_NK: torch.Tensor) -> None:
        """Tell the shards which rows a coming lookup will read, without waiting: a shard
        whose region lives in zarr behind a row cache loads them meanwhile. Only where
        rows are changes, never a value. Replies are collected at the next ``step()``."""
        rows_U = torch.unique(idx_NK.detach().cpu().to(torch.int64))
        for s, r in enumerate(self.plan.regions):
            mine = rows_U[(rows_U >= r.row_start) & (rows_U < r.row_stop)]  # column: all
            if mine.numel():
                self._prefetches.append(self.transport.submit(s, wire.Prefetch(mine)))

    def _collect_prefetches(self) -> None:
        handles, self._prefetches = self._prefetches, []
        if handles:
            self._prefetched += sum(self._wait(handles, "prefetch"))

    def step(self, grad_scale: float = 1.0) -> StepResult:
        """This worker's step. ``grad_scale`` must be the same on every worker (1/workers
        for an average, as DeepSpeed averages dense gradients). Returns what the step did
        (with staleness on: the previous step, whose reply was awaited here)."""
        self._begin_step(grad_scale)
        if not self.staleness:
            self._settle()
        return self._last

    def step_async(self, grad_scale: float = 1.0) -> PendingStep:
        """The step, sent without waiting: each shard serves this worker's next lookups,
        backwards and hints after it (they wait their turn there), so training stays
        exactly that of ``step``; ``wait()`` (or the next call that needs the reply: a
        backward, ``last_step``, a flush) collects the reply and raises a shard's error."""
        self._begin_step(grad_scale)
        return _RemoteStep(self)

    def expect_step(self, grad_scale: float = 1.0) -> None:
        if not self.staleness:
            self._expected = grad_scale

    def _begin_step(self, grad_scale: float) -> None:
        """Send the step, unless it went out behind the last backward already."""
        early, self._sent_early, self._expected = self._sent_early, None, None
        self._backwards_due = 0  # a step ends its micro-batches: no backward is still due
        if early is None:
            self._send_step(grad_scale)
        elif early != grad_scale:
            raise _rescaled(grad_scale, early, "step")

    def _send_step(self, grad_scale: float) -> None:
        self._settle()
        self._collect_prefetches()
        clip, grad_sq = 1.0, None
        norm, self._norm_early = self._norm_early, None
        if self.spec.grad_clip is not None:
            if norm is not None and norm[1] != grad_scale:
                raise _rescaled(grad_scale, norm[1], "gradient norm")
            parts = (self._wait(norm[0], "gradient norm") if norm is not None else
                     self._each(wire.GradNorm(grad_scale, self.worker), "gradient norm"))  # fmt: skip
            # Column shards hold column slices of the same rows, row shards disjoint rows:
            # either way the table's squared norm is the sum of the parts.
            grad_sq = math.fsum(parts)
            clip = clip_coef(grad_sq, self.spec.grad_clip)
        # In this worker's order on the shards unless lookups may overtake it (staleness).
        req = wire.Step(grad_scale, self.worker, clip, ordered=not self.staleness)
        self._step_in_flight = (self.transport.submit_all([req] * self.plan.shards), grad_sq)

    def flush(self) -> None:
        """Wait for anything still in flight (a step sent under bounded staleness, hints)
        and have zarr-backed shards write their cached rows back, ``FLUSH_ROWS`` rows a
        request, until none is left: each request is bounded by the transport's timeout,
        not the whole write-back, whose length grows with the cache."""
        self._settle()
        self._collect_prefetches()
        while any(self._each(wire.Flush(FLUSH_ROWS), "flush")):
            pass

    def zero_grad(self) -> None:
        self._each(wire.ZeroGrad(), "zero_grad")

    @property
    def last_step(self) -> StepResult:
        if not self.staleness:
            self._settle()
        return self._last

    @property
    def wait_seconds(self) -> float:
        return self._waited

    @property
    def rows_prefetched(self) -> int:
        return self._prefetched

    def describe(self) -> str:
        return self.plan.describe()

    def stats(self) -> list[dict[str, Any]]:
        return self._each(wire.Stats(), "stats")

    def state_names(self) -> list[str]:
        return [f"state.{k}" for k in kernels.init_optimizer_state(self.spec.name, 0, 1)]

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` gathered from the shards that hold them."""
        self.check_range(start, stop)
        parts = self._each(wire.ReadRows(start, stop), "read_rows")
        if self.plan.kind == "row":
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = {}
        for key in parts[0]:
            per_row = parts[0][key].ndim == 1  # per-row state (Adam step, Adagrad sum)
            # Every column shard holds the same per-row state (Adam's step count).
            out[key] = parts[0][key] if per_row else torch.cat([p[key] for p in parts], dim=1)
        return out

    def write_rows(self, start: int, state: dict[str, torch.Tensor]) -> None:
        """Each shard gets the rows it holds (row plan) or its columns (column plan)."""
        n = check_rows_state(state, self.dim, self.state_names())
        self.check_range(start, start + n)
        if self.plan.kind == "row":
            reqs = []
            for r in self.plan.regions:  # shards without any of the rows get none
                lo = min(max(start, r.row_start), start + n)
                hi = max(lo, min(start + n, r.row_stop))
                reqs.append(
                    wire.WriteRows(lo, {k: v[lo - start : hi - start] for k, v in state.items()})
                )
        else:
            reqs = [
                wire.WriteRows(
                    start,
                    {
                        k: v if v.ndim == 1 else v[:, r.col_start : r.col_stop].contiguous()
                        for k, v in state.items()
                    },
                )  # fmt: skip
                for r in self.plan.regions
            ]
        self._call_all(reqs, "write_rows")

    def begin_save(self, target: Any, prefix: str, *, changed_only: bool = False) -> PendingSave:
        """Every shard takes its snapshot and writes its own region in a thread of its
        own, all at once; the group's attributes follow when every region is durable.
        The returned save may be waited on from another thread while training goes on."""
        self.flush()
        self._each(wire.SaveRegion(target, prefix, changed_only), "save")
        meta = {"optimizer": self.spec.name, "steps": self.steps,
                "kind": "delta" if changed_only else "full"}  # fmt: skip

        def progress() -> list[dict[str, Any]]:
            # Straight to the transport: ``_each`` settles steps, the training thread's job.
            handles = [self.transport.submit(s, wire.SaveStatus()) for s in range(self.plan.shards)]
            try:
                return self.transport.wait(handles, "save")
            except ShardError as exc:
                raise CheckpointError(f"saving {prefix!r} to {target.uri}: {exc}") from exc

        def finish() -> table_store.Objects:
            while not all((status := progress())[s]["done"] for s in range(self.plan.shards)):
                time.sleep(SAVE_POLL_S)
            objects: table_store.Objects = {}
            for part in status:
                objects.update(part["objects"])
            objects.update(table_store.save_table_group(
                target, prefix, num_rows=self.num_rows, dim=self.dim, plan=self.plan.kind,
                regions=list(self.plan.regions), meta=meta,
            ))  # fmt: skip
            return objects

        return PendingSave(progress, finish)

    def load(self, chain: list[table_store.Source], prefix: str) -> None:
        """Every shard reads what it holds from the regions that overlap it (any plan and
        shard count at save time), all at once."""
        self._settle()
        try:
            self._each(wire.LoadRegion(chain, prefix, self.num_rows), "load")
        except ShardError as exc:  # a shard found the checkpoint wanting: say it is that
            uri = chain[-1].target.uri if chain else "an empty chain"
            raise CheckpointError(f"loading {prefix!r} from {uri}: {exc}") from exc

    @property
    def steps(self) -> int:
        return int(self.stats()[0]["optimizer_steps"])

    def set_steps(self, steps: int) -> None:
        self._each(wire.SetSteps(steps), "set_steps")
