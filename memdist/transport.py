"""Transports: how a worker's requests reach memory shards and their replies come back.

One interface (``Transport``): ``submit(shard, request) -> handle`` issues a typed
request (``memdist.wire``) without waiting (``submit_all`` one to each shard, a request
several shards get travelling once where the transport can); ``wait(handles, what) -> replies``
collects replies in order, within a bounded time, and raises ``ShardError`` naming
the shard that failed (``ShardTimeoutError`` for one that stayed silent). Requests
to all shards are issued before any is awaited, so shards work concurrently. While a
transport collects replies (``collect``, its own part) the worker's idle OpenMP
threads sleep instead of spinning on cores the shards may share (``Transport.parks``).

- ``InProcessTransport``: shard servers in this process (one machine, tests).
- ``RayTransport``: shard servers in Ray actors; the ordered requests (lookups,
  backwards, hints, steps sent ahead) go on a direct line to each actor
  (``memdist.line``: a Unix socket on the worker's node, TCP to others), the rest as
  Ray's actor calls; the bulky ones' arrays go through shared memory (``memdist.shm``)
  to actors on the worker's node, on the line to others.
- ``memdist.collective.CollectiveTransport``: the per-step requests over a gloo
  group of memdist's own, the rest over Ray.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import Any

from memdist.errors import MemdistError, ShardError, ShardTimeoutError, SlowPathWarning
from memdist.kernels import cpp_ops
from memdist.line import Line, Ticket
from memdist.shm import Channel, open_channels
from memdist.wire import (
    Backward,
    KeptBackward,
    Lookup,
    Request,
    from_arrays,
    in_order,
    to_arrays,
)

BULKY = (Lookup, Backward, KeptBackward)  # of the size of a step's indices, scores, outputs


class Transport(ABC):
    shards: int

    @abstractmethod
    def submit(self, shard: int, req: Request) -> Any:
        """Send ``req`` to ``shard``; returns a handle for ``wait``. Never blocks on it."""

    # Whether collecting replies may wait on other processes: then this process's idle
    # OpenMP threads sleep meanwhile (``cpp_ops.parked``) instead of spinning on cores
    # the shards may share (measured: a step through 2 Ray row shards on 2 cores,
    # 36.64-39.96 -> 28.85-35.47 ms, the worker's CPU 28.46 -> 17.43-18.22 ms a step).
    parks = True

    def wait(self, handles: Sequence[Any], what: str) -> list[Any]:
        """The replies of ``handles`` in order; ``what`` names the request in errors."""
        if not self.parks:
            return self.collect(handles, what)
        return cpp_ops.parked(lambda: self.collect(handles, what))

    @abstractmethod
    def collect(self, handles: Sequence[Any], what: str) -> list[Any]:
        """``wait``'s replies, as this transport gets them."""

    def submit_all(self, reqs: Sequence[Request]) -> list[Any]:
        """``reqs[s]`` to shard ``s``, every one sent before any is awaited."""
        return [self.submit(s, req) for s, req in enumerate(reqs)]


def timed_out(shard: int, what: str, timeout_s: float) -> ShardTimeoutError:
    return ShardTimeoutError(
        f"memory shard {shard} did not answer {what} within {timeout_s:g} s "
        "(shards.timeout_s); it may be dead or overloaded"
    )


class InProcessTransport(Transport):
    """Calls shard servers directly; replies are ready at once."""

    parks = False

    def __init__(self, servers: Sequence[Any]) -> None:
        self.servers = list(servers)
        self.shards = len(self.servers)

    def submit(self, shard: int, req: Request) -> Any:
        try:
            return ("ok", self.servers[shard].handle(req))
        except Exception as exc:  # kept and raised at wait(), like a remote failure
            return ("error", shard, exc)

    def collect(self, handles: Sequence[Any], what: str) -> list[Any]:
        out = []
        for h in handles:
            if h[0] == "error":
                _, shard, exc = h
                raise ShardError(f"memory shard {shard} failed during {what}: {exc}") from exc
            out.append(h[1])
        return out


