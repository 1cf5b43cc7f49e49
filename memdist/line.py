"""A direct line between a worker and a shard actor: a socket that carries the worker's
ordered requests (lookups, backwards, hints, steps sent ahead) and their replies in
place of Ray's actor calls.

A Ray actor call and its reply took about 1.1 ms for 2 actors on the project's 2-core
machine (Ray's own threads in the worker, the raylet and the actors share the cores
with the shards' kernels); the same round trip through a socket took 35-45 us. A step
of a table through shards makes three such round trips. To a shard on the worker's
node the line is a Unix socket and the arrays of bulky requests travel through shared
memory (``memdist.shm``; the line carries their places, and small requests whole); to
a shard on another node it is a TCP connection carrying the arrays too, instead of
Ray's object store.

A Unix socket's name is in Linux's abstract namespace: no file is left, and the name
goes with the actor's process; it admits only processes of the actor's own user
(``SO_PEERCRED``). A TCP line listens on the node's address. Either way a caller must
first send the token the actor handed out through Ray (16 random bytes, compared in
constant time); a TCP line's token crosses the cluster's network as Ray's own traffic
does, unencrypted. Each connection has a reader thread, so a worker's sends never wait
for the shard to finish an earlier request, and a server thread that answers the
requests in the order sent; each reply carries its request's sequence number. Both
threads yield their cores to the worker when it wants them (``yield_to_workers``).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import pickle
import queue
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memdist.errors import ShardError

HEADER = struct.Struct("<QI")  # the pickle's length, and how many buffers follow it
SIZE = struct.Struct("<Q")  # a buffer's length
TOKEN_BYTES = 16
HELLO_S = 10.0  # how long a new connection may take to send its token
PEERCRED = struct.Struct("3i")  # pid, uid, gid
LAST_LOOK_S = 1e-3
MAX_PARTS = 512  # of one sendmsg (the system's limit is at least 1024)


def send_message(sock: socket.socket, obj: Any) -> None:
    """``obj`` pickled, with the bytes of its arrays sent as they are (pickle protocol 5's
    out-of-band buffers): no copy of an array into the pickle, nor of the pickle into a
    framed message."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = HEADER.pack(len(data), len(raws)) + b"".join(SIZE.pack(r.nbytes) for r in raws)
    parts = [memoryview(head), memoryview(data), *raws]
    first = 0  # the first part not wholly sent
    while first < len(parts):
        sent = sock.sendmsg(parts[first : first + MAX_PARTS])
        while first < len(parts) and sent >= parts[first].nbytes:
            sent -= parts[first].nbytes
            first += 1
        if sent:
            parts[first] = parts[first][sent:]


def _read_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes, or None when the peer closed before the first of them."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"the line closed {got} bytes into a {n}-byte message")
        got += k
    return buf


def receive_message(sock: socket.socket) -> Any:
    """The next message, or None when the peer closed the line between messages. Its
    arrays keep the memory they were received into."""
    head = _read_exact(sock, HEADER.size)
    if head is None:
        return None
    length, count = HEADER.unpack(head)
    sizes = [length, *(n for (n,) in SIZE.iter_unpack(_read_rest(sock, SIZE.size * count)))]
    got = [_read_rest(sock, n) for n in sizes]
    return pickle.loads(got[0], buffers=got[1:])


def _read_rest(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes more of a message begun."""
    if (buf := _read_exact(sock, n)) is None:
        raise ConnectionError(f"the line closed in a message, before {n} bytes of it")
    return buf


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a ``ShardError`` saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return ShardError(f"{type(exc).__name__}: {exc}")


def yield_to_workers() -> None:
    """Run this thread under ``SCHED_BATCH``: woken by a worker's request, it waits for a
    free core instead of taking the worker's (Linux's wake-up preemption). A line's
    shard shares its node, and so often its cores, with the worker: with 2 row shards on
    2 cores the worker was preempted right after its first shard's request, and the
    second shard began its lookup 2.1-4.0 ms after the first in 5 of 6 steps (0.16 ms or
    less with this). The worker, woken by a reply, still preempts a shard."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the default policy
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


Address = str | tuple[str, int]  # a Unix socket's name, or a TCP line's (host, port)


