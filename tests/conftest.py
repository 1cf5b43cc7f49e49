"""Test-wide environment: Triton's interpreter and DeepSpeed's CPU accelerator when no GPU.

Both must be set before triton or deepspeed is first imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_sessionstart(session):
    """Build the C++ extensions (memdist's kernels, DeepSpeed's CPU comm op) once, here,
    rather than in whichever test's processes first need them: there every process waits
    for the build, and a test that stops its processes could stop it midway."""
    from memdist.kernels import cpp_ops, jit_build

    cpp_ops.available()
    if not torch.cuda.is_available():
        jit_build.deepspeed_comm_op()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance for the tests of one module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()


_STORES = []  # rendezvous stores of collective groups, alive for the session


@pytest.fixture
def remote_table():
    """``remote_table(kind, shards, transport, rows, dim, seed, spec, **server_kw)`` builds a
    ``RemoteTable`` over real shard servers (in-process, Ray actors, or Ray actors reached
    over the collective transport) and returns it with its actors; they stop after the test."""
    from memdist.cluster.actors import start_shards, stop_shards
    from memdist.cluster.plan import make_plan
    from memdist.cluster.shard import ShardServer
    from memdist.collective import CollectiveTransport, Rendezvous, host_store
    from memdist.remote import RemoteTable
    from memdist.transport import InProcessTransport, RayTransport

    started = []

    def build(kind, shards, transport, rows, dim, seed, spec, *, plan=None, **kw):
        import ray

        plan = plan or make_plan(kind, rows, dim, shards)
        if transport == "inprocess":
            servers = [ShardServer(r, plan.kind, dim, spec, seed=seed, **kw) for r in plan.regions]
            return RemoteTable(plan, InProcessTransport(servers), spec), []
        actors = start_shards(plan, spec, seed=seed, **kw)
        started.append(actors)
        if transport == "ray":
            return RemoteTable(plan, RayTransport(actors, timeout_s=60), spec), actors
        _STORES.append(host_store())
        store = _STORES[-1]
        rdv = Rendezvous(store.host, store.port, f"test{len(_STORES)}", plan.shards, 1)
        ray.get([a.serve_collective.remote(rdv, s) for s, a in enumerate(actors)])
        return RemoteTable(plan, CollectiveTransport(actors, rdv, 0, timeout_s=60), spec), actors

    yield build
    for actors in started:
        stop_shards(actors)
