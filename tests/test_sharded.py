"""Value tables in shard servers against a local table, over every transport.

The in-process transport calls shard servers directly; the Ray transport runs them
as actors on a real local Ray instance; the collective transport reaches the same
actors over a gloo process group of its own. Every plan, shard count and transport
must give the same lookups, gradients, updates and training losses as a local table.
"""

import math
import time

import pytest
import ray
import torch

from memdist.assembly import build_model, make_engine, resolve_runtime, unique_tables
from memdist.cluster.actors import ShardActor, start_shards, stop_shards
from memdist.cluster.plan import make_plan
from memdist.cluster.shard import ShardServer
from memdist.collective import CollectiveTransport, Rendezvous, host_store
from memdist.config import load_config
from memdist.errors import ConfigError, ShardError
from memdist.remote import RemoteTable
from memdist.shards import start_remote_tables
from memdist.step import train_step
from memdist.train import prefetch_hint
from memdist.transport import InProcessTransport, RayTransport
from memdist.values import LocalTable


@pytest.fixture(scope="module")
def ray_local():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


STORES = []  # rendezvous stores of collective groups, alive for the session
TRANSPORTS = ["inprocess", "ray", "collective"]


def remote_table(kind, shards, transport, rows, dim, seed, **kw):
    plan = make_plan(kind, rows, dim, shards)
    if transport == "inprocess":
        servers = [ShardServer(r, kind, dim, seed=seed, **kw) for r in plan.regions]
        return RemoteTable(plan, InProcessTransport(servers)), []
    actors = start_shards(plan, seed=seed, **kw)
    if transport == "ray":
        return RemoteTable(plan, RayTransport(actors, timeout_s=60)), actors
    STORES.append(host_store())
    rdv = Rendezvous(STORES[-1].host, STORES[-1].port, f"test{len(STORES)}", shards, 1)
    ray.get([a.serve_collective.remote(rdv, s) for s, a in enumerate(actors)])
    return RemoteTable(plan, CollectiveTransport(actors, rdv, 0, timeout_s=60)), actors


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_remote_table_matches_local(ray_local, transport, kind, shards):
    rows, dim, seed = 300, 20, 7
    local = LocalTable(rows, dim, optimizer="adam", lr=0.05, seed=seed)
    remote, actors = remote_table(
        kind, shards, transport, rows, dim, seed, optimizer="adam", lr=0.05
    )
    try:
        assert torch.equal(remote.values(), local.weight_VD)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            idx = torch.randint(0, rows, (12, 8), generator=g)
            idx[0] = 5  # repeated rows within a bag and across bags
            s_local = torch.rand(12, 8, generator=g).requires_grad_(True)
            s_remote = s_local.detach().clone().requires_grad_(True)
            dy = torch.randn(12, dim, generator=g)
            y_local, y_remote = local.lookup(idx, s_local), remote.lookup(idx, s_remote)
            torch.testing.assert_close(y_remote, y_local, rtol=1e-6, atol=1e-6)
            y_local.backward(dy)
            y_remote.backward(dy)
            torch.testing.assert_close(s_remote.grad, s_local.grad, rtol=1e-6, atol=1e-6)
            remote.step()
            local.step()
            assert remote.rows_touched_last_step == local.rows_touched_last_step
        torch.testing.assert_close(remote.values(), local.weight_VD, rtol=1e-6, atol=1e-6)
        state = remote.state_dict()
        for key, value in local.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
        stats = remote.stats()
        assert [s["shard"] for s in stats] == list(range(shards))
        assert all(s["lookups"] == 3 and s["bytes_in"] > 0 and s["rows_touched"] > 0 for s in stats)
    finally:
        stop_shards(actors)


def tiny(*extra):
    return load_config("small", [
        "shards.count=0", "model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.memory.layers=[1]",
        "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.k_dim=16",
        "model.memory.value_lr=0.01", "data.batch_size=4", "data.seq_len=16",
        "optim.warmup_steps=2", "train.steps=20", *extra,
    ])  # fmt: skip


