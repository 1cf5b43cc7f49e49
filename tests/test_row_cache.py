"""zarr-backed shards with a row cache against fully resident shards."""

import numpy as np
import pytest
import torch
import zarr

from memdist import remote
from memdist.cluster.plan import make_plan
from memdist.cluster.shard import ShardServer
from memdist.errors import CheckpointError, ConfigError, ShardError
from memdist.kernels import OptimizerSpec
from memdist.remote import RemoteTable
from memdist.storage import zarr_region
from memdist.storage.row_cache import CachedRows, state_spec
from memdist.storage.zarr_region import ZarrRegion
from memdist.transport import InProcessTransport
from memdist.values import init_values
from memdist.wire import Flush, Step


@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_quarter_budget_cache_matches_resident_shard(tmp_path, kind, optimizer):
    if kind == "column" and optimizer == "adagrad":
        pytest.skip("column plans refuse row-wise Adagrad")
    rows, dim = 400, 12
    region = make_plan(kind, rows, dim, 2).regions[1]
    spec = OptimizerSpec(optimizer, lr=0.05)
    resident = ShardServer(region, kind, dim, spec, seed=3)
    cached = ShardServer(region, kind, dim, spec, seed=3, store_path=str(tmp_path / "s1"),
                         cache_rows=region.rows // 4)  # fmt: skip
    assert isinstance(cached.rows, CachedRows)
    torch.testing.assert_close(cached.read_rows(0, rows), resident.read_rows(0, rows), rtol=0,
                               atol=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _step in range(6):
        for _micro in range(2):  # two backward passes accumulate before a step
            idx = torch.randint(0, rows, (6, 4), generator=g)
            scores = torch.rand(6, 4, generator=g)
            dy = torch.randn(6, region.cols, generator=g)
            torch.testing.assert_close(cached.lookup(idx, scores), resident.lookup(idx, scores),
                                       rtol=0, atol=0)  # fmt: skip
            torch.testing.assert_close(cached.backward(idx, scores, dy),
                                       resident.backward(idx, scores, dy), rtol=0, atol=0)  # fmt: skip
        a, b = cached.handle(Step(1.0)), resident.handle(Step(1.0))
        assert a.rows == b.rows and a.grad_sq == pytest.approx(b.grad_sq, rel=1e-12)
        hint = torch.randint(0, rows, (40,), generator=g)  # rows a coming lookup may read
        assert resident.prefetch(hint) == 0  # nothing to load: every row is in memory
        cached.prefetch(hint)
    a, b = cached.read_rows(0, rows), resident.read_rows(0, rows)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    stats = cached.stats()
    assert stats["cached"] and stats["cache_misses"] > 0 and stats["evictions"] > 0
    assert stats["writebacks"] > 0 and stats["cache_hits"] > 0
    assert stats["prefetched"] > 0 and stats["prefetch_hits"] > 0
    # What the region takes on disk: every chunk of every array, stored raw and whole.
    chunks = -(-region.rows // cached.rows.store.chunk_rows) * cached.rows.store.chunk_rows
    # Adagrad is row-wise (one float per row); Adam has two moments and a row step count.
    state = {"sgd": 0, "adagrad": 4, "adam": 2 * region.cols * 4 + 8}[optimizer]
    assert stats["store_bytes"] == chunks * (region.cols * 4 + state)
    assert stats["process_disk_read_bytes"] >= 0  # Linux says; page-cache hits are not reads


def _cache(tmp_path, rows=64, capacity=8):
    spec = state_spec("sgd", 3)
    store = ZarrRegion(tmp_path / "r", rows, 3, spec, chunk_rows=8,
                       init_rows=lambda r0, r1: init_values(r0, r1, 3, seed=2).numpy())  # fmt: skip
    return CachedRows(store, capacity, OptimizerSpec("sgd", lr=1.0))


def test_prefetched_rows_are_hits_and_hold_their_values(tmp_path):
    cache = _cache(tmp_path)
    assert cache.prefetch(np.array([3, 9, 30])) == 3
    slots = cache.resolve(np.array([3, 9, 30, 31]))
    c = cache.counters
    assert (c["prefetched"], c["prefetch_hits"], c["cache_hits"], c["cache_misses"]) == (3, 3, 3, 1)
    expected = init_values(0, 64, 3, seed=2)[[3, 9, 30, 31]]
    torch.testing.assert_close(cache.weight_VD[torch.from_numpy(slots)], expected, rtol=0, atol=0)
    assert cache.prefetch(np.array([3, 9])) == 0  # resident already: nothing read


def test_prefetch_never_evicts_rows_awaiting_their_step(tmp_path):
    cache = _cache(tmp_path, capacity=8)
    pending = np.arange(6)
    slots = cache.resolve(pending)
    cache.accumulate(torch.from_numpy(slots), torch.ones(6, 3))  # pinned until step()
    # 10 rows hinted, room for 2: the rest is skipped, the pending rows stay.
    assert cache.prefetch(np.arange(20, 30)) == 2
    assert cache.counters["prefetch_skipped"] == 8
    np.testing.assert_array_equal(cache.slot_of[pending], slots)
    cache.step()
    np.testing.assert_allclose(cache.weight_VD[torch.from_numpy(slots)].numpy(),
                               init_values(0, 6, 3, seed=2).numpy() - 1.0, rtol=1e-6)  # fmt: skip
    # After the step nothing is pinned: a hint may now replace the least recently used rows,
    # which are written back first.
    assert cache.prefetch(np.arange(40, 48)) == 8
    np.testing.assert_allclose(cache.store.read(pending)["values"],
                               init_values(0, 6, 3, seed=2).numpy() - 1.0, rtol=1e-6)  # fmt: skip


def test_store_persists_and_reopens(tmp_path):
    spec = state_spec("sgd", 5)
    store = ZarrRegion(tmp_path / "r", 50, 5, spec, chunk_rows=8,
                       init_rows=lambda r0, r1: init_values(r0, r1, 5, seed=1).numpy())  # fmt: skip
    cache = CachedRows(store, 10, OptimizerSpec("sgd", lr=1.0))
    slots = cache.resolve(np.array([1, 2, 40]))
    cache.accumulate(torch.from_numpy(slots), torch.ones(3, 5))
    cache.step()
    cache.flush()
    again = ZarrRegion(tmp_path / "r", 50, 5, spec, chunk_rows=8)
    got = again.read(np.array([1, 2, 3, 40]))["values"]
    start = init_values(0, 50, 5, seed=1).numpy()
    np.testing.assert_allclose(got[[0, 1, 3]], start[[1, 2, 40]] - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(got[2], start[3])
    assert store.arrays["rows"].chunks == (8, 1, 5) and store.packed == ["values"]
    # A new table never silently continues from rows found on disk.
    with pytest.raises(ConfigError, match="already holds a zarr region"):
        ZarrRegion(tmp_path / "r", 50, 5, spec, init_rows=lambda r0, r1: np.zeros((r1 - r0, 5)))


@pytest.mark.parametrize("layout", ["raw", "compressed"])
def test_rows_written_are_what_zarr_itself_reads(tmp_path, layout, monkeypatch):
    """Rows go through memory maps of the raw chunk files; zarr reading the same arrays
    must see them, and arrays laid out otherwise (compressed) go through zarr."""
    monkeypatch.setattr(zarr_region, "MAX_MAPS", 3)  # 10 chunk maps: closed and reopened
    spec = state_spec("adam", 6)
    path = tmp_path / "r"
    if layout == "compressed":  # e.g. written by another tool: zstd chunks
        group = zarr.open_group(str(path), mode="w")
        for name, (trailing, dtype) in {"rows": ((3, 6), "float32"), "step": ((), "int64")}.items():
            group.create_array(name, shape=(70, *trailing), chunks=(16, *trailing),
                               dtype=dtype, fill_value=0)  # fmt: skip
        group["rows"].attrs["parts"] = ["values", "exp_avg", "exp_avg_sq"]
    region = ZarrRegion(path, 70, 6, spec, chunk_rows=16)
    assert region.mapped == (layout == "raw")
    assert list(region.arrays) == ["rows", "step"]  # a row's values beside its moments
    g = np.random.default_rng(0)
    truth = region.read(np.arange(70))
    for _ in range(5):
        rows = np.unique(g.integers(0, 70, 20))
        data = {name: g.standard_normal((rows.size, *t.shape[1:])).astype(t.dtype)
                for name, t in truth.items()}  # fmt: skip
        region.write(rows, data)
        for name in truth:
            truth[name][rows] = data[name]
        rows = np.unique(g.integers(0, 70, 30))
        got = region.read(rows)
        assert set(got) == set(truth)
        for name in truth:
            np.testing.assert_array_equal(got[name], truth[name][rows], err_msg=name)
    region.sync()
    plain = zarr.open_group(str(path), mode="r")  # zarr alone, no memdist
    parts = plain["rows"].attrs["parts"]
    assert parts == ["values", "exp_avg", "exp_avg_sq"]
    for i, name in enumerate(parts):
        np.testing.assert_array_equal(plain["rows"][:, i], truth[name], err_msg=name)
    np.testing.assert_array_equal(plain["step"][:], truth["step"])
    rows = np.array([0, 15, 16, 69])  # chunk edges and the last, partial chunk
    for name, got in region.read(rows).items():
        np.testing.assert_array_equal(got, truth[name][rows], err_msg=name)


def test_a_region_laid_out_otherwise_is_refused_not_refilled(tmp_path):
    """A group without the packed rows (one array per state, as memdist wrote before) or
    whose rows pack other parts is a clear error, never a region of zeros."""
    spec = state_spec("adam", 4)
    old = zarr.open_group(str(tmp_path / "old"), mode="w")
    for name, (trailing, dtype) in {"values": ((4,), "float32"), **spec}.items():
        old.create_array(name, shape=(20, *trailing), chunks=(8, *trailing), dtype=dtype,
                         fill_value=0)  # fmt: skip
    with pytest.raises(CheckpointError, match="holds no 'rows' array"):
        ZarrRegion(tmp_path / "old", 20, 4, spec, chunk_rows=8)
    ZarrRegion(tmp_path / "sgd", 20, 4, state_spec("sgd", 4), chunk_rows=8,
               init_rows=lambda r0, r1: np.ones((r1 - r0, 4)))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"has shape \(20, 1, 4\), expected \(20, 3, 4\)"):
        ZarrRegion(tmp_path / "sgd", 20, 4, spec, chunk_rows=8)  # an SGD region read as Adam's
    zarr.open_group(str(tmp_path / "sgd"))["rows"].attrs["parts"] = ["exp_avg"]
    with pytest.raises(CheckpointError, match=r"holds parts \['exp_avg'\], expected"):
        ZarrRegion(tmp_path / "sgd", 20, 4, state_spec("sgd", 4), chunk_rows=8)


def test_cache_too_small_for_one_request_is_a_clear_error(tmp_path):
    region = make_plan("row", 100, 4, 1).regions[0]
    shard = ShardServer(
        region, "row", 4, OptimizerSpec(), seed=0, store_path=str(tmp_path / "s"), cache_rows=5
    )
    with pytest.raises(ShardError, match="row cache of 5 rows cannot hold the 8 rows"):
        shard.lookup(torch.arange(8).view(2, 4), torch.rand(2, 4))


def test_a_region_written_later_refuses_rows_until_then_and_reports_progress(tmp_path):
    """Shards started by Ray write a new region after they answer (start_shards shows
    the progress): until then no row may be read or written; then the rows are the
    table's initial values and the optimizer state zeros, as when written at once."""
    rows, dim = 50, 4
    region = make_plan("row", rows, dim, 1).regions[0]
    spec = OptimizerSpec("adam", lr=0.05)
    later = ShardServer(region, "row", dim, spec, seed=2, store_path=str(tmp_path / "later"),
                        cache_rows=16, fill_later=True)  # fmt: skip
    at_once = ShardServer(region, "row", dim, spec, seed=2, store_path=str(tmp_path / "now"),
                          cache_rows=16)  # fmt: skip
    assert later.fill_progress() == (0, rows) and at_once.fill_progress() == (rows, rows)
    with pytest.raises(ShardError, match=r"being created \(0 of 50 rows written\)"):
        later.read_rows(0, rows)
    later.fill_store()
    assert later.fill_progress() == (rows, rows)
    for key, want in at_once.read_rows(0, rows).items():
        torch.testing.assert_close(later.read_rows(0, rows)[key], want, rtol=0, atol=0, msg=key)
    resident = ShardServer(region, "row", dim, spec, seed=2)
    assert resident.fill_progress() == (0, 0)


def _stepped(tmp_path, optimizer, lr, rows):
    """A 50 x 5 region behind a 10-row cache whose ``rows`` took one step of gradient 1."""
    store = ZarrRegion(tmp_path / "r", 50, 5, state_spec(optimizer, 5), chunk_rows=8,
                       init_rows=lambda r0, r1: init_values(r0, r1, 5, seed=1).numpy())  # fmt: skip
    cache = CachedRows(store, 10, OptimizerSpec(optimizer, lr=lr))
    cache.accumulate(torch.from_numpy(cache.resolve(rows)), torch.ones(rows.size, 5))
    cache.step()
    return cache, init_values(0, 50, 5, seed=1)


def test_a_flush_in_pieces_writes_the_lowest_rows_first_and_counts_what_is_left(tmp_path):
    spec = state_spec("sgd", 5)
    rows = np.array([40, 1, 17, 2, 33])
    cache, start = _stepped(tmp_path, "sgd", 1.0, rows)
    start = start.numpy()
    ordered = np.sort(rows)
    for written, left in ((2, 3), (4, 1), (5, 0), (5, 0)):
        assert cache.flush(2) == left
        got = ZarrRegion(tmp_path / "r", 50, 5, spec, chunk_rows=8).read(ordered)["values"]
        np.testing.assert_allclose(got[:written], start[ordered[:written]] - 1.0, rtol=1e-6)
        np.testing.assert_array_equal(got[written:], start[ordered[written:]])
    assert cache.counters["writebacks"] == 5


def test_reading_rows_takes_resident_rows_from_the_cache_and_writes_nothing_back(tmp_path):
    """A read (a save's, a remote ``read_rows``) costs no flush: updated rows come from
    their slots, the others from zarr, and the files keep their old rows until a flush."""
    rows = np.array([1, 2, 17, 33, 40])
    cache, start = _stepped(tmp_path, "adam", 0.5, rows)
    got = cache.read_rows(0, 50)
    changed = torch.zeros(50, dtype=torch.bool)
    changed[torch.from_numpy(rows)] = True
    torch.testing.assert_close(got["weight"][~changed], start[~changed], rtol=0, atol=0)
    torch.testing.assert_close(got["weight"][changed], start[changed] - 0.5, rtol=1e-5, atol=1e-6)
    assert got["state.step"].tolist() == changed.long().tolist()
    picked = cache.read_row_indices(np.array([2, 3, 40]))
    for key, t in picked.items():
        torch.testing.assert_close(t, got[key][[2, 3, 40]], rtol=0, atol=0, msg=key)
    assert cache.counters["writebacks"] == 0 and cache.dirty.sum() == 5
    on_disk = ZarrRegion(tmp_path / "r", 50, 5, state_spec("adam", 5), chunk_rows=8).read(rows)
    np.testing.assert_array_equal(on_disk["values"], start[rows].numpy())
    assert cache.flush() == 0 and cache.counters["writebacks"] == 5


class CountingTransport(InProcessTransport):
    """Shard servers in this process; counts the flush requests each shard got."""

    def __init__(self, servers):
        super().__init__(servers)
        self.flushes = [0] * len(servers)

    def submit(self, shard, req):
        self.flushes[shard] += isinstance(req, Flush)
        return super().submit(shard, req)


def test_a_remote_flush_writes_a_large_cache_back_in_bounded_requests(tmp_path, monkeypatch):
    """Each flush request writes back at most FLUSH_ROWS rows (each must end within the
    transport's timeout), and the table asks again until no shard has rows left."""
    rows, dim = 200, 6
    plan = make_plan("row", rows, dim, 2)
    spec = OptimizerSpec("adam", lr=0.05)
    cached = [ShardServer(r, "row", dim, spec, seed=3, store_path=str(tmp_path / f"s{r.shard}"),
                          cache_rows=r.rows // 2) for r in plan.regions]  # fmt: skip
    resident = [ShardServer(r, "row", dim, spec, seed=3) for r in plan.regions]
    transport = CountingTransport(cached)
    tables = [
        RemoteTable(plan, transport, spec),
        RemoteTable(plan, InProcessTransport(resident), spec),
    ]
    g = torch.Generator().manual_seed(0)
    for _step in range(3):
        idx = torch.randint(0, rows, (16, 4), generator=g)
        scores = torch.rand(16, 4, generator=g, requires_grad=True)
        dy = torch.randn(16, dim, generator=g)
        for table in tables:
            scores.grad = None
            (table.lookup(idx, scores) * dy).sum().backward()
            table.step()
    dirty = [int(s.rows.dirty.sum()) for s in cached]
    assert min(dirty) > 7  # enough that 7 rows a request takes several
    monkeypatch.setattr(remote, "FLUSH_ROWS", 7)
    tables[0].flush()
    assert transport.flushes == [max(-(-n // 7) for n in dirty)] * 2
    assert not any(s.rows.dirty.any() for s in cached)
    for c, r in zip(cached, resident, strict=True):
        region = ZarrRegion(c.rows.store.path, c.region.rows, dim, state_spec("adam", dim))
        on_disk = region.read(np.arange(c.region.rows))
        want = r.rows.read_rows(0, c.region.rows)  # the resident shard's rows, same steps
        np.testing.assert_array_equal(on_disk.pop("values"), want.pop("weight").numpy())
        assert {f"state.{k}" for k in on_disk} == want.keys()  # and the optimizer's state
        for key, array in on_disk.items():
            np.testing.assert_array_equal(array, want[f"state.{key}"].numpy(), err_msg=key)
