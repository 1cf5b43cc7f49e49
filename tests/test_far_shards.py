"""Shard actors on another node than the worker: a real two-node Ray cluster on this
machine (``ray.cluster_utils.Cluster``, one raylet per node), the shards placed on the
node that offers ``memdist_shard`` as ``start_shards`` places them. Their ordered
requests go on TCP lines (``memdist.line``) with the arrays inline, no shared memory;
the results equal the local table's, and a shard's failure is named and later
requests go through Ray."""

import time

import pytest
import ray
import torch

from memdist.cluster.actors import SHARD_RESOURCE, start_shards, stop_shards
from memdist.cluster.plan import make_plan
from memdist.errors import ShardError
from memdist.kernels import OptimizerSpec
from memdist.line import Ticket
from memdist.remote import RemoteTable
from memdist.transport import RayTransport
from memdist.values import LocalTable
from memdist.wire import KeptBackward

ADAM = OptimizerSpec("adam", lr=1e-2)


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    # A memory node of 4 CPUs that takes 2 shards: each gets 2 threads (``node_threads``).
    far = cluster.add_node(num_cpus=4, resources={SHARD_RESOURCE: 2})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    yield far.node_id
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def far_table(two_nodes):
    started = []

    def build(kind, direct_lines=True, rows=256, dim=16):
        plan = make_plan(kind, rows, dim, 2)
        actors = start_shards(plan, ADAM, seed=0)
        started.append(actors)
        where = ray.get([a.where.remote() for a in actors])
        assert [w["node"] for w in where] == [two_nodes, two_nodes]  # not the worker's node
        assert [w["threads"] for w in where] == [2, 2]  # the node's CPUs, shared
        transport = RayTransport(actors, timeout_s=60, direct_lines=direct_lines)
        return RemoteTable(plan, transport, ADAM), LocalTable(rows, dim, ADAM, seed=0)

    yield build
    for actors in started:
        stop_shards(actors)


@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("direct_lines", [True, False])
def test_far_shards_train_as_the_local_table_does(far_table, kind, direct_lines):
    remote, local = far_table(kind, direct_lines)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        idx = torch.randint(0, 256, (64, 8), generator=g)
        scores, dy = torch.rand(64, 8, generator=g), torch.randn(64, 16, generator=g)
        outs = []
        for table in (remote, local):
            s = scores.clone().requires_grad_(True)
            pending = table.lookup_async(idx, s)
            if table is remote:  # on the TCP lines, or Ray's calls when they are off
                assert all(isinstance(h[1], Ticket) == direct_lines for h in pending.handles)
            y = pending.wait()
            table.expect_step()
            y.backward(dy)
            table.step_async().wait()
            outs.append((y.detach(), s.grad))
        (y_r, ds_r), (y_l, ds_l) = outs
        torch.testing.assert_close(y_r, y_l, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ds_r, ds_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        remote.read_rows(0, 256)["weight"], local.read_rows(0, 256)["weight"], rtol=1e-6, atol=1e-6
    )
    transport = remote.transport
    assert [transport.channel(s) for s in range(2)] == [None, None]  # no shared memory
    lines = [transport.line(s) for s in range(2)]
    if direct_lines:
        assert all(isinstance(ln.address, tuple) for ln in lines)  # TCP: (host, port)
    else:
        assert lines == [None, None]


def test_a_far_shards_error_is_named_and_its_later_requests_go_through_ray(far_table):
    remote, local = far_table("row")
    transport = remote.transport
    with pytest.raises(ShardError, match="memory shard 1 failed during t: .*lookup 99 of worker 0"):
        transport.wait([transport.submit(1, KeptBackward(99, torch.randn(4, 16)))], "t")
    assert transport.line(0) is not None and transport.line(1) is None
    g = torch.Generator().manual_seed(8)
    idx, scores = torch.randint(0, 256, (32, 4), generator=g), torch.rand(32, 4, generator=g)
    with torch.no_grad():
        pending = remote.lookup_async(idx, scores)
        assert [isinstance(h[1], Ticket) for h in pending.handles] == [True, False]
        torch.testing.assert_close(pending.wait(), local.lookup(idx, scores), rtol=1e-6, atol=1e-6)


def test_a_killed_far_shard_is_named_within_seconds(far_table):
    remote, _ = far_table("row")
    idx, scores = torch.randint(0, 256, (4, 3)), torch.rand(4, 3)
    remote.lookup(idx, scores)
    assert isinstance(remote.transport.line(1).address, tuple)
    ray.kill(remote.transport.actors[1])
    t0 = time.monotonic()
    with pytest.raises(ShardError, match="memory shard 1 died during lookup"):
        while time.monotonic() - t0 < 30:  # the dying process may answer for a moment
            remote.lookup(idx, scores)
            time.sleep(0.01)
    assert time.monotonic() - t0 < 30


def test_a_shard_takes_the_threads_it_is_given_or_reserves(two_nodes):
    """Set threads win over the memory node's share; a shard reserving CPUs
    (``cpus_per_shard``) gets as many threads."""
    plan = make_plan("row", 64, 8, 1)
    for kwargs, threads in (({"threads": 3}, 3), ({"cpus_per_shard": 1}, 1)):
        actors = start_shards(plan, ADAM, seed=0, **kwargs)
        try:
            (where,) = ray.get([a.where.remote() for a in actors])
            assert (where["node"], where["threads"]) == (two_nodes, threads), kwargs
        finally:
            stop_shards(actors)