def batches(cfg, n):
    g = torch.Generator().manual_seed(1)
    patterns = torch.randint(0, 256, (8, cfg.data.seq_len + 1), generator=g)
    data = patterns[torch.randint(0, 8, (n, cfg.data.batch_size), generator=g)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def run(cfg, steps=20, stats=None):
    """Losses and final values of ``steps`` training steps; ``stats`` collects the
    shards' counters. With ``shards.prefetch`` the next step's rows are hinted as in
    ``memdist train``."""
    remote, group = (None, None)
    if cfg.shards.count:
        remote, group = start_remote_tables(cfg)
    try:
        model, tables = build_model(cfg, torch.device("cpu"), remote)
        tables = unique_tables(tables)
        engine = make_engine(cfg, model, resolve_runtime(cfg))
        hint = prefetch_hint(engine.module) if cfg.shards.prefetch else None
        ga = cfg.train.grad_accum
        data = batches(cfg, steps * ga) + [(None, None)]
        cpu = torch.device("cpu")
        if hint is not None:
            hint(data[0][0])
        losses = []
        for s in range(steps):
            micro, following = data[s * ga : (s + 1) * ga], data[(s + 1) * ga][0]
            losses.append(train_step(engine, tables, micro, cpu, hint=hint, next_inputs=following))
        values = [t.state_dict()["weight"] for t in tables]
        if stats is not None:
            stats.extend(s for t in tables if hasattr(t, "stats") for s in t.stats())
        return losses, values
    finally:
        if group is not None:
            group.stop()


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_training_matches_local_table(ray_local, transport, kind, shards):
    ref_losses, ref_values = run(tiny())
    losses, values = run(tiny(f"shards.count={shards}", f"shards.plan={kind}",
                              f"shards.transport={transport}"))  # fmt: skip
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for a, b in zip(values, ref_values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["model.memory.layers=[0, 1]", "model.memory.shared_table=true"],
        ["train.grad_accum=2"],
        ["model.memory.value_optimizer=adagrad"],
    ],
    ids=["shared-table", "grad-accum", "adagrad"],
)
def test_training_matches_local_table_variants(ray_local, extra):
    ref_losses, ref_values = run(tiny(*extra), steps=8)
    losses, values = run(tiny(*extra, "shards.count=2", "shards.plan=row"), steps=8)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for a, b in zip(values, ref_values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_column_plan_with_adagrad_is_refused():
    with pytest.raises(ConfigError, match="shards.plan='column' with .*adagrad"):
        start_remote_tables(tiny("shards.count=2", "shards.plan=column",
                                 "model.memory.value_optimizer=adagrad"))  # fmt: skip


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_dead_shard_is_named(ray_local, transport):
    remote, actors = remote_table("row", 2, transport, 100, 8, 0)
    idx, scores = torch.randint(0, 100, (4, 3)), torch.rand(4, 3)
    remote.lookup(idx, scores)
    ray.kill(actors[1])
    t0 = time.time()
    with pytest.raises(ShardError, match="memory shard 1 (died|is unreachable) during lookup"):
        for _ in range(3):  # a collective send may still be buffered when the peer goes
            remote.lookup(idx, scores)
    assert time.time() - t0 < 30
    stop_shards(actors[:1])


def test_shard_errors_come_back_over_the_collective_transport(ray_local):
    remote, actors = remote_table("row", 2, "collective", 100, 8, 0)
    try:
        idx, scores, dy = torch.tensor([[1, 2]]), torch.ones(1, 2), torch.ones(1, 3)  # 3 != 8
        with pytest.raises(ShardError, match=r"memory shard 0 failed during backward: \w+Error"):
            remote.transport.wait(
                [remote.transport.submit(0, "backward", idx, scores, dy)], "backward"
            )
        # The group still serves after an error.
        y = remote.lookup(torch.tensor([[1, 99]]), torch.ones(1, 2))
        torch.testing.assert_close(y, remote.values()[[1, 99]].sum(0, keepdim=True))
    finally:
        stop_shards(actors)


@ray.remote
class StuckShard(ShardServer):
    """A real shard whose lookups never return in time."""

    def lookup(self, idx_NK, scores_NK):
        time.sleep(60)


def test_silent_shard_times_out_and_is_named(ray_local):
    plan = make_plan("row", 100, 8, 2)
    actors = [ShardActor.remote(plan.regions[0], "row", 8, seed=0),
              StuckShard.remote(plan.regions[1], "row", 8, seed=0)]  # fmt: skip
    ray.get([a.ping.remote() for a in actors])  # both up; only the lookup hangs
    remote = RemoteTable(plan, RayTransport(actors, timeout_s=2))
    t0 = time.time()
    with pytest.raises(ShardError, match="memory shard 1 did not answer lookup within 2 s"):
        remote.lookup(torch.randint(0, 100, (4, 3)), torch.rand(4, 3))
    assert time.time() - t0 < 10
    stop_shards(actors)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["row", "column"])
