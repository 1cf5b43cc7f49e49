"""Shared memory between a worker and the Ray shard actors on its node (``memdist.shm``):
the bulky requests and replies travel through memfd buffers, with the same bits as
through Ray's object store, and every case the buffers cannot take falls back to it."""

import os
import re
import time

import pytest
import ray
import torch

from memdist import line, shm, wire
from memdist import transport as transport_module
from memdist.cluster.actors import ShardActor, _ShardActor, start_shards, stop_shards
from memdist.cluster.plan import make_plan
from memdist.errors import ShardError, ShardTimeoutError, SlowPathWarning
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable
from memdist.transport import RayTransport
from memdist.values import LocalTable

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create")


def test_arrays_placed_in_a_buffer_come_back_equal():
    g = torch.Generator().manual_seed(0)
    idx = wire.PackedIndices.pack(torch.randint(0, 50, (6, 4), generator=g))
    dy = torch.randn(6, 8, generator=g)
    req = wire.Backward(idx, torch.rand(6, 4, generator=g).to(torch.bfloat16), dy[:, 2:5], 3)
    arrays = wire.to_arrays(req)
    buf = shm.Buffer.create(shm.arrays_nbytes(arrays))
    placed = shm.place(arrays, buf)
    assert not any(isinstance(v, wire._Array) for v in placed.fields.values())
    seen = shm.Buffer.open(buf.where)  # as an actor on this node maps it
    back = wire.from_arrays(shm.take(placed, lambda where: seen))
    buf.bytes[:] = 0xFF  # what was taken out is a copy: the buffer's next use changes nothing
    assert type(back) is wire.Backward and back.worker == 3
    assert torch.equal(back.idx.unpack(), idx.unpack())
    assert back.scores_NK.dtype == torch.bfloat16 and torch.equal(back.scores_NK, req.scores_NK)
    assert torch.equal(back.dy, dy[:, 2:5])


@pytest.fixture
def ray_table(ray_local):
    """A 2-shard column table over Ray actors on this node, and its twin local table."""
    started = []

    def build(rows=64, dim=8, shared_memory=True, direct_lines=True):
        plan = make_plan("column", rows, dim, 2)
        actors = start_shards(plan, OptimizerSpec(), seed=0)
        started.append(actors)
        transport = RayTransport(actors, timeout_s=60, shared_memory=shared_memory,
                                 direct_lines=direct_lines)  # fmt: skip
        return RemoteTable(plan, transport, OptimizerSpec()), LocalTable(rows, dim, seed=0)

    yield build
    for actors in started:
        stop_shards(actors)


def step_both(remote, local, idx, scores, dy):
    outs = []
    for table in (remote, local):
        s = scores.clone().requires_grad_(True)
        y = table.lookup(idx, s)
        y.backward(dy)
        table.step()
        outs.append((y.detach(), s.grad))
    return outs


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("direct_lines", [True, False])
def test_lookups_backwards_and_steps_through_shared_memory_equal_a_local_table(
    ray_table, shared_memory, direct_lines
):
    remote, local = ray_table(shared_memory=shared_memory, direct_lines=direct_lines)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx, scores = torch.randint(0, 64, (32, 4), generator=g), torch.rand(32, 4, generator=g)
        (y_r, ds_r), (y_l, ds_l) = step_both(
            remote, local, idx, scores, torch.randn(32, 8, generator=g)
        )
        assert torch.equal(y_r, y_l)  # each column's sum is the local one
        torch.testing.assert_close(ds_r, ds_l, rtol=1e-6, atol=1e-6)  # two partial dots vs one
    torch.testing.assert_close(
        remote.read_rows(0, 64)["weight"], local.read_rows(0, 64)["weight"], rtol=1e-6, atol=1e-7
    )
    lines = [remote.transport.line(s) for s in range(2)]
    if direct_lines:
        assert all(isinstance(ln.address, str) for ln in lines)  # Unix sockets: this node
    else:
        assert lines == [None, None]
    channels = [remote.transport.channel(s) for s in range(2)]
    if not shared_memory:
        assert channels == [None, None]
        return
    assert all(c is not None and c.request is not None and not c.busy for c in channels)
    assert all(os.path.exists(c.request.where.path) for c in channels)


def test_ordered_requests_go_on_the_lines_and_the_others_through_ray(ray_table):
    remote, local = ray_table()
    g = torch.Generator().manual_seed(5)
    idx, scores = torch.randint(0, 64, (16, 4), generator=g), torch.rand(16, 4, generator=g)
    s = scores.clone().requires_grad_(True)
    pending = remote.lookup_async(idx, s)
    assert all(isinstance(h[1], line.Ticket) and h[2] is not None for h in pending.handles)
    y = pending.wait()
    y.backward(torch.ones_like(y))
    remote.step()
    transport = remote.transport
    stats = transport.submit_all([wire.Stats()] * 2)  # not ordered: a Ray call
    assert not any(isinstance(h[1], line.Ticket) for h in stats)
    assert [st["lookups"] for st in transport.wait(stats, "stats")] == [1, 1]
    s_l = scores.clone().requires_grad_(True)
    y_l = local.lookup(idx, s_l)
    y_l.backward(torch.ones_like(y_l))
    local.step()
    assert torch.equal(y.detach(), y_l.detach())
    assert torch.equal(remote.read_rows(0, 64)["weight"], local.read_rows(0, 64)["weight"])


