"""Shared memory between a worker and the shard actors on its node, for the per-step
bulky messages (lookups, backwards, and their replies).

Through Ray's object store every array over 100 KB costs about 1.5-2.5 ms a hop on the
project's 2-core machine, whatever its size (a 0.05 MB round trip to two actors took
1.3 ms, 0.25 MB 2.9 ms, 1 MB 3.2 ms): a lookup and a backward of ``small`` spent more
time there than in the shards' kernels. Instead the worker keeps, per shard actor on
its node, a request and a reply buffer: anonymous shared memory (``memfd_create``,
space reserved with ``posix_fallocate``, so running out is an error, never a SIGBUS)
that the actor opens through ``/proc/<worker pid>/fd``. No file is left anywhere: the
memory goes when the last process holding it lets go, however it ends. A request's
arrays are copied into the request buffer and only their places (``ShmArray``) travel,
with the reply buffer's, on the worker's direct line to the actor (``memdist.line``;
through Ray where there is none); the actor copies them out, answers, and writes its
reply's arrays into the reply buffer when they fit (else they travel whole, and the
worker grows the buffer).

One bulky request per shard is in flight through the buffers at a time; another goes
whole (on the line, or through Ray's object store where there is none), as does every
request after a buffer could not be made (memory short). After a reply did not come
(the actor may still write it) the shard's requests go through Ray.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memdist.errors import ShardError
from memdist.wire import _Array, _each, _Fields

ALIGN = 64
MIN_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Place:
    """Where a buffer is: ``path`` opens it on this node; ``token`` names it for good
    (a closed buffer's fd number, and so its path, can come back for another one)."""

    path: str
    token: str


@dataclass(frozen=True, slots=True)
class ShmArray:
    """An array's place in a buffer: at ``offset`` of the buffer ``where``."""

    where: Place
    offset: int
    shape: tuple[int, ...]
    np_dtype: str
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class ShmRequest:
    """A request whose arrays are in the sender's request buffer (``body``: the
    ``wire.to_arrays`` form with ``ShmArray`` leaves), from a process on ``node``; the
    reply's arrays go to the buffer ``reply`` if they fit in its ``reply_bytes``."""

    body: Any
    node: str
    reply: Place
    reply_bytes: int


class Buffer:
    """Shared memory of ``nbytes``, mapped here: ``Buffer.create`` makes one, ``Buffer.open``
    maps one another process on this node made."""

    def __init__(self, where: Place, fd: int, nbytes: int) -> None:
        self.where, self.nbytes = where, nbytes
        self.map = mmap.mmap(fd, nbytes)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)

    @classmethod
    def create(cls, nbytes: int) -> Buffer:
        fd = os.memfd_create("memdist-shm")
        try:
            os.posix_fallocate(fd, 0, nbytes)  # an error now rather than SIGBUS at a write
            buf = cls(Place(f"/proc/{os.getpid()}/fd/{fd}", uuid.uuid4().hex), fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        weakref.finalize(buf, os.close, fd)  # the path stays valid while the buffer lives
        return buf

    @classmethod
    def open(cls, where: Place) -> Buffer:
        fd = os.open(where.path, os.O_RDWR)
        try:
            return cls(where, fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)


def arrays_nbytes(obj: Any) -> int:
    """Bytes the arrays of a ``to_arrays`` form take in a buffer, aligned."""
    total = 0

    def visit(x: Any) -> Any:
        nonlocal total
        if isinstance(x, _Array):
            total += -(-x.array.nbytes // ALIGN) * ALIGN
        elif isinstance(x, _Fields):
            for v in x.fields.values():
                visit(v)
        else:
            _each(x, visit)
        return x

    visit(obj)
    return total


def place(obj: Any, buf: Buffer) -> Any:
    """``obj`` (a ``to_arrays`` form) with its arrays copied into ``buf``, as ``ShmArray``s;
    the caller checked that they fit (``arrays_nbytes``)."""
    offset = 0

    def put(x: Any) -> Any:
        nonlocal offset
        if isinstance(x, _Array):
            a = np.ascontiguousarray(x.array)
            buf.bytes[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            out = ShmArray(buf.where, offset, a.shape, a.dtype.str, x.dtype)
            offset += -(-a.nbytes // ALIGN) * ALIGN
            return out
        if isinstance(x, _Fields):
            return _Fields(x.cls, {k: put(v) for k, v in x.fields.items()})
        return _each(x, put)

    return put(obj)


def take(obj: Any, buffer_at: Any) -> Any:
    """``obj`` with each ``ShmArray`` copied out of its buffer (``buffer_at(place)``) into
    an ``_Array`` of its own memory (the ``wire.to_arrays`` form again)."""

    def get(x: Any) -> Any:
        if isinstance(x, ShmArray):
            dt = np.dtype(x.np_dtype)
            n = int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
            raw = buffer_at(x.where).bytes[x.offset : x.offset + n]
            return _Array(raw.view(dt).reshape(x.shape).copy(), x.dtype)
        if isinstance(x, _Fields):
            return _Fields(x.cls, {k: get(v) for k, v in x.fields.items()})
        return _each(x, get)

    return get(obj)


class Channel:
    """A worker's request and reply buffers for one shard actor on its node."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.request: Buffer | None = None
        self.reply: Buffer | None = None
        self.reply_wanted = MIN_BYTES
        self.busy = False

    @staticmethod
    def _fresh(old: Buffer | None, nbytes: int) -> Buffer:
        if old is not None and old.nbytes >= nbytes:
            return old
        return Buffer.create(max(MIN_BYTES, 1 << (nbytes - 1).bit_length()))

    def send(self, arrays: Any) -> ShmRequest | None:
        """``arrays`` placed in the request buffer, or None when a request is in flight."""
        if self.busy:
            return None
        self.request = self._fresh(self.request, arrays_nbytes(arrays))
        self.reply = self._fresh(self.reply, self.reply_wanted)
        self.busy = True
        body = place(arrays, self.request)
        return ShmRequest(body, self.node, self.reply.where, self.reply.nbytes)

    def receive(self, reply: Any) -> Any:
        """The reply in ``to_arrays`` form, from the reply buffer where it was placed."""
        assert self.reply is not None
        reply_buffer = self.reply
        out = take(reply, lambda where: reply_buffer)
        self.reply_wanted = max(self.reply_wanted, arrays_nbytes(out))
        self.busy = False
        return out


def open_channels(nodes: list[str | None], own: str) -> list[Channel | None] | None:
    """Per shard, a channel when its actor runs on this process's node (``nodes[s] ==
    own``); None where shared memory cannot be had (no ``memfd_create``, a Ray client)."""
    if not hasattr(os, "memfd_create") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return None
    channels = [Channel(own) if n == own else None for n in nodes]
    return channels if any(c is not None for c in channels) else None


class Mapped:
    """A shard actor's mappings of the buffers its workers name (the newest ``keep``)."""

    def __init__(self, node: str, keep: int = 64) -> None:
        self.node, self.keep = node, keep
        self._maps: OrderedDict[str, Buffer] = OrderedDict()
        self._lock = threading.Lock()  # the actor serves requests on several threads

    def __call__(self, where: Place) -> Buffer:
        with self._lock:
            buf = self._maps.get(where.token)
            if buf is None:
                buf = Buffer.open(where)
                self._maps[where.token] = buf
                while len(self._maps) > self.keep:
                    self._maps.popitem(last=False)
            self._maps.move_to_end(where.token)
            return buf

    def request(self, req: ShmRequest) -> Any:
        """The request's ``to_arrays`` form, copied out of the sender's buffer."""
        if req.node != self.node:
            raise ShardError(
                f"a shared-memory request from node {req.node} reached a shard on node "
                f"{self.node}: its arrays are not here (the shard moved after the worker "
                "connected)"
            )
        return take(req.body, self)

    def reply(self, req: ShmRequest, arrays: Any) -> Any:
        """``arrays`` (a ``to_arrays`` reply) placed in the sender's reply buffer when
        they fit, else as they are."""
        if arrays_nbytes(arrays) > req.reply_bytes:
            return arrays
        return place(arrays, self(req.reply))
