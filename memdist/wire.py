"""What travels between workers and shards: typed requests and de-duplicated indices.

Every request a worker (or the driver) sends a shard is a small dataclass below
(``Lookup``, ``Backward``, ``KeptBackward``, ``GradNorm``, ``Step``, ``Prefetch`` and
the state and control requests); every transport carries these, and ``ShardServer.handle``
answers them, so no method names or tuples whose shape depends on the transport
travel anywhere.

A bag of N x K indices usually repeats rows (popular keys, several heads reading
the same row). ``PackedIndices`` sends each distinct row once as int64 and one
int32 position per entry, instead of N x K int64 indices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PACK_BY_FLAGS_ROWS_PER_INDEX = 8  # flags for up to this many rows per index, else a sort


@dataclass(frozen=True, slots=True)
class PackedIndices:
    rows_U: torch.Tensor  # distinct rows, sorted, int64
    inverse_NK: torch.Tensor  # position of each entry's row in rows_U, int32

    @classmethod
    def pack(cls, idx_NK: torch.Tensor) -> PackedIndices:
        """``torch.unique(idx_NK, sorted=True, return_inverse=True)``; by marking rows in a
        table of flags when the indices span at most a few times their count (a value
        table's rows: 4.7 ms -> 0.8 ms for 2048 x 64 indices into 4096 rows), else by
        its sort. Indices must be non-negative (lookups check them first)."""
        flat_M = idx_NK.reshape(-1)
        span = int(flat_M.max()) + 1 if flat_M.numel() else 0
        if span > PACK_BY_FLAGS_ROWS_PER_INDEX * flat_M.numel() + 65536:
            rows_U, inverse = torch.unique(idx_NK, sorted=True, return_inverse=True)
            return cls(rows_U.long(), inverse.to(torch.int32))
        seen_R = torch.zeros(span, dtype=torch.bool)
        seen_R[flat_M] = True
        rows_U = seen_R.nonzero().squeeze(1)
        slot_R = torch.empty(span, dtype=torch.int32)
        slot_R[rows_U] = torch.arange(rows_U.numel(), dtype=torch.int32)
        return cls(rows_U, slot_R[flat_M].view(idx_NK.shape))

    def unpack(self) -> torch.Tensor:
        return self.rows_U[self.inverse_NK.long()]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows_U, self.inverse_NK))


def unpack(idx: torch.Tensor | PackedIndices) -> torch.Tensor:
    return idx.unpack() if isinstance(idx, PackedIndices) else idx


# -- requests from workers to shards ---------------------------------------------------
# Each request is a small dataclass; a shard server answers it in ``ShardServer.handle``.
# ``ORDERED`` requests of one worker are served in the order it sent them (a hint before
# the lookup it prepares); ``HOT`` ones are the per-step traffic, which the collective
# transport carries as tensors (``to_tensors``/``from_tensors``), the rest go over Ray.


@dataclass(frozen=True, slots=True)
class Lookup:
    """Pooled rows of the shard's part for each bag -> ``y`` (payload dtype). With ``keep``
    >= 0 the shard keeps the indices and scores under that number for ``worker``'s
    ``KeptBackward``, so they cross the wire once. ``bags`` (N + 1 offsets), to a row
    region: ``idx`` and ``scores_NK`` are 1-D, only the entries whose rows it holds, in
    flat position order, bag n being entries ``[bags[n], bags[n + 1])``; its score
    gradients then come back one per entry."""

    idx: torch.Tensor | PackedIndices
    scores_NK: torch.Tensor
    keep: int = -1
    worker: int = 0
    bags: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Backward:
    """Output gradient (whole, or the shard's columns) -> partial ``dscores_NK``; the row
    gradients stay on the shard for the step."""

    idx: torch.Tensor | PackedIndices
    scores_NK: torch.Tensor
    dy: torch.Tensor
    worker: int = 0
    bags: torch.Tensor | None = None  # as ``Lookup.bags``


@dataclass(frozen=True, slots=True)
class KeptBackward:
    """``Backward`` of the lookup ``worker`` sent with ``keep=lookup``: only the output
    gradient travels -> partial ``dscores_NK``."""

    lookup: int
    dy: torch.Tensor
    worker: int = 0


@dataclass(frozen=True, slots=True)
class GradNorm:
    """Barrier: once every worker asked, the squared norm of the shard's summed, scaled
    gradient -> float (for clipping over the whole table before ``Step``)."""

    grad_scale: float
    worker: int = 0
    ordered: bool = False  # served in the worker's order, after its earlier backwards


@dataclass(frozen=True, slots=True)
class Step:
    """Barrier: once every worker's step arrived, apply the optimizer with the gradients
    times ``grad_scale * clip`` -> ``StepReply``."""

    grad_scale: float
    worker: int = 0
    clip: float = 1.0
    ordered: bool = False  # served in the worker's order, before its later ORDERED requests


@dataclass(frozen=True, slots=True)
class StepReply:
    rows: int  # rows the shard updated
    grad_sq: float  # squared norm of its scaled gradient, before clipping


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Rows (global, unique, 1-D) a coming lookup will read -> rows loaded from zarr."""

    rows_U: torch.Tensor


@dataclass(frozen=True, slots=True)
class ZeroGrad:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    """Write cached rows back to the shard's store, at most ``max_rows`` of them (all
    when None); the reply is the number still to write."""

    max_rows: int | None = None


@dataclass(frozen=True, slots=True)
class ReadRows:
    """The shard's part of global rows ``[start, stop)``: values and state (CPU) -> dict."""

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class WriteRows:
    """Overwrite the shard's part of global rows ``[start, start + R)`` with ``state``
    (already cut to the shard's columns)."""

    start: int
    state: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class SaveRegion:
    """Begin writing the shard's region as ``region{shard}`` of the table group under
    ``prefix`` of ``target`` (a checkpoint target); ``changed_only``: only the rows
    changed since the previous save. Returns once the snapshot is taken -> None."""

    target: Any
    prefix: str
    changed_only: bool = False


@dataclass(frozen=True, slots=True)
class SaveStatus:
    """How the shard's save is going -> ``RegionSave.progress()``, with ``objects`` (key
    -> size, SHA-256) once done; a failed save raises here."""


@dataclass(frozen=True, slots=True)
class LoadRegion:
    """Fill the shard's region from the table saved under ``prefix`` of each checkpoint
    of ``chain`` (``table_store.Source``: full, then incremental), checking every object
    read against its manifest first -> None."""

    chain: list[Any]
    prefix: str
    num_rows: int  # the table's, checked against the saved one


@dataclass(frozen=True, slots=True)
class SetSteps:
    steps: int


@dataclass(frozen=True, slots=True)
class Stats:
    pass


Request = (
    Lookup | Backward | KeptBackward | GradNorm | Step | Prefetch | ZeroGrad | Flush | ReadRows
    | WriteRows | SaveRegion | SaveStatus | LoadRegion | SetSteps | Stats
)  # fmt: skip
ORDERED = (Lookup, Backward, KeptBackward, Prefetch)
HOT = (Lookup, Backward, GradNorm, Step, Prefetch, KeptBackward)


def in_order(req: Request) -> bool:
    """Whether the shard serves ``req`` in its worker's order: ``ORDERED`` requests, a
    step sent ahead of the lookups that must see it (``Step.ordered``), and a gradient
    norm sent behind the backwards it must see (``GradNorm.ordered``)."""
    return isinstance(req, ORDERED) or (isinstance(req, (Step, GradNorm)) and req.ordered)


def to_tensors(req: Request) -> list[torch.Tensor]:
    """A hot request's tensors for the collective transport (the worker travels apart)."""
    match req:
        case Lookup(idx, scores) | Backward(idx, scores):
            parts = [idx.rows_U, idx.inverse_NK] if isinstance(idx, PackedIndices) else [idx]
            packed = torch.tensor([len(parts)])
            extra = [req.dy] if isinstance(req, Backward) else [torch.tensor([req.keep])]
            bags = [req.bags] if req.bags is not None else []  # last, when sent
            return [packed, *parts, scores, *extra, *bags]
        case KeptBackward(lookup, dy):
            return [dy, torch.tensor([lookup])]
        case GradNorm(scale, _, ordered):
            return [torch.tensor([scale, float(ordered)], dtype=torch.float64)]
        case Step(scale, _, clip, ordered):
            return [torch.tensor([scale, clip, float(ordered)], dtype=torch.float64)]
        case Prefetch(rows):
            return [rows]
    raise TypeError(f"{type(req).__name__} does not travel as tensors")


def from_tensors(kind: type, tensors: list[torch.Tensor], worker: int) -> Request:
    """The request ``to_tensors`` encoded, with the sender's rank."""
    if kind in (Lookup, Backward):
        n = int(tensors[0])
        idx = PackedIndices(tensors[1], tensors[2]) if n == 2 else tensors[1]
        scores = tensors[1 + n]
        bags = tensors[3 + n] if len(tensors) > 3 + n else None
        if kind is Lookup:
            return Lookup(idx, scores, int(tensors[2 + n][0]), worker, bags)
        return Backward(idx, scores, tensors[2 + n], worker, bags)
    if kind is KeptBackward:
        return KeptBackward(int(tensors[1][0]), tensors[0], worker)
    if kind is GradNorm:
        scale, ordered = tensors[0].tolist()
        return GradNorm(scale, worker, bool(ordered))
    if kind is Step:
        scale, clip, ordered = tensors[0].tolist()
        return Step(scale, worker, clip, bool(ordered))
    if kind is Prefetch:
        return Prefetch(tensors[0])
    raise TypeError(f"{kind.__name__} does not travel as tensors")


def reply_to_tensor(req: Request, reply: object) -> torch.Tensor:
    if isinstance(reply, torch.Tensor):
        return reply
    if isinstance(reply, StepReply):
        return torch.tensor([float(reply.rows), reply.grad_sq], dtype=torch.float64)
    return torch.tensor([float(reply)], dtype=torch.float64)  # type: ignore[arg-type]


def reply_from_tensor(req: Request, t: torch.Tensor) -> object:
    if isinstance(req, Step):
        return StepReply(int(t[0]), float(t[1]))
    if isinstance(req, GradNorm):
        return float(t[0])
    if isinstance(req, Prefetch):
        return int(t[0])
    return t


# -- over Ray: tensors as numpy arrays ---------------------------------------------------
# Ray stores a numpy array's bytes once, out of band (and a reader maps them), where a
# torch tensor is pickled byte by byte: a 512 KB tensor costs a round trip about twice
# a numpy array's (benchmarks/reports, issue 13). Requests and replies travel through
# Ray as ``to_arrays`` makes them and are rebuilt by ``from_arrays``.


@dataclass(frozen=True, slots=True)
class _Array:
    """A CPU tensor in transit: its bytes as a numpy array (bf16 as int16) and its dtype."""

    array: np.ndarray
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _Fields:
    """A dataclass in transit: its class and its fields, encoded."""

    cls: type
    fields: dict[str, Any]


def to_arrays(obj: Any) -> Any:
    """``obj`` with every CPU tensor inside (dataclasses, lists, tuples, dicts) as an array."""
    if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
        t = obj.detach()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return _Array(raw.numpy(), t.dtype)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: to_arrays(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return _Fields(type(obj), fields)
    return _each(obj, to_arrays)


def from_arrays(obj: Any) -> Any:
    """What ``to_arrays`` encoded, with tensors of their own memory (an array Ray maps
    read-only is copied)."""
    if isinstance(obj, _Array):
        array = obj.array if obj.array.flags.writeable else obj.array.copy()
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if obj.dtype == torch.bfloat16 else t
    if isinstance(obj, _Fields):
        return obj.cls(**{k: from_arrays(v) for k, v in obj.fields.items()})
    return _each(obj, from_arrays)


def _each(obj: Any, fn: Any) -> Any:
    """``fn`` over the items of a list, tuple or dict's values; anything else as it is."""
    if isinstance(obj, list | tuple):
        return type(obj)(fn(v) for v in obj)
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    return obj