def _no_delay(sock: socket.socket) -> None:
    """A TCP socket sends each message at once (no Nagle wait for a reply's ack)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _give_up_after(sock: socket.socket, seconds: float) -> None:
    """A send that the peer takes nothing of for ``seconds`` fails (``SO_SNDTIMEO``,
    which leaves reads blocking); on TCP, so does a connection whose peer acknowledged
    nothing sent for that long (``TCP_USER_TIMEOUT``), and an idle one is probed
    (keepalive), so a reader learns of a peer whose node vanished without closing it."""
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDTIMEO,
        struct.pack("ll", whole, int((seconds - whole) * 1e6)),
    )  # fmt: skip
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the system's defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
        probe_s = max(1, int(seconds / 4))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


class Listener:
    """A shard actor's end: accepts lines and answers each one's requests with
    ``serve(body, worker, seq)`` in the order they came. On a Unix socket, or on TCP at
    ``host`` (any free port) when one is given. A reply the worker takes nothing of for
    ``send_timeout_s`` (a worker hung, or its node cut off) ends the line: its later
    requests are still served, their replies dropped, so the shard's turns go on."""

    def __init__(
        self, serve: Callable[[Any, int, int], Any], host: str | None = None,
        send_timeout_s: float = 60.0,
    ) -> None:  # fmt: skip
        self.serve, self.send_timeout_s = serve, send_timeout_s
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.address: Address
        if host is None:
            self.address = f"\0memdist-line-{os.getpid()}-{uuid.uuid4().hex}"
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(self.address)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, 0), family=family)
            self.address = (host, self._sock.getsockname()[1])
        self._sock.listen()
        threading.Thread(target=self._accept, name="memdist-line", daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self._sock.accept()
            _no_delay(conn)
            threading.Thread(target=self._connected, args=(conn,), daemon=True).start()

    def _admitted(self, conn: socket.socket) -> bool:
        if conn.family == socket.AF_UNIX:
            _, uid, _ = PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
            )
            if uid != os.getuid():
                return False
        conn.settimeout(HELLO_S)
        try:
            hello = _read_exact(conn, TOKEN_BYTES)
        except OSError:
            return False
        conn.settimeout(None)
        return hello is not None and hmac.compare_digest(hello, self.token)

    def _connected(self, conn: socket.socket) -> None:
        yield_to_workers()
        with conn:
            if not self._admitted(conn):
                return
            _give_up_after(conn, self.send_timeout_s)
            todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
            server = threading.Thread(target=self._answer, args=(conn, todo), daemon=True)
            server.start()
            try:
                while (msg := receive_message(conn)) is not None:
                    todo.put(msg)
            except (OSError, pickle.UnpicklingError, EOFError):
                pass  # the worker went away; what it sent before is still answered
            finally:
                todo.put(None)
                server.join()

    def _answer(self, conn: socket.socket, todo: queue.SimpleQueue[Any]) -> None:
        """Every request received is served, even after the worker left: the shard's
        turns (sequence numbers) must go on for its later requests sent through Ray."""
        yield_to_workers()
        alive = True
        while (msg := todo.get()) is not None:
            worker, seq, body = msg
            try:
                out = (seq, True, self.serve(body, worker, seq))
            except Exception as exc:  # the worker raises it, naming the shard
                out = (seq, False, _sendable(exc))
            if alive:
                try:
                    send_message(conn, out)
                except OSError:  # a reply half sent: the worker must not read on
                    alive = False
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request sent on ``line`` as its ``seq``-th; ``Line.receive`` gives its reply."""

    line: Line
    seq: int


def _connect(address: Address, timeout_s: float) -> socket.socket:
    if not isinstance(address, str):
        sock = socket.create_connection(address, timeout=timeout_s)
        _no_delay(sock)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Line:
    """A worker's end of the line to one shard actor, at a ``Listener``'s address."""

    def __init__(self, address: Address, token: bytes, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._sock = _connect(address, timeout_s)
        try:
            self._sock.sendall(token)
        except BaseException:
            self._sock.close()
            raise
        self._replies: dict[int, tuple[bool, Any]] = {}

    def send(self, worker: int, seq: int, body: Any) -> Ticket:
        """Sends request ``seq``; ``TimeoutError`` when the shard took none of it for
        ``timeout_s`` (its reader drains the socket while it lives: a node cut off from
        this one, whose TCP would otherwise retry for many minutes)."""
        self._sock.settimeout(self.timeout_s)
        send_message(self._sock, (worker, seq, body))
        return Ticket(self, seq)

    def receive(self, seq: int, deadline: float) -> tuple[bool, Any]:
        """(True, reply) or (False, the shard's exception) of request ``seq``, reading
        until it comes; ``TimeoutError`` at ``deadline`` (``time.monotonic``),
        ``ConnectionError`` when the shard's end closed."""
        while seq not in self._replies:
            # Past the deadline (spent waiting on other shards) a reply already here is
            # still read.
            self._sock.settimeout(max(deadline - time.monotonic(), LAST_LOOK_S))
            msg = receive_message(self._sock)
            if msg is None:
                raise ConnectionError("the shard closed the line")
            self._replies[msg[0]] = (msg[1], msg[2])
        return self._replies.pop(seq)

    def close(self) -> None:
        self._sock.close()
