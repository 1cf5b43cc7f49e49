"""The collective transport: the hot path over a torch.distributed group of memdist's own.

Lookups, backwards, steps and prefetch hints (indices, scores, pooled outputs,
gradients) travel as point-to-point messages in a gloo ``ProcessGroupGloo`` that
spans one table's shards and the workers. The group is built from its own
``TCPStore`` rendezvous (hosted by the process that started the shards, under a
prefix per table) and is never the default group, so DeepSpeed's group is untouched.
Control calls (values, state, stats, ping) still go through Ray: they are rare and
carry Python objects.

Ranks: shards are 0..M-1, worker w is M + w. Every tensor travels as a meta word
vector (dtype, shape) and then its data. A request (one of ``memdist.wire.HOT``,
encoded by ``wire.to_tensors``) is ``[kind, worker, n, id]`` on ``REQUEST_TAG``
followed by n tensors tagged with the request's own tag; the reply uses that tag
too (``[status, n]`` and n tensors, or the error message as bytes), so replies to
concurrent requests cannot be confused. A reply that does not come within the
timeout raises ``ShardTimeoutError`` (gloo reports it as a plain RuntimeError, so
the transport keeps its own deadline).

Letters: N tokens, K rows per token, D row width.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from memdist import wire
from memdist.errors import ShardError
from memdist.transport import RayTransport, Transport, timed_out

DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16,
          torch.float16, torch.uint8)  # fmt: skip
META = 8  # int64 words: dtype code, ndim, up to 6 sizes
REQUEST_TAG = 1
FIRST_REQUEST = 16  # request tags start here, clear of REQUEST_TAG
GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # joining waits for slow workers to start
IDLE_LIMIT = datetime.timedelta(days=7)  # a shard waits this long for its next request


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where one table's group meets: the store's address, its prefix and the group size."""

    host: str
    port: int
    prefix: str
    shards: int
    workers: int

    @property
    def world(self) -> int:
        return self.shards + self.workers

    def join(self, rank: int) -> dist.ProcessGroupGloo:
        """Build this rank's side of the group (returns once every member joined)."""
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=GROUP_TIMEOUT)
        return dist.ProcessGroupGloo(
            dist.PrefixStore(self.prefix, store), rank, self.world, GROUP_TIMEOUT
        )


