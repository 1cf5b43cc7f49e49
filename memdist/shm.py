"""Shared memory between a worker and the shard actors on its node, for the per-step
bulky messages (lookups, backwards, and their replies).

Through Ray's object store every array over 100 KB costs about 1.5-2.5 ms a hop on the
project's 2-core machine, whatever its size (a 0.05 MB round trip to two actors took
1.3 ms, 0.25 MB 2.9 ms, 1 MB 3.2 ms): a lookup and a backward of ``small`` spent more
time there than in the shards' kernels. Instead the worker keeps, per shard actor on
its node, a request and a reply buffer: files in ``/dev/shm`` it creates (space
reserved with ``posix_fallocate``, so a full tmpfs is an error, never a SIGBUS), reuses
and grows. A request's arrays are copied into the request buffer and only their
places (``ShmArray``) travel through Ray, with the reply buffer's path; the actor
copies them out, answers, and writes its reply's arrays into the reply buffer when
they fit (else they travel through Ray, and the worker grows the buffer).

One bulky request per shard is in flight through the buffers at a time; another goes
through Ray's object store, as does everything after a buffer could not be made (a
full ``/dev/shm``) or a reply did not come (the actor may still write it). Buffers live
until the transport is collected (the files are removed then, or at exit).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memdist.errors import ShardError
from memdist.wire import _Array, _each, _Fields

SHM_DIR = "/dev/shm"
ALIGN = 64
MIN_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ShmArray:
    """An array's place in a buffer: ``nbytes`` at ``offset`` of the file ``path``."""

    path: str
    offset: int
    shape: tuple[int, ...]
    np_dtype: str
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class ShmRequest:
    """A request whose arrays are in the sender's request buffer (``body``: the
    ``wire.to_arrays`` form with ``ShmArray`` leaves), from a process on ``node``; the
    reply's arrays go to ``reply_path`` if they fit in its ``reply_bytes``."""

    body: Any
    node: str
    reply_path: str
    reply_bytes: int


class Buffer:
    """A file of ``nbytes`` in shared memory, mapped here."""

    def __init__(self, path: str, nbytes: int, *, create: bool) -> None:
        self.path, self.nbytes = path, nbytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now rather than SIGBUS later
            self.map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)


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
            out = ShmArray(buf.path, offset, a.shape, a.dtype.str, x.dtype)
            offset += -(-a.nbytes // ALIGN) * ALIGN
            return out
        if isinstance(x, _Fields):
            return _Fields(x.cls, {k: put(v) for k, v in x.fields.items()})
        return _each(x, put)

    return put(obj)


def take(obj: Any, buffer_at: Any) -> Any:
    """``obj`` with each ``ShmArray`` copied out of its buffer (``buffer_at(path)``) into
    an ``_Array`` of its own memory (the ``wire.to_arrays`` form again)."""

    def get(x: Any) -> Any:
        if isinstance(x, ShmArray):
            dt = np.dtype(x.np_dtype)
            n = int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
            raw = buffer_at(x.path).bytes[x.offset : x.offset + n]
            return _Array(raw.view(dt).reshape(x.shape).copy(), x.dtype)
        if isinstance(x, _Fields):
            return _Fields(x.cls, {k: get(v) for k, v in x.fields.items()})
        return _each(x, get)

    return get(obj)


class Channel:
    """A worker's request and reply buffers for one shard actor on its node."""

    def __init__(self, folder: str, node: str) -> None:
        self.folder, self.node = folder, node
        self.request: Buffer | None = None
        self.reply: Buffer | None = None
        self.reply_wanted = MIN_BYTES
        self.busy = False

    def _fresh(self, old: Buffer | None, nbytes: int) -> Buffer:
        if old is not None and old.nbytes >= nbytes:
            return old
        if old is not None:
            os.unlink(old.path)  # the actor's mapping, if any, keeps its pages until it drops it
        size = max(MIN_BYTES, 1 << (nbytes - 1).bit_length())
        return Buffer(os.path.join(self.folder, uuid.uuid4().hex), size, create=True)

    def send(self, arrays: Any) -> ShmRequest | None:
        """``arrays`` placed in the request buffer, or None when a request is in flight."""
        if self.busy:
            return None
        self.request = self._fresh(self.request, arrays_nbytes(arrays))
        self.reply = self._fresh(self.reply, self.reply_wanted)
        self.busy = True
        body = place(arrays, self.request)
        return ShmRequest(body, self.node, self.reply.path, self.reply.nbytes)

    def receive(self, reply: Any) -> Any:
        """The reply in ``to_arrays`` form, from the reply buffer where it was placed."""
        assert self.reply is not None
        reply_buffer = self.reply
        out = take(reply, lambda path: reply_buffer)
        self.reply_wanted = max(self.reply_wanted, arrays_nbytes(out))
        self.busy = False
        return out


class Channels:
    """The channels of one transport: per shard, one when the actor is on this node."""

    def __init__(self, nodes: list[str | None], own_node: str) -> None:
        self.folder = tempfile.mkdtemp(prefix="memdist-", dir=SHM_DIR)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.by_shard = [Channel(self.folder, own_node) if n == own_node else None for n in nodes]


def open_channels(actors: list[Any], timeout_s: float) -> Channels | None:
    """Channels to the actors on this process's node; None where shared memory is not
    there (no ``/dev/shm``, a Ray client, an actor that does not answer)."""
    import ray

    if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
        return None
    try:
        own = ray.get_runtime_context().get_node_id()
        nodes = [w.get("node") for w in ray.get([a.where.remote() for a in actors],
                                                timeout=timeout_s)]  # fmt: skip
        channels = Channels(nodes, own)
    except Exception:  # any failure here leaves the object store path, which reports it
        return None
    return channels if any(c is not None for c in channels.by_shard) else None


class Mapped:
    """A shard actor's mappings of the buffers its workers name (the few newest)."""

    def __init__(self, node: str, keep: int = 64) -> None:
        self.node, self.keep = node, keep
        self._maps: OrderedDict[str, Buffer] = OrderedDict()

    def __call__(self, path: str) -> Buffer:
        buf = self._maps.get(path)
        if buf is None:
            buf = Buffer(path, os.stat(path).st_size, create=False)
            self._maps[path] = buf
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)
        self._maps.move_to_end(path)
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
        return place(arrays, self(req.reply_path))
