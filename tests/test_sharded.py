"""Value tables in shard servers against a local table, over every transport.

The in-process transport calls shard servers directly; the Ray transport runs them
as actors on a real local Ray instance; the collective transport reaches the same
actors over a gloo process group of its own. Every plan, shard count and transport
must give the same lookups, gradients, updates and training losses as a local table.
"""

import math
import os
import time

import pytest
import ray
import torch
from fixed_batches import batches

from memdist import wire
from memdist.assembly import build_model, make_engine, resolve_runtime, unique_tables
from memdist.cluster.actors import ShardActor, stop_shards
from memdist.cluster.plan import make_plan, step_traffic_bytes
from memdist.cluster.shard import KEPT_PER_WORKER, ShardServer
from memdist.config import load_config
from memdist.errors import (
    ConfigError,
    IndexOutOfRangeError,
    ShardError,
    ShardTimeoutError,
    SlowPathWarning,
)
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable, RowEntries
from memdist.shards import start_remote_tables
from memdist.step import train_step
from memdist.trainer import prefetch_hint
from memdist.transport import InProcessTransport, RayTransport
from memdist.values import LocalTable
from memdist.wire import Backward, PackedIndices, Step

TRANSPORTS = ["inprocess", "ray", "collective"]


def tiny(*extra):
    """The debug model the parity tests train. Both Adams get an eps well above roundoff:
    with eps=1e-8 a coordinate whose gradient is a few ulps of cancelled terms moves by
    up to +-lr on the sign of that roundoff, so the different summation order of row
    shards (and each CPU's own GEMM rounding) became 1e-5..1e-2 differences within 8 steps.
    With these the update's gain on a gradient error is at most lr/eps, and typical row
    gradients (~3e-5) are below eps, so a wrongly scaled row gradient changes the update
    (with eps=1e-8 Adam is blind to it). Measured on AVX-512, AVX2 and default kernels:
    losses within 1e-7 and values within a tenth of the tolerances below over 20 steps."""
    return load_config("small", [
        "shards.count=0", "model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.memory.layers=[1]",
        "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.k_dim=16",
        "model.memory.value_lr=0.01", "model.memory.value_eps=1e-4", "optim.eps=1e-6",
        "data.batch_size=4", "data.seq_len=16", "optim.warmup_steps=2", "train.steps=20", *extra,
    ])  # fmt: skip


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
        # the norm's requests behind the backwards, over both transports' ordered paths
        ["model.memory.value_grad_clip=1e-4", "train.grad_accum=2"],
        ["model.memory.value_grad_clip=1e-4", "shards.transport=collective"],
        ["model.memory.layers=[0, 1]", "shards.pin_cores=true"],  # 4 shards pinned
    ],
    ids=["shared-table", "grad-accum", "adagrad", "clip-ray", "clip-collective", "pinned"],
)
def test_training_matches_local_table_variants(ray_local, extra):
    ref_losses, ref_values = run(tiny(*extra), steps=8)
    losses, values = run(tiny(*extra, "shards.count=2", "shards.plan=row"), steps=8)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for a, b in zip(values, ref_values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_column_plan_with_adagrad_is_refused_and_never_chosen():
    """Row-wise Adagrad needs each row's whole gradient: asking for column shards is an
    error naming why, and ``auto`` (the default, which picks column for Adam here) takes
    the row plan, whatever the transport."""
    adagrad = "model.memory.value_optimizer=adagrad"
    with pytest.raises(ConfigError, match="shards.plan='column' with .*'adagrad'.* column shard"):
        start_remote_tables(tiny("shards.count=2", "shards.plan=column", adagrad))
    for optimizer, kind in (("adam", "column"), ("adagrad", "row")):
        cfg = tiny("shards.count=2", "shards.plan=auto", "shards.transport=inprocess",
                   f"model.memory.value_optimizer={optimizer}")  # fmt: skip
        _, group = start_remote_tables(cfg)
        assert [p.kind for p in group.plans] == [kind]


def test_shards_on_a_node_split_its_cores_in_blocks():
    from memdist.cluster.actors import core_sets

    def places(nodes: list[str], cores: dict[str, list[int]]) -> list[dict]:
        return [{"node": n, "cores": cores[n]} for n in nodes]

    eight = {"a": list(range(8)), "b": [4, 5, 6, 7]}
    sets = core_sets(places(["a", "b", "a", "a", "b"], eight))
    assert sets[1] + sets[4] == [4, 5, 6, 7] and sets[1] and sets[4]  # node b: 2 blocks
    on_a = [sets[0], sets[2], sets[3]]
    assert sorted(c for s in on_a for c in s) == list(range(8)) and all(on_a)
    assert all(max(x) < min(y) for x, y in zip(on_a, on_a[1:], strict=False))  # in order
    crowded = core_sets(places(["a"] * 5, {"a": [0, 1]}))
    assert crowded == [[0], [1], [0], [1], [0]]  # more shards than cores: round the node


def test_pinned_shard_actors_run_on_the_cores_they_were_given(ray_local):
    from memdist.cluster.actors import pin_shards, start_shards

    plan = make_plan("row", 64, 8, 2)
    actors = start_shards(plan, OptimizerSpec("adam", lr=0.1), seed=0)
    try:
        allowed = sorted(os.sched_getaffinity(0))
        got = pin_shards(actors)
        places = ray.get([a.where.remote() for a in actors])
        assert [p["cores"] for p in places] == got  # what where() reports from now on
        assert all(c and set(c) <= set(allowed) for c in got)
        if len(allowed) > 1:
            assert not set(got[0]) & set(got[1])
        # Threads started after pinning (a direct line's) run there too.
        ray.get(actors[0].line.remote(True))
        tids = ray.get(actors[0].__ray_call__.remote(
            lambda actor: {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
        ))  # fmt: skip
        assert all(c == got[0] for c in tids.values()), tids
    finally:
        stop_shards(actors)


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_dead_shard_is_named(ray_local, remote_table, transport):
    remote, actors = remote_table("row", 2, transport, 100, 8, 0, OptimizerSpec())
    idx, scores = torch.randint(0, 100, (4, 3)), torch.rand(4, 3)
    remote.lookup(idx, scores)
    ray.kill(actors[1])
    t0 = time.time()
    with pytest.raises(ShardError, match="memory shard 1 (died|is unreachable) during lookup"):
        # The killed process may answer for a moment (on its direct line, or a collective
        # send may still be buffered when the peer goes); then the next lookup fails.
        while time.time() - t0 < 30:
            remote.lookup(idx, scores)
            time.sleep(0.01)
    assert time.time() - t0 < 30


def test_shard_errors_come_back_over_the_collective_transport(ray_local, remote_table):
    remote, _ = remote_table("row", 2, "collective", 100, 8, 0, OptimizerSpec())
    idx, scores, dy = torch.tensor([[1, 2]]), torch.ones(1, 2), torch.ones(1, 3)  # 3 != 8
    with pytest.raises(ShardError, match=r"memory shard 0 failed during backward: \w+Error"):
        remote.transport.wait([remote.transport.submit(0, Backward(idx, scores, dy))], "backward")
    # The group still serves after an error.
    y = remote.lookup(torch.tensor([[1, 99]]), torch.ones(1, 2))
    torch.testing.assert_close(y, remote.read_rows(0, 100)["weight"][[1, 99]].sum(0, keepdim=True))


@ray.remote
class StuckShard(ShardServer):
    """A real shard whose lookups never return in time."""

    def handle_ordered(self, req, worker, seq):
        time.sleep(60)


def test_silent_shard_times_out_and_is_named(ray_local):
    plan = make_plan("row", 100, 8, 2)
    actors = [ShardActor.remote(plan.regions[0], "row", 8, OptimizerSpec(), seed=0),
              StuckShard.remote(plan.regions[1], "row", 8, OptimizerSpec(), seed=0)]  # fmt: skip
    ray.get([a.ping.remote() for a in actors])  # both up; only the lookup hangs
    remote = RemoteTable(plan, RayTransport(actors, timeout_s=2), OptimizerSpec())
    with pytest.warns(SlowPathWarning, match="memory shard 1: no direct line"):
        assert remote.transport.line(0) is not None and remote.transport.line(1) is None
    t0 = time.time()
    with pytest.raises(ShardTimeoutError, match="memory shard 1 did not answer lookup within 2 s"):
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


def test_indices_travel_as_int32_or_deduplicated():
    from memdist.wire import PackedIndices

    idx = torch.tensor([[5, 9, 5, 5], [9, 9, 2**40, 5]])
    packed = PackedIndices.pack(idx)
    assert packed.rows_U.tolist() == [5, 9, 2**40] and packed.inverse_NK.dtype == torch.int32
    assert torch.equal(packed.unpack(), idx)
    assert packed.nbytes == 3 * 8 + 8 * 4 < idx.numel() * 8
    # A lookup of a table of fewer than 2**31 rows sends its indices as int32, no more
    # bytes than packed ones (positions are int32 there too) and nothing to make; a shard
    # counts what actually arrived: int32 indices plus scores (one shard holds every row:
    # no bag offsets, see test_row_shards_get_and_compute_only_their_own_entries).
    plan = make_plan("row", 64, 4, 1)
    server = ShardServer(plan.regions[0], "row", 4, OptimizerSpec(), seed=0)
    table = RemoteTable(plan, InProcessTransport([server]), OptimizerSpec())
    idx = torch.full((16, 8), 3)
    table.lookup(idx, torch.rand(16, 8))
    assert server.stats()["bytes_in"] == 16 * 8 * 4 + 16 * 8 * 4


def test_row_shards_get_and_compute_only_their_own_entries():
    """A row shard gets the entries whose rows it holds (bags of any length, some empty),
    not every entry with the others weighing zero: bytes and work fall with the shard
    count. Results are the local table's, bit for bit (but for the sum of a bag split over
    shards); a shard sent every entry picks its own and answers in N x K."""
    plan = make_plan("row", 64, 4, 2)  # rows [0, 32) and [32, 64)
    servers = [ShardServer(r, "row", 4, OptimizerSpec(lr=0.1), seed=0) for r in plan.regions]
    table = RemoteTable(plan, InProcessTransport(servers), OptimizerSpec(lr=0.1))
    local = LocalTable(64, 4, OptimizerSpec(lr=0.1), seed=0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 32, (16, 8), generator=g)
    idx[:3] += 32  # bags 0-2 all in shard 1, bags 3-15 all in shard 0 ...
    idx[5, 2:5] += 32  # ... but for three entries of bag 5
    mine = [(idx < 32).sum().item(), (idx >= 32).sum().item()]
    assert mine == [13 * 8 - 3, 3 * 8 + 3]
    scores = torch.rand(16, 8, generator=g)
    s_remote, s_local = (scores.clone().requires_grad_(True) for _ in range(2))
    dy = torch.randn(16, 4, generator=g)
    y, y_local = table.lookup(idx, s_remote), local.lookup(idx, s_local)
    whole = torch.arange(16) != 5  # bag 5's two partial sums add up in another order
    assert torch.equal(y[whole], y_local[whole])
    torch.testing.assert_close(y[5], y_local[5])
    for server, entries in zip(servers, mine, strict=True):  # int32 index + fp32 score each
        assert server.stats()["bytes_in"] == entries * 8 + 17 * 4
    y.backward(dy)
    y_local.backward(dy)
    assert torch.equal(s_remote.grad, s_local.grad)
    table.step(), local.step()
    assert torch.equal(table.read_rows(0, 64)["weight"], local.read_rows(0, 64)["weight"])
    # Sent every entry (no bags), a row shard computes its own and answers N x K.
    y1 = servers[1].handle(wire.Lookup(idx, scores))
    ds1 = servers[1].handle(wire.Backward(idx, scores, dy))
    assert ds1.shape == (16, 8) and torch.equal(ds1[3:, :2], torch.zeros(13, 2))
    entries = RowEntries.split(idx, plan)
    (_, bags1), own1 = entries.parts[1], entries.gather(idx, 1)
    assert torch.equal(
        y1, servers[1].handle(wire.Lookup(own1, entries.gather(scores, 1), bags=bags1))
    )
    assert torch.equal(entries.gather(ds1, 1),
                       servers[1].handle(wire.Backward(own1, entries.gather(scores, 1), dy, bags=bags1)))  # fmt: skip
    with pytest.raises(
        IndexOutOfRangeError, match=r"entry of row 3 sent to the region of rows \[32, 64\)"
    ):
        servers[1].handle(
            wire.Lookup(torch.tensor([40, 3]), torch.rand(2), bags=torch.tensor([0, 2]))
        )
    with pytest.raises(ShardError, match="column region computes every entry"):
        col = ShardServer(
            make_plan("column", 64, 4, 2).regions[0], "column", 4, OptimizerSpec(), seed=0
        )
        col.handle(wire.Lookup(own1, entries.gather(scores, 1), bags=bags1))


@pytest.mark.parametrize("kind", ["row", "column"])
def test_the_planner_counts_the_bytes_the_shards_see(kind):
    """``shards.plan=auto`` picks by ``step_traffic_bytes``: it must be what a lookup and
    its backward really move (the shards count what arrives and what they answer)."""
    tokens, bag, dim, shards = 32, 8, 12, 3
    plan = make_plan(kind, 600, dim, shards)
    servers = [ShardServer(r, kind, dim, OptimizerSpec(), seed=0) for r in plan.regions]
    table = RemoteTable(plan, InProcessTransport(servers), OptimizerSpec())
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(tokens, bag, generator=g, requires_grad=True)
    y = table.lookup(torch.randint(0, 600, (tokens, bag), generator=g), scores)
    y.backward(torch.randn(tokens, dim, generator=g))
    seen = sum(s.stats()["bytes_in"] + s.stats()["bytes_out"] for s in servers)
    assert seen == step_traffic_bytes(kind, shards, tokens, bag, dim)


def test_a_backward_sends_only_the_output_gradient_and_is_kept_until_then():
    plan = make_plan("row", 64, 4, 1)
    server = ShardServer(plan.regions[0], "row", 4, OptimizerSpec(), seed=0)
    table = RemoteTable(plan, InProcessTransport([server]), OptimizerSpec())
    idx, scores = torch.randint(0, 64, (16, 8)), torch.rand(16, 8, requires_grad=True)
    y = table.lookup(idx, scores)
    sent = server.stats()["bytes_in"]
    dy = torch.randn(16, 4)
    y.backward(dy)
    assert server.stats()["bytes_in"] - sent == dy.nbytes  # no indices, no scores
    local = LocalTable(64, 4, seed=0)
    s2 = scores.detach().clone().requires_grad_(True)
    local.lookup(idx, s2).backward(dy)
    assert torch.equal(scores.grad, s2.grad)
    with pytest.raises(ShardError, match="lookup 0 of worker 0 is not kept here"):
        server.handle(wire.KeptBackward(0, dy))  # it was used by the backward above
    # Lookups whose backward never comes are dropped, oldest first.
    for keep in range(1, KEPT_PER_WORKER + 2):
        server.handle(wire.Lookup(idx, scores.detach(), keep=keep))
    with pytest.raises(ShardError, match="lookup 1 of worker 0 is not kept here"):
        server.handle(wire.KeptBackward(1, dy))
    assert server.handle(wire.KeptBackward(KEPT_PER_WORKER + 1, dy)).shape == (16, 8)
    assert server.stats()["kept_lookups"] == KEPT_PER_WORKER - 1
    with torch.no_grad():  # evaluation keeps nothing
        table.lookup(idx, scores)
    table.lookup(idx, scores.detach())  # nor does a lookup no gradient flows back to
    assert server.stats()["kept_lookups"] == KEPT_PER_WORKER - 1


def test_lookup_is_sent_before_it_is_awaited():
    plan = make_plan("column", 64, 6, 2)
    servers = [ShardServer(r, "column", 6, OptimizerSpec(), seed=0) for r in plan.regions]
    table = RemoteTable(plan, InProcessTransport(servers), OptimizerSpec())
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
        r = tables[0].plan.regions[0]
        mine = int(((idx >= r.row_start) & (idx < r.row_stop)).sum())  # the shard's entries
        assert 0 < mine < 8 * 16
        assert sent == mine * 4 + mine * 2 + 9 * 4  # int32 indices, bf16 scores, bag offsets
    finally:
        group.stop()


@pytest.mark.slow
def test_bf16_payload_over_ray_equals_in_process():
    """Ray carries tensors as numpy arrays (bf16 as its bits): nothing changes on the way."""
    common = ("shards.count=2", "shards.plan=row", "shards.payload=bf16")
    in_process, values_in = run(tiny(*common, "shards.transport=inprocess"), steps=6)
    over_ray, values_ray = run(tiny(*common, "shards.transport=ray"), steps=6)
    assert over_ray == in_process
    assert all(torch.equal(a, b) for a, b in zip(values_ray, values_in, strict=True))


@pytest.mark.parametrize("rows", [1, 300, 10**7])  # 10**7: past the flags' range, a sort
def test_packed_indices_equal_torch_unique(rows):
    g = torch.Generator().manual_seed(rows)
    for shape in ((40, 9), (0, 4)):
        idx = torch.randint(0, rows, shape, generator=g)
        packed = PackedIndices.pack(idx)
        want_rows, want_inverse = torch.unique(idx, sorted=True, return_inverse=True)
        assert packed.rows_U.dtype == torch.int64 and packed.inverse_NK.dtype == torch.int32
        assert torch.equal(packed.rows_U, want_rows)
        assert torch.equal(packed.inverse_NK, want_inverse.to(torch.int32))
        assert torch.equal(packed.unpack(), idx)


def test_requests_and_replies_cross_ray_as_arrays_and_come_back_equal():
    g = torch.Generator().manual_seed(0)
    idx = PackedIndices.pack(torch.randint(0, 50, (6, 4), generator=g))
    dy = torch.randn(6, 8, generator=g)
    req = wire.Backward(idx, torch.rand(6, 4, generator=g).to(torch.bfloat16), dy[:, 2:5], 3)
    sent = wire.to_arrays(req)
    assert not any(isinstance(v, torch.Tensor) for v in sent.fields.values())
    back = wire.from_arrays(sent)
    assert type(back) is wire.Backward and back.worker == 3
    for got, want in ((back.idx.rows_U, idx.rows_U), (back.idx.inverse_NK, idx.inverse_NK),
                      (back.scores_NK, req.scores_NK), (back.dy, req.dy)):  # fmt: skip
        assert got.dtype == want.dtype and torch.equal(got, want)
    reply = wire.from_arrays(wire.to_arrays([wire.StepReply(5, 2.0), {"y": dy.half()}, 7]))
    assert reply[0] == wire.StepReply(5, 2.0) and reply[2] == 7
    assert torch.equal(reply[1]["y"], dy.half())


def test_step_barrier_applies_every_workers_gradients_once_or_not_at_all():
    """Two workers share a shard: a step waits for both, sums their row gradients in rank
    order, scales them, and applies them once; a missing worker leaves the rows untouched."""
    import threading

    rows, dim = 40, 6
    spec = OptimizerSpec("sgd", lr=1.0)
    plan = make_plan("row", rows, dim, 1)
    server = ShardServer(plan.regions[0], "row", dim, spec, seed=3, workers=2,
                         barrier_timeout_s=0.5)  # fmt: skip
    local = LocalTable(rows, dim, spec, seed=3)
    g = torch.Generator().manual_seed(0)
    grads = []
    for worker in (0, 1):
        idx, s = torch.randint(0, rows, (5, 3), generator=g), torch.rand(5, 3, generator=g)
        dy = torch.randn(5, dim, generator=g)
        server.handle(Backward(idx, s, dy, worker))
        local.lookup(idx, s.clone().requires_grad_(True)).backward(dy)
        grads.append(dy)

    def values():
        return server.read_rows(0, rows)["weight"]

    before = values()
    # Worker 1 never arrives: worker 0's step fails, naming it, and nothing is applied.
    with pytest.raises(ShardError, match=r"waiting for workers \[1\] of 2; the step was not"):
        server.handle(Step(0.5, 0))
    assert torch.equal(values(), before)
    # Both arrive (in any order): one update, equal to the summed gradients, scaled.
    results = []
    threads = [threading.Thread(target=lambda w=w: results.append(server.handle(Step(0.5, w))))
               for w in (1, 0)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    expected = local.step(0.5)
    assert [r.rows for r in results] == [expected.rows] * 2
    assert results[0].grad_sq == pytest.approx(expected.grad_norm**2, rel=1e-6)
    torch.testing.assert_close(values(), local.weight_VD, rtol=1e-6, atol=1e-7)
    assert server.stats()["steps"] == 1
    with pytest.raises(ShardError, match=r"worker=2 is not in \[0, 2\)"):
        server.handle(Step(0.5, 2))
    # Workers that disagree on the scale: both fail at once, nothing is applied.
    server.barrier_timeout_s = 30.0
    before, errors = values(), []

    def step(worker, scale):
        try:
            server.handle(Step(scale, worker))
        except ShardError as exc:
            errors.append(str(exc))

    t0 = time.monotonic()
    threads = [threading.Thread(target=step, args=(w, 0.5 * (w + 1))) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == 2 and all("different requests" in e for e in errors), errors
    assert time.monotonic() - t0 < 10 and torch.equal(values(), before)


def test_staleness_one_sends_the_step_without_waiting(remote_table):
    """With staleness=1 ``step`` returns before the shards answer (it reports the previous
    step, the lag); with 0 it reports its own. A setting that did nothing would fail."""
    spec = OptimizerSpec("sgd", lr=1.0)
    reported = {}
    for staleness in (0, 1):
        table, _ = remote_table("row", 2, "inprocess", 64, 4, 0, spec)
        table.staleness = staleness
        rows_per_step = []
        for n in (3, 5):  # steps touching 3 and then 5 distinct rows
            idx = torch.arange(n).view(n, 1) * 7
            table.lookup(idx, torch.ones(n, 1, requires_grad=True)).sum().backward()
            rows_per_step.append(table.step().rows)
        table.flush()
        rows_per_step.append(table.rows_touched_last_step)
        reported[staleness] = rows_per_step
    assert reported[0] == [3, 5, 5]
    assert reported[1] == [0, 3, 5]  # each step's reply is collected one step later


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