def host_store() -> dist.TCPStore:
    """The rendezvous store, in the process that starts the shards (kept alive there)."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)


# -- tensors on the wire ----------------------------------------------------------------
def _send(pg, tensors: list[torch.Tensor], dst: int, tag: int) -> list[Any]:
    works = []
    for t in tensors:
        t = t.detach().contiguous().cpu()
        meta = torch.zeros(META, dtype=torch.int64)
        meta[0], meta[1] = DTYPES.index(t.dtype), t.ndim
        meta[2 : 2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
        works.append((pg.send([meta], dst, tag), meta))
        if t.numel():
            works.append((pg.send([t], dst, tag), t))  # the tensor stays alive until sent
    return works


def _recv(pg, src: int, tag: int, timeout: datetime.timedelta) -> torch.Tensor:
    meta = torch.zeros(META, dtype=torch.int64)
    pg.recv([meta], src, tag).wait(timeout)
    shape = meta[2 : 2 + int(meta[1])].tolist()
    t = torch.empty(shape, dtype=DTYPES[int(meta[0])])
    if t.numel():
        pg.recv([t], src, tag).wait(timeout)
    return t


# -- the worker's side -------------------------------------------------------------------
class CollectiveTransport(Transport):
    """Lookups, backwards and steps over the group; other requests through Ray actors.

    The group is joined on the first hot-path call, so a process that only reads
    state (the driver of a multi-worker run) never joins it.
    """

    def __init__(self, actors: list[Any], rendezvous: Rendezvous, worker: int,
                 timeout_s: float = 60.0) -> None:  # fmt: skip
        self.shards = len(actors)
        self.rendezvous = rendezvous
        self.worker = worker
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._ray = RayTransport(actors, timeout_s=timeout_s)
        self._pg: Any = None
        self._ids = itertools.count()

    def _group(self):
        if self._pg is None:
            self._pg = self.rendezvous.join(self.rendezvous.shards + self.worker)
        return self._pg

    def submit(self, shard: int, req: wire.Request) -> Any:
        if not isinstance(req, wire.HOT):
            return ("ray", self._ray.submit(shard, req))
        pg = self._group()
        tag = FIRST_REQUEST + next(self._ids) % 2**30  # gloo tags are 32-bit
        tensors = wire.to_tensors(req)
        header = torch.tensor([wire.HOT.index(type(req)), self.worker, len(tensors), tag])
        try:
            works = [(pg.send([header], shard, REQUEST_TAG), header)]
            works += _send(pg, tensors, shard, tag)
        except RuntimeError as exc:
            return ("failed", shard, exc)
        return ("pg", shard, tag, works, req)

    def collect(self, handles: Sequence[Any], what: str) -> list[Any]:
        if handles and all(h[0] == "ray" for h in handles):
            return self._ray.collect([h[1] for h in handles], what)
        return [self._reply(h, what) for h in handles]

    def _reply(self, handle: Any, what: str) -> Any:
        if handle[0] == "failed":
            _, shard, exc = handle
            raise ShardError(f"memory shard {shard} is unreachable during {what}: {exc}") from exc
        _, shard, tag, works, req = handle
        pg = self._group()
        deadline = time.monotonic() + self.timeout_s
        try:
            status = _recv(pg, shard, tag, self.timeout)
            for work, _ in works:
                work.wait(self.timeout)
            out = [_recv(pg, shard, tag, self.timeout) for _ in range(int(status[1]))]
        except RuntimeError as exc:
            if time.monotonic() >= deadline:
                raise timed_out(shard, what, self.timeout_s) from exc
            raise ShardError(f"memory shard {shard} died during {what}: {exc}") from exc
        if int(status[0]) != 0:
            message = bytes(out[0].tolist()).decode(errors="replace")
            raise ShardError(f"memory shard {shard} failed during {what}: {message}")
        return wire.reply_from_tensor(req, out[0])


# -- the shard's side --------------------------------------------------------------------
def serve(server: Any, rendezvous: Rendezvous, rank: int) -> None:
    """Answer requests from the workers until the group breaks (a worker went away).

    Each worker's lookups, backwards, hints and steps sent ahead (``wire.in_order``) run
    one at a time in its arrival order (a hint before the lookup it prepares, a step
    before the lookups that must see it), on a thread of the worker's own, so a step
    waiting at the barrier holds up only its worker's later requests; other steps run
    in a pool (the server's own lock keeps its state consistent).
    A gloo receive that times out is abandoned for good, so the wait for the next
    request has no practical limit: an idle shard keeps serving.
    """
    pg = rendezvous.join(rank)
    timeout = datetime.timedelta(seconds=server.barrier_timeout_s + 30)
    send_locks = {w: threading.Lock() for w in range(rendezvous.workers)}
    pool = ThreadPoolExecutor(max_workers=4 * rendezvous.workers + 2)
    # Per worker, its ordered requests in arrival order.
    in_order = [ThreadPoolExecutor(max_workers=1) for _ in range(rendezvous.workers)]

    def delivered(works: list[Any]) -> None:
        try:
            for work, _ in works:
                work.wait(timeout)
        except RuntimeError:
            pass  # the worker went away; the receive loop sees the group break

    def answer(req: wire.Request | Exception, worker: int, tag: int) -> None:
        try:
            if isinstance(req, Exception):
                raise req
            reply = [wire.reply_to_tensor(req, server.handle(req))]
            status = 0
        except Exception as exc:  # goes back to the worker, which raises ShardError
            message = f"{type(exc).__name__}: {exc}".encode()
            reply = [torch.tensor(list(message), dtype=torch.uint8)]
            status = 1
        dst = rendezvous.shards + worker
        with send_locks[worker]:  # one reply's messages leave together
            works = _send(pg, [torch.tensor([status, len(reply)]), *reply], dst, tag)
        # A send completes when the worker receives it, which for a hint's reply is at its
        # next step: wait elsewhere, so the requests behind this one are not held up.
        pool.submit(delivered, works)

    while True:
        header = torch.zeros(4, dtype=torch.int64)
        try:
            pg.recv_anysource([header], REQUEST_TAG).wait(IDLE_LIMIT)  # type: ignore[attr-defined]
            code, worker, n, tag = (int(x) for x in header)
            tensors = [_recv(pg, rendezvous.shards + worker, tag, timeout) for _ in range(n)]
        except RuntimeError:
            break  # the group broke: a worker died or the run ended
        req: wire.Request | Exception
        try:
            req = wire.from_tensors(wire.HOT[code], tensors, worker)
        except Exception as exc:  # answered as an error, like a failed request
            req = exc
        ordered = not isinstance(req, Exception) and wire.in_order(req)
        (in_order[worker] if ordered else pool).submit(answer, req, worker, tag)
    pool.shutdown(wait=False)
    for executor in in_order:
        executor.shutdown(wait=False)