class RayTransport(Transport):
    """Shard servers in Ray actors; each wait is bounded by ``timeout_s``. ``worker``'s
    lookups, backwards, hints and steps sent ahead (``wire.in_order``) are numbered per
    shard, so the actor serves them in the order they were sent (Ray does not promise
    that for a threaded actor). ``shared_memory`` and ``direct_lines`` allow the
    faster paths (``memdist.shm``, ``memdist.line``), opened at the first request; a
    shard they cannot reach is served through Ray."""

    def __init__(self, actors: Sequence[Any], timeout_s: float = 60.0, worker: int = 0,
                 shared_memory: bool = True, direct_lines: bool = True) -> None:  # fmt: skip
        self.actors = list(actors)
        self.shards = len(self.actors)
        self.timeout_s = timeout_s
        self.worker = worker
        self._seq = [0] * self.shards
        self._allowed = (shared_memory, direct_lines)  # until opened (first use)
        self._channels: list[Channel | None] = [None] * self.shards
        self._lines: list[Line | None] = [None] * self.shards

    def _open(self) -> None:
        """Once: the channels to the actors on this node and the lines to all, as allowed."""
        shared_memory, direct_lines = self._allowed
        self._allowed = (False, False)
        if not (shared_memory or direct_lines):
            return
        import ray

        try:
            own = ray.get_runtime_context().get_node_id()
            nodes = [w.get("node") for w in ray.get([a.where.remote() for a in self.actors],
                                                    timeout=self.timeout_s)]  # fmt: skip
        except Exception as exc:  # any failure here leaves Ray's path, which reports it
            warnings.warn(
                f"memory shards' nodes unknown ({type(exc).__name__}: {exc}): every request "
                "goes through Ray's actor calls and object store",
                SlowPathWarning, stacklevel=2,
            )  # fmt: skip
            return
        if shared_memory:
            self._channels = open_channels(nodes, own) or self._channels
        if direct_lines:
            self._lines = open_lines(self.actors, [n == own for n in nodes], self.timeout_s)

    def channel(self, shard: int) -> Channel | None:
        """The shared-memory channel to ``shard`` when it runs on this node."""
        if any(self._allowed):
            self._open()
        return self._channels[shard]

    def line(self, shard: int) -> Line | None:
        """The direct line to ``shard``, where one is open."""
        if any(self._allowed):
            self._open()
        return self._lines[shard]

    def submit(self, shard: int, req: Request) -> Any:
        return self._send(shard, req, *self._prepare(shard, req))

    def _prepare(self, shard: int, req: Request) -> tuple[Any, Channel | None]:
        """``req`` as it travels to ``shard``: placed in the shared memory of the channel
        it returns, or as ``to_arrays`` makes it (no channel)."""
        arrays = to_arrays(req)
        if isinstance(req, BULKY) and (ch := self.channel(shard)) is not None:
            try:
                sent = ch.send(arrays)
            except OSError:  # no memory for the buffer: the arrays go whole from now on
                self._channels[shard] = None
                sent = None
            if sent is not None:
                return sent, ch
        return arrays, None

    def submit_all(self, reqs: Sequence[Request]) -> list[Any]:
        """A lookup or backward that several shards get through Ray (no line, no shared
        memory) goes into Ray's object store once and each actor reads it there (a 1 MB
        lookup to 2 column shards: ~10 -> ~8 ms). Every request is ready (placed in
        shared memory) before the first goes out, so the shards get theirs back to back
        and begin together."""
        import ray

        sends = Counter(id(req) for req in reqs)
        stored: dict[int, Any] = {}  # id of a request -> its reference in the store
        ready: list[tuple[Any, Channel | None]] = []
        for shard, req in enumerate(reqs):
            through_ray = self.channel(shard) is None and self.line(shard) is None
            if isinstance(req, BULKY) and through_ray and sends[id(req)] > 1:
                if id(req) not in stored:
                    stored[id(req)] = ray.put(to_arrays(req))
                ready.append((stored[id(req)], None))
            else:
                ready.append(self._prepare(shard, req))
        return [self._send(s, req, sent, ch)
                for s, (req, (sent, ch)) in enumerate(zip(reqs, ready, strict=True))]  # fmt: skip

    def _send(self, shard: int, req: Request, sent: Any, channel: Channel | None = None) -> Any:
        """``sent``: ``req`` as ``to_arrays`` makes it, a reference to that in the store,
        or its ``ShmRequest`` placed in ``channel``."""
        actor = self.actors[shard]
        if not in_order(req):
            return (shard, actor.handle_arrays.remote(sent), channel)
        seq, self._seq[shard] = self._seq[shard], self._seq[shard] + 1
        if (ln := self.line(shard)) is not None:
            try:
                return (shard, ln.send(self.worker, seq, sent), channel)
            except OSError:  # the actor's end is gone: Ray's call says how
                self._drop(shard)
        return (shard, actor.handle_ordered.remote(sent, self.worker, seq), channel)

    def collect(self, handles: Sequence[Any], what: str) -> list[Any]:
        import ray

        deadline = time.monotonic() + self.timeout_s
        refs = [ref for _, ref, _ in handles if not isinstance(ref, Ticket)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        ready_set = set(ready)
        out = []
        for i, (shard, ref, channel) in enumerate(handles):
            try:
                reply = (self._answer_of(ref, shard, what, deadline) if isinstance(ref, Ticket)
                         else self._reply_of(ref, ready_set, shard, what))  # fmt: skip
            except ShardError:
                for shard_left, ref_left, channel_left in handles[i:]:
                    if channel_left is not None or isinstance(ref_left, Ticket):
                        self._drop(shard_left)
                raise
            out.append(from_arrays(channel.receive(reply) if channel is not None else reply))
        return out

    def _reply_of(self, ref: Any, ready: set[Any], shard: int, what: str) -> Any:
        """The reply of a Ray call; a ``ShardError`` naming the shard if there is none."""
        import ray

        if ref not in ready:
            raise timed_out(shard, what, self.timeout_s)
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise ShardError(f"memory shard {shard} died during {what}: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            # A shard's own error says what went wrong; Ray's wrapper adds its traceback.
            cause = exc.cause if isinstance(exc.cause, MemdistError) else exc
            raise ShardError(f"memory shard {shard} failed during {what}: {cause}") from exc

    def _answer_of(self, ticket: Ticket, shard: int, what: str, deadline: float) -> Any:
        """The reply of a request sent on a direct line; a ``ShardError`` if none came."""
        try:
            ok, reply = ticket.line.receive(ticket.seq, deadline)
        except TimeoutError:
            raise timed_out(shard, what, self.timeout_s) from None
        except OSError as exc:  # its process ended (Ray may restart it)
            raise ShardError(f"memory shard {shard} died during {what}: {exc}") from exc
        if not ok:
            cause = reply if isinstance(reply, MemdistError) else f"{type(reply).__name__}: {reply}"
            raise ShardError(f"memory shard {shard} failed during {what}: {cause}") from reply
        return reply

    def _drop(self, shard: int) -> None:
        """A shard whose reply did not arrive may still write into its reply buffer or
        onto its line: its later requests go through Ray's calls and object store."""
        dropped, self._lines[shard], self._channels[shard] = self._lines[shard], None, None
        if dropped is not None:
            dropped.close()  # the actor still answers what it got, to no one


def open_lines(actors: list[Any], near: list[bool], timeout_s: float) -> list[Line | None]:
    """Per shard, a direct line to its actor (a Unix socket where ``near``, TCP to another
    node); None where the actor offers none or it cannot be reached (its requests then
    go through Ray's actor calls)."""
    import ray

    lines: list[Line | None] = [None] * len(actors)
    offers: dict[int, Any] = {}
    for s, (actor, n) in enumerate(zip(actors, near, strict=True)):
        try:
            offers[s] = actor.line.remote(n)
        except AttributeError as exc:  # an actor class without lines
            _no_line(f"memory shard {s}", exc)
    deadline = time.monotonic() + timeout_s
    for s, offer in offers.items():
        try:  # an actor that failed, or does not answer in time
            address, token = ray.get(offer, timeout=max(deadline - time.monotonic(), 0.0))
        except Exception as exc:
            _no_line(f"memory shard {s}", exc)
            continue
        try:
            lines[s] = Line(address, token, timeout_s)
        except OSError as exc:  # unreachable (a firewall between nodes?)
            _no_line(f"memory shard {s} at {address!r}", exc)
    return lines


def _no_line(who: str, exc: BaseException) -> None:
    warnings.warn(
        f"{who}: no direct line ({type(exc).__name__}: {exc}); its ordered requests go "
        "through Ray's actor calls (slower; shards.direct_lines)",
        SlowPathWarning, stacklevel=3,
    )  # fmt: skip