def test_training_with_quarter_budget_cache_matches_in_memory_shards(ray_local, transport, kind):
    # 4096 rows; each shard's region is 4x its budget, a step reads at most 256 rows.
    extra = ["model.memory.n_keys=64", "data.batch_size=2", "data.seq_len=8", "shards.count=2",
             f"shards.plan={kind}", f"shards.transport={transport}"]  # fmt: skip
    ref_losses, _ = run(tiny(*extra[:3]), steps=12)
    mem_losses, mem_values = run(tiny(*extra), steps=12)
    region_bytes = 4096 * 32 * 4 * 3 // 2  # values + Adam state, half the table per shard
    budget_mb = region_bytes / 4 / 2**20
    losses, values = run(tiny(*extra, f"shards.budget_mb={budget_mb}"), steps=12)
    assert losses == mem_losses  # the cache changes where rows live, not one bit of the math
    for a, b in zip(values, mem_values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "transport, kind, zero",
    [(t, k, 2) for t in TRANSPORTS for k in ("row", "column")] + [("inprocess", "row", 3)],
)
def test_prefetching_the_next_batch_makes_every_lookup_a_hit(ray_local, transport, kind, zero):
    """Each micro-batch hints the next one's rows (the forward up to the memory layer's
    top-k, run with the parameters it will use; under ZeRO-3 too), so every lookup finds
    its rows in the cache, while losses and values stay those of in-memory shards."""
    extra = ["model.memory.n_keys=64", "data.batch_size=2", "data.seq_len=8", "shards.count=2",
             f"shards.plan={kind}", f"shards.transport={transport}", "train.grad_accum=2",
             f"train.zero_stage={zero}", f"shards.budget_mb={4096 * 32 * 4 * 3 // 2 / 4 / 2**20}"]  # fmt: skip
    mem_losses, mem_values = run(tiny(*extra[:-1]), steps=8)
    plain, prefetched = [], []
    losses_plain, _ = run(tiny(*extra), steps=8, stats=plain)
    losses, values = run(tiny(*extra, "shards.prefetch=true"), steps=8, stats=prefetched)
    assert losses == mem_losses == losses_plain
    for a, b in zip(values, mem_values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum(s["cache_misses"] for s in plain) > 0
    assert sum(s["cache_misses"] for s in prefetched) == 0  # the hints were exact
    assert sum(s["prefetch_hits"] for s in prefetched) == sum(s["prefetched"] for s in prefetched)
    assert sum(s["prefetched"] for s in prefetched) > 0


def test_prefetch_needs_shard_servers():
    with pytest.raises(ConfigError, match="shards.prefetch=true needs shard servers"):
        tiny("shards.prefetch=true")


def test_budget_too_small_for_one_step_is_refused():
    with pytest.raises(ConfigError, match="budget of .* holds .* rows, fewer than"):
        start_remote_tables(tiny("shards.count=2", "shards.budget_mb=0.001"))


def test_indices_travel_deduplicated():
    from memdist.wire import PackedIndices

    idx = torch.tensor([[5, 9, 5, 5], [9, 9, 2**40, 5]])
    packed = PackedIndices.pack(idx)
    assert packed.rows_U.tolist() == [5, 9, 2**40] and packed.inverse_NK.dtype == torch.int32
    assert torch.equal(packed.unpack(), idx)
    assert packed.nbytes == 3 * 8 + 8 * 4 < idx.numel() * 8
    # A shard counts what actually arrived: packed indices plus scores.
    plan = make_plan("row", 64, 4, 1)
    server = ShardServer(plan.regions[0], "row", 4, seed=0)
    table = RemoteTable(plan, InProcessTransport([server]))
    idx = torch.full((16, 8), 3)
    table.lookup(idx, torch.rand(16, 8))
    assert server.stats()["bytes_in"] == 8 + 16 * 8 * 4 + 16 * 8 * 4


def test_lookup_is_sent_before_it_is_awaited():
    plan = make_plan("column", 64, 6, 2)
    servers = [ShardServer(r, "column", 6, seed=0) for r in plan.regions]
    table = RemoteTable(plan, InProcessTransport(servers))
    idx, scores = torch.randint(0, 64, (5, 4)), torch.rand(5, 4, requires_grad=True)
    pending = table.lookup_async(idx, scores)
    assert [s.stats()["lookups"] for s in servers] == [1, 1]  # already at the shards
    y = pending.wait()
    local = LocalTable(64, 6, seed=0)
    s2 = scores.detach().clone().requires_grad_(True)
    torch.testing.assert_close(y, local.lookup(idx, s2), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    local.lookup(idx, s2).sum().backward()
    torch.testing.assert_close(scores.grad, s2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_bf16_payload_halves_the_bytes_and_stays_close():
    ref_losses, _ = run(tiny(), steps=10)
    fp32 = tiny("shards.count=2", "shards.plan=row", "shards.transport=inprocess")
    bf16 = tiny(
        "shards.count=2", "shards.plan=row", "shards.transport=inprocess", "shards.payload=bf16"
    )
    l32, _ = run(fp32, steps=10)
    l16, _ = run(bf16, steps=10)
    torch.testing.assert_close(torch.tensor(l32), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    # bf16 on the wire is an approximation: close, not equal.
    torch.testing.assert_close(torch.tensor(l16), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    assert l16 != ref_losses
    tables, group = start_remote_tables(bf16)
    try:
        idx, scores = torch.randint(0, 256, (8, 16)), torch.rand(8, 16)
        y = tables[0].lookup(idx, scores)
        assert y.dtype == torch.float32
        sent = tables[0].stats()[0]["bytes_in"]
        assert sent == 8 * 16 * 4 + (idx.unique().numel() * 8) + 8 * 16 * 2  # int32 map, rows, bf16
    finally:
        group.stop()


def test_step_barrier_applies_every_workers_gradients_once_or_not_at_all():
    """Two workers share a shard: a step waits for both, sums their row gradients in rank
    order, scales them, and applies them once; a missing worker leaves the rows untouched."""
    import threading

    rows, dim = 40, 6
    plan = make_plan("row", rows, dim, 1)
    server = ShardServer(plan.regions[0], "row", dim, seed=3, optimizer="sgd", lr=1.0,
                         workers=2, barrier_timeout_s=0.5)  # fmt: skip
    local = LocalTable(rows, dim, optimizer="sgd", lr=1.0, seed=3)
    g = torch.Generator().manual_seed(0)
    grads = []
    for worker in (0, 1):
        idx, s = torch.randint(0, rows, (5, 3), generator=g), torch.rand(5, 3, generator=g)
        dy = torch.randn(5, dim, generator=g)
        server.backward(idx, s, dy, worker)
        local.lookup(idx, s.clone().requires_grad_(True)).backward(dy)
        grads.append(dy)
    before = server.values()
    # Worker 1 never arrives: worker 0's step fails, naming it, and nothing is applied.
    with pytest.raises(ShardError, match=r"waiting for workers \[1\] of 2; the step was not"):
        server.step(0.5, 0)
    assert torch.equal(server.values(), before)
    # Both arrive (in any order): one update, equal to the summed gradients, scaled.
    results = []
    threads = [threading.Thread(target=lambda w=w: results.append(server.step(0.5, w)))
               for w in (1, 0)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    local.step(0.5)
    assert results == [local.rows_touched_last_step] * 2
    torch.testing.assert_close(server.values(), local.weight_VD, rtol=1e-6, atol=1e-7)
    assert server.stats()["steps"] == 1
    with pytest.raises(ShardError, match=r"worker=2 is not in \[0, 2\)"):
        server.step(0.5, 2)
    # Workers that disagree on the scale: both fail at once, nothing is applied.
    server.barrier_timeout_s = 30.0
    before, errors = server.values(), []

    def step(worker, scale):
        try:
            server.step(scale, worker)
        except ShardError as exc:
            errors.append(str(exc))

    t0 = time.monotonic()
    threads = [threading.Thread(target=step, args=(w, 0.5 * (w + 1))) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == 2 and all("grad_scale" in e for e in errors), errors
    assert time.monotonic() - t0 < 10 and torch.equal(server.values(), before)


@pytest.mark.slow
def test_bounded_staleness_is_an_approximation_off_by_default(ray_local):
    """staleness=1 lets a step's update overlap the next lookups: close, not exact."""
    assert tiny().shards.staleness == 0
    ref_losses, ref_values = run(tiny(), steps=10)
    extra = ["shards.count=2", "shards.plan=row", "shards.transport=ray"]
    losses, values = run(tiny(*extra, "shards.staleness=1"), steps=10)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=5e-2, atol=0)
    # Every step was applied by the end (the last one is flushed before values are read).
    torch.testing.assert_close(values[0], ref_values[0], rtol=0.2, atol=5e-2)