def test_shards_whose_lines_cannot_be_reached_are_served_through_ray_calls(ray_table, monkeypatch):
    def refused(address, token, timeout_s):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(transport_module, "Line", refused)
    remote, local = ray_table()
    with pytest.warns(SlowPathWarning) as said:
        remote.transport.line(0)  # opened at the first use: each shard unreachable, said
    for s, w in enumerate(said):  # where and why
        assert re.match(
            rf"memory shard {s} at .*: no direct line \(ConnectionRefused", str(w.message)
        )
    assert len(said) == 2
    g = torch.Generator().manual_seed(6)
    for _ in range(2):
        idx, scores = torch.randint(0, 64, (16, 4), generator=g), torch.rand(16, 4, generator=g)
        (y_r, ds_r), (y_l, ds_l) = step_both(
            remote, local, idx, scores, torch.randn(16, 8, generator=g)
        )
        assert torch.equal(y_r, y_l)
        torch.testing.assert_close(ds_r, ds_l, rtol=1e-6, atol=1e-6)
    channels = [remote.transport.channel(s) for s in range(2)]
    assert all(c is not None and c.request is not None for c in channels)
    assert [remote.transport.line(s) for s in range(2)] == [None, None]


class _SilentOnItsLine(_ShardActor):
    """A real shard actor whose requests on its line never end in time."""

    def _in_turn(self, req, worker, seq):
        time.sleep(30)


def test_a_shard_silent_on_its_line_times_out_and_is_named(ray_local):
    plan = make_plan("column", 64, 8, 2)
    silent = ray.remote(concurrency_groups={"rows": 4}, max_concurrency=4)(_SilentOnItsLine)
    actors = [ShardActor.remote(plan.regions[0], "column", 8, OptimizerSpec(), seed=0),
              silent.remote(plan.regions[1], "column", 8, OptimizerSpec(), seed=0)]  # fmt: skip
    ray.get([a.ping.remote() for a in actors])  # both up; only requests on the line hang
    remote = RemoteTable(plan, RayTransport(actors, timeout_s=2), OptimizerSpec())
    assert all(remote.transport.line(s) is not None for s in range(2))
    t0 = time.monotonic()
    with pytest.raises(ShardTimeoutError, match="memory shard 1 did not answer lookup within 2 s"):
        remote.lookup(torch.randint(0, 64, (4, 3)), torch.rand(4, 3))
    assert time.monotonic() - t0 < 10
    assert remote.transport.channel(0) is not None and remote.transport.channel(1) is None
    assert remote.transport.line(0) is not None and remote.transport.line(1) is None
    stop_shards(actors)


def test_a_reply_larger_than_its_buffer_travels_through_ray_and_the_buffer_grows(ray_table):
    remote, local = ray_table(rows=64, dim=512)  # 256 fp32 columns a shard
    g = torch.Generator().manual_seed(2)
    idx, scores = torch.randint(0, 64, (1024, 4), generator=g), torch.rand(1024, 4, generator=g)
    channel = remote.transport.channel(0)
    first = remote.lookup(idx, scores)
    assert channel.reply.nbytes == shm.MIN_BYTES  # 1 MB held the 1 MB reply
    big_idx = torch.randint(0, 64, (4096, 4), generator=g)
    big_scores = torch.rand(4096, 4, generator=g)
    big = remote.lookup(big_idx, big_scores)  # 4 MB a shard: through Ray, and noted
    assert channel.reply_wanted == 4096 * 256 * 4
    again = remote.lookup(big_idx, big_scores)  # now through a 4 MB buffer
    assert channel.reply.nbytes >= 4096 * 256 * 4
    assert torch.equal(first, local.lookup(idx, scores))
    assert torch.equal(big, local.lookup(big_idx, big_scores)) and torch.equal(again, big)


def test_a_second_request_in_flight_and_one_after_a_failure_go_through_ray(ray_table):
    remote, local = ray_table()
    g = torch.Generator().manual_seed(3)
    idx, scores = torch.randint(0, 64, (16, 4), generator=g), torch.rand(16, 4, generator=g)
    with torch.no_grad():
        a, b = remote.lookup_async(idx, scores), remote.lookup_async(idx, scores * 2)
        assert [h[2] is not None for h in a.handles] == [True, True]  # the buffers
        assert [h[2] for h in b.handles] == [None, None]  # busy: the object store
        assert torch.equal(b.wait(), local.lookup(idx, scores * 2))
        assert torch.equal(a.wait(), local.lookup(idx, scores))
    transport = remote.transport
    with pytest.raises(ShardError, match="lookup 99 of worker 0 is not kept"):
        transport.wait([transport.submit(0, wire.KeptBackward(99, torch.randn(16, 4)))], "t")
    assert transport.channel(0) is None and transport.channel(1) is not None
    with torch.no_grad():
        assert torch.equal(remote.lookup(idx, scores), local.lookup(idx, scores))


def test_a_buffer_without_memory_leaves_the_object_store_path(ray_table, monkeypatch):
    """A buffer that cannot get its memory is not an error: the request, and all later
    ones to that shard, go through Ray."""
    import errno

    remote, local = ray_table()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    g = torch.Generator().manual_seed(4)
    idx, scores = torch.randint(0, 64, (16, 4), generator=g), torch.rand(16, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(remote.lookup(idx, scores), local.lookup(idx, scores))
    assert [remote.transport.channel(s) for s in range(2)] == [None, None]
