"""The direct line between a worker and a shard actor (``memdist.line``), on a Unix
socket and on TCP: requests answered in order with their sequence numbers, the shard's
errors carried back, and callers without the token turned away."""

import os
import socket
import threading
import time

import pytest
import torch

from memdist import line
from memdist.errors import IndexOutOfRangeError, ShardError


@pytest.fixture(params=["unix", "tcp"])
def listen(request):
    """A Listener on a Unix socket (a shard on the worker's node) or on TCP at loopback
    (a shard on another node)."""
    host = None if request.param == "unix" else "127.0.0.1"
    return lambda serve: line.Listener(serve, host)


def doubled(body, worker, seq):
    if isinstance(body, str):
        raise IndexOutOfRangeError(f"row {body} of worker {worker} is not in this region")
    if body is None:
        raise RuntimeError(threading.Lock())  # an exception pickle cannot carry
    return (worker, body * 2)


def test_requests_are_answered_in_order_and_replies_found_by_their_number(listen):
    listener = listen(doubled)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MB: more than a socket buffers
    tickets = [ln.send(3, seq, big + seq) for seq in range(5)]
    deadline = time.monotonic() + 30
    for t in reversed(tickets):  # collected in another order than sent
        ok, (worker, out) = ln.receive(t.seq, deadline)
        assert ok and worker == 3 and torch.equal(out, (big + t.seq) * 2)
    ln.close()


def test_arrays_of_any_layout_and_number_arrive_whole(listen):
    """Arrays travel beside the pickle (out-of-band buffers), more of them than one
    ``sendmsg`` takes; a view that is not contiguous goes inside the pickle."""
    import numpy as np

    listener = listen(lambda body, worker, seq: body)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    rng = np.random.default_rng(0)
    many = [rng.random(k % 7) for k in range(line.MAX_PARTS + 100)]  # some empty
    odd = {"strided": rng.random((64, 64))[::3, 1::2], "fortran": np.asfortranarray(rng.random((5, 9))),
           "int16": rng.integers(-5, 5, 4097, dtype=np.int16), "scalar": np.float32(2.5)}  # fmt: skip
    ok, (back_many, back_odd) = ln.receive(ln.send(0, 0, (many, odd)).seq, time.monotonic() + 30)
    assert ok and len(back_many) == len(many)
    assert all(np.array_equal(a, b) for a, b in zip(many, back_many, strict=True))
    assert odd.keys() == back_odd.keys()
    for key, value in odd.items():
        assert np.array_equal(value, back_odd[key]) and value.dtype == back_odd[key].dtype
    assert back_odd["fortran"].flags.f_contiguous
    ln.close()


def test_a_shards_errors_come_back_on_the_line(listen):
    listener = listen(doubled)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    deadline = time.monotonic() + 30
    ok, exc = ln.receive(ln.send(1, 0, "77").seq, deadline)
    assert not ok and isinstance(exc, IndexOutOfRangeError) and "row 77 of worker 1" in str(exc)
    ok, exc = ln.receive(ln.send(1, 1, None).seq, deadline)
    assert not ok and isinstance(exc, ShardError) and str(exc).startswith("RuntimeError: ")
    assert ln.receive(ln.send(1, 2, 21).seq, deadline) == (True, (1, 42))  # still serving


def test_a_caller_without_the_token_is_turned_away_and_others_still_served(listen):
    listener = listen(doubled)
    stranger = line.Line(listener.address, b"x" * line.TOKEN_BYTES, timeout_s=10)
    stranger.send(0, 0, 1)
    with pytest.raises(ConnectionError):
        stranger.receive(0, time.monotonic() + 10)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    assert ln.receive(ln.send(0, 0, 1).seq, time.monotonic() + 10) == (True, (0, 2))


def test_a_reply_that_does_not_come_times_out_at_the_deadline(listen):
    def slow(body, worker, seq):
        time.sleep(body)
        return body

    listener = listen(slow)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ln.receive(ln.send(0, 0, 3.0).seq, t0 + 0.5)
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_send_to_a_shard_that_reads_nothing_times_out(kind):
    """A shard cut off from the worker (a node unreachable, not a closed connection)
    fails the send at the line's timeout instead of leaving the worker blocked in it."""
    if kind == "unix":
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.bind(address := f"\0memdist-test-deaf-{os.getpid()}")
    else:
        deaf = socket.create_server(("127.0.0.1", 0))
        address = deaf.getsockname()
    deaf.listen()
    held = []
    threading.Thread(target=lambda: held.append(deaf.accept()), daemon=True).start()
    ln = line.Line(address, b"t" * line.TOKEN_BYTES, timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ln.send(0, 0, bytes(64 << 20))  # more than both ends' socket buffers hold
    assert time.monotonic() - t0 < 10
    ln.close()
    deaf.close()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_reply_the_worker_never_reads_ends_the_line_and_the_shards_turns_go_on(kind):
    """A worker that takes none of a reply (hung, or its node cut off) does not hold the
    shard's server thread: the send gives up at ``send_timeout_s``, the line is closed,
    and the requests already received are still served."""
    served = []

    def big(body, worker, seq):
        served.append(seq)
        return torch.zeros(16 << 20)  # 64 MB: more than both ends' socket buffers hold

    listener = line.Listener(big, None if kind == "unix" else "127.0.0.1", send_timeout_s=1.0)
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    t0 = time.monotonic()
    for seq in range(3):
        ln.send(0, seq, None)
    while len(served) < 3 and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    assert served == [0, 1, 2]
    assert 0.9 < time.monotonic() - t0 < 10  # one send waited its timeout, no more
    with pytest.raises(ConnectionError):  # the half-sent reply is cut off, not completed
        ln.receive(0, time.monotonic() + 10)
    ln.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_a_line_is_served_by_threads_that_yield_their_core_to_the_worker(listen):
    listener = listen(lambda body, worker, seq: os.sched_getscheduler(0))
    ln = line.Line(listener.address, listener.token, timeout_s=10)
    assert ln.receive(ln.send(0, 0, None).seq, time.monotonic() + 10) == (True, os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is untouched
