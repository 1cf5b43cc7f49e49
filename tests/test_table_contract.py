"""One conformance suite for every ``ValueTable``, as zarr runs one suite over every store.

Implementations: a local table in memory; a local table over a zarr region behind a
row cache (half of the rows in memory); remote tables over shard servers
in-process, in Ray actors, and in Ray actors reached over the collective transport,
each with the row, column and ``auto`` plans. Each must give, on the same seed, the
lookups, score gradients, step results, values and optimizer state of the
single-process reference (``kernels`` on a plain tensor, written out in ``Reference``
below), for every value optimizer, with and without gradient clipping; and move its
state by row ranges.
"""

import contextlib
import math

import pytest
import torch
import zarr

from memdist.cluster.plan import choose_plan, make_plan
from memdist.cluster.shard import ShardServer
from memdist.errors import CheckpointError, ConfigError, IndexOutOfRangeError, ShapeError
from memdist.kernels import OptimizerSpec, reference
from memdist.remote import RemoteTable
from memdist.storage.row_cache import CachedRows, state_spec
from memdist.storage.table_store import Source
from memdist.storage.targets import FolderTarget
from memdist.storage.zarr_region import ZarrRegion
from memdist.table import StepResult, ValueTable
from memdist.transport import InProcessTransport
from memdist.values import LocalTable, init_values

ROWS, DIM, SEED = 300, 20, 7
REMOTE = [f"{t}-{k}" for t in ("inprocess", "ray", "collective") for k in ("row", "column", "auto")]


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_local):
    yield


@pytest.fixture
def make(remote_table, tmp_path):
    def build(impl: str, spec: OptimizerSpec) -> ValueTable:
        if impl == "local":
            return LocalTable(ROWS, DIM, spec, seed=SEED)
        if impl == "local-zarr":
            store = ZarrRegion(
                tmp_path / "region", ROWS, DIM, state_spec(spec.name, DIM), chunk_rows=64,
                init_rows=lambda r0, r1: init_values(r0, r1, DIM, SEED).numpy(),
            )  # fmt: skip
            return LocalTable.over(CachedRows(store, ROWS // 2, spec))
        transport, kind = impl.split("-")
        plan = choose_plan(kind, ROWS, DIM, 2, tokens=12, bag=8, optimizer=spec.name)
        return remote_table(kind, 2, transport, ROWS, DIM, SEED, spec, plan=plan)[0]

    return build


class Reference:
    """The single-process torch reference: y = sum_k s_k V[i_k]; dV[i] = sum s_k dy; one
    optimizer step on the summed, scaled and clipped row gradients, row by row."""

    def __init__(self, spec: OptimizerSpec) -> None:
        from memdist import kernels

        self.spec = spec
        self.V = init_values(0, ROWS, DIM, SEED).double()
        self.state = kernels.init_optimizer_state(spec.name, ROWS, DIM)
        self.grad = torch.zeros(ROWS, DIM, dtype=torch.float64)
        self.touched = torch.zeros(ROWS, dtype=torch.bool)

    def lookup(self, idx, scores):
        return (scores.double().unsqueeze(-1) * self.V[idx]).sum(1)

    def backward(self, idx, scores, dy):
        dscores = (self.V[idx] * dy.double().unsqueeze(1)).sum(-1)
        contrib = scores.double().unsqueeze(-1) * dy.double().unsqueeze(1)
        self.grad.index_add_(0, idx.reshape(-1), contrib.reshape(-1, DIM))
        self.touched[idx.reshape(-1)] = True
        return dscores

    def step(self, grad_scale):
        rows = self.touched.nonzero().flatten()
        g = self.grad[rows] * grad_scale
        norm = float(g.pow(2).sum().sqrt())
        if self.spec.grad_clip is not None:
            g = g * min(1.0, self.spec.grad_clip / (norm + 1e-6))
        V32 = self.V.float()
        reference.sparse_update_(self.spec, V32, self.state, rows, g.float())
        self.V = V32.double()
        self.grad.zero_()
        self.touched.zero_()
        return StepResult(int(rows.numel()), norm)


def _batches(n):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randint(0, ROWS, (12, 8), generator=g)
        idx[0] = 5  # repeated rows within a bag and across bags
        idx[1, :4] = ROWS - 1
        yield idx, torch.rand(12, 8, generator=g), torch.randn(12, DIM, generator=g)


def _refused(impl, optimizer):
    return impl.endswith("-column") and optimizer == "adagrad"


CASES = [("sgd", None), ("adagrad", None), ("adam", None), ("adam", 0.05), ("sgd", 0.05)]
# Every optimizer and clipping case on every plan in this process; over Ray and the
# collective transport (the same shard code, other wires) every plan with the cases
# that use each kind of message: clipping's extra round, and Adagrad's plan rule.
MATRIX = [
    *[(impl, opt, clip) for impl in ["local", "local-zarr", *REMOTE[:3]] for opt, clip in CASES],
    *[
        (impl, opt, clip)
        for impl in REMOTE[3:]
        for opt, clip in [("adam", 0.05), ("adagrad", None)]
    ],
]


@pytest.mark.parametrize("impl, optimizer, clip", MATRIX)
def test_training_steps_match_the_reference(make, impl, optimizer, clip):
    spec = OptimizerSpec(optimizer, lr=0.05, grad_clip=clip)
    if _refused(impl, optimizer):
        with pytest.raises(ConfigError, match="shards.plan='column' with .*'adagrad'"):
            make(impl, spec)
        return
    table, ref = make(impl, spec), Reference(spec)
    assert isinstance(table, ValueTable)
    if impl.endswith("-auto") and optimizer == "adagrad":
        assert "row-wise" in table.describe()  # auto never picks the inexact column plan
    torch.testing.assert_close(table.read_rows(0, ROWS)["weight"], ref.V.float(), rtol=0, atol=0)
    clipped, started = False, None
    for micro, (idx, scores, dy) in enumerate(_batches(6)):
        s = scores.clone().requires_grad_(True)
        y = table.lookup(idx, s)
        torch.testing.assert_close(y.double(), ref.lookup(idx, scores), rtol=1e-5, atol=1e-6)
        if micro == 1:  # as the training loop does before a step's last backward
            table.expect_step(0.5)
        y.backward(dy)
        torch.testing.assert_close(s.grad.double(), ref.backward(idx, scores, dy), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        steps = []
        if started is not None:  # the step started without waiting, seen by the lookup above
            pending, want = started
            steps += [(pending.wait(), want), (table.last_step, want)]
            started = None
        if micro % 2 == 1:  # two backward passes add up before each step
            want = ref.step(0.5)
            clipped |= clip is not None and want.grad_norm > clip
            if micro == 1:
                started = table.step_async(0.5), want
            else:
                steps.append((table.step(0.5), want))
        for got, want in steps:
            assert got.rows == want.rows
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
        if steps and started is None:
            assert table.rows_touched_last_step == steps[-1][0].rows
    assert clipped or clip is None  # the clipping tests do clip
    table.flush()
    state = table.read_rows(0, ROWS)
    torch.testing.assert_close(state["weight"], ref.V.float(), rtol=1e-5, atol=1e-6)
    for key, value in ref.state.items():
        torch.testing.assert_close(state[f"state.{key}"], value, rtol=1e-5, atol=1e-7, msg=key)
    assert table.steps == 3
    assert table.wait_seconds >= 0 and table.rows_prefetched >= 0


def test_clipping_changes_the_update():
    """A clip below the gradient's norm must change the step (so the parity above is not
    vacuous), and one above it must not."""
    outs = {}
    for clip in (None, 1e-3, 1e3):
        table = LocalTable(ROWS, DIM, OptimizerSpec("sgd", lr=1.0, grad_clip=clip), seed=SEED)
        idx, scores, dy = next(_batches(1))
        table.lookup(idx, scores.requires_grad_(True)).backward(dy)
        result = table.step()
        outs[clip] = table.read_rows(0, ROWS)["weight"]
        assert result.grad_norm > 1e-3
    assert not torch.equal(outs[None], outs[1e-3])
    assert torch.equal(outs[None], outs[1e3])
    moved = (outs[1e-3] - init_values(0, ROWS, DIM, SEED)).norm()
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)  # lr 1: the step is the clipped grad


@pytest.mark.parametrize("impl", ["local", "local-zarr", "inprocess-row", "ray-column"])
def test_state_moves_by_row_ranges(make, impl):
    spec = OptimizerSpec("adam", lr=0.05)
    table = make(impl, spec)
    idx, scores, dy = next(_batches(1))
    table.lookup(idx, scores.requires_grad_(True)).backward(dy)
    table.step()
    names = {"weight", *table.state_names()}
    assert names == {"weight", "state.exp_avg", "state.exp_avg_sq", "state.step"}
    whole = table.state_dict()
    assert int(whole["steps"]) == 1
    # A range across the shards' boundary (150 with two row shards).
    part = table.read_rows(140, 160)
    assert set(part) == names
    for key, value in part.items():
        torch.testing.assert_close(value, whole[key][140:160], rtol=0, atol=0, msg=key)
    g = torch.Generator().manual_seed(5)
    new = {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point()
           else torch.randint(0, 9, v.shape, generator=g) for k, v in part.items()}  # fmt: skip
    table.write_rows(140, new)
    for key, value in table.read_rows(140, 160).items():
        torch.testing.assert_close(value, new[key], rtol=0, atol=0, msg=key)
    untouched = table.read_rows(0, 140)
    for key, value in untouched.items():
        torch.testing.assert_close(value, whole[key][:140], rtol=0, atol=0, msg=key)
    # The whole table round-trips, and a lookup reads what was written.
    whole["steps"] = torch.tensor(7)
    table.load_state_dict(whole)
    assert table.steps == 7
    y = table.lookup(torch.tensor([[145, 3]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(y[0], whole["weight"][145], rtol=0, atol=0)
    with pytest.raises(IndexOutOfRangeError, match=r"\[290, 310\) is outside the table's 300"):
        table.read_rows(290, 310)
    with pytest.raises(ShapeError, match="missing"):
        table.write_rows(0, {"weight": whole["weight"][:3]})


@pytest.mark.parametrize("impl", ["local", "local-zarr", "inprocess-column", "ray-row"])
def test_zero_grad_flush_and_prefetch(make, impl):
    spec = OptimizerSpec("sgd", lr=1.0)
    table = make(impl, spec)
    before = table.read_rows(0, ROWS)["weight"]
    idx, scores, dy = next(_batches(1))
    table.lookup(idx, scores.requires_grad_(True)).backward(dy)
    table.zero_grad()
    assert table.step() == StepResult(0, 0.0)  # nothing pending: nothing moves
    table.prefetch(torch.arange(0, ROWS, 3))  # a hint never changes a value
    table.flush()
    torch.testing.assert_close(table.read_rows(0, ROWS)["weight"], before, rtol=0, atol=0)
    stats = table.stats()
    assert stats and all(isinstance(s, dict) for s in stats)
    assert str(ROWS) in table.describe()


@pytest.mark.parametrize("impl", ["local", "inprocess-row", "collective-column"])
def test_rows_outside_the_table_are_refused(make, impl):
    table = make(impl, OptimizerSpec())
    with pytest.raises(IndexOutOfRangeError, match=f"{ROWS}"):
        table.lookup(torch.tensor([[1, ROWS]]), torch.ones(1, 2))


def test_the_reference_is_what_the_paper_defines():
    """The reference's pieces checked by hand on a 2-row bag (so the suite's oracle is not
    the code under test): y = 0.25 V[3] + 0.75 V[9]."""
    ref = Reference(OptimizerSpec("sgd", lr=1.0))
    idx, scores = torch.tensor([[3, 9]]), torch.tensor([[0.25, 0.75]])
    y = ref.lookup(idx, scores)
    torch.testing.assert_close(y[0], 0.25 * ref.V[3] + 0.75 * ref.V[9])
    dy = torch.ones(1, DIM)
    ds = ref.backward(idx, scores, dy)
    torch.testing.assert_close(ds[0], torch.stack([ref.V[3].sum(), ref.V[9].sum()]))
    v3 = ref.V[3].clone()
    result = ref.step(1.0)
    assert result.rows == 2
    assert result.grad_norm == pytest.approx(math.sqrt(DIM * (0.25**2 + 0.75**2)))
    torch.testing.assert_close(ref.V[3], v3 - 0.25, rtol=1e-6, atol=1e-6)


def _train(table, batches):
    for idx, scores, dy in batches:
        table.lookup(idx, scores.clone().requires_grad_(True)).backward(dy)
        table.step()


def _row_locks(table):
    """The locks a save's reads take, where this process can hold them."""
    if isinstance(table, LocalTable):
        return [table.rows.lock]
    return [server.rows.lock for server in table.transport.servers]


def _assert_same_state(got, want):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


SAVING = [
    "local",
    "local-zarr",
    "inprocess-row",
    "inprocess-column",
    "ray-row",
    "collective-column",
]


@pytest.mark.parametrize("impl", SAVING)
def test_a_save_holds_the_table_of_the_step_it_began_at(make, impl, tmp_path):
    """Steps taken while the regions are written do not reach the save: each region keeps
    the old values of rows a step changes before the writer has read them."""
    spec = OptimizerSpec("adam", lr=0.05)
    table = make(impl, spec)
    _train(table, _batches(2))
    table.flush()
    at_begin = table.state_dict()
    target = FolderTarget(tmp_path / "ck")
    with contextlib.ExitStack() as held:
        # Where it can, the test holds the writers back until the steps below are done,
        # so every changed row goes through the copy-on-write path.
        for lock in _row_locks(table) if impl.startswith(("local", "inprocess")) else []:
            held.enter_context(lock)
        pending = table.begin_save(target, "t")
        _train(table, _batches(3))
    objects = pending.result()
    assert all(p["done"] and p["rows_done"] == p["rows_total"] for p in pending.progress())
    table.flush()
    assert not torch.equal(table.read_rows(0, ROWS)["weight"], at_begin["weight"])
    fresh = LocalTable(ROWS, DIM, spec, seed=SEED + 1)
    fresh.load([Source(target, objects)], "t")
    _assert_same_state(fresh.state_dict(), at_begin)


@pytest.mark.parametrize("impl", SAVING)
def test_incremental_saves_hold_the_changed_rows_and_chain_to_the_table(make, impl, tmp_path):
    spec = OptimizerSpec("adam", lr=0.05)
    table = make(impl, spec)
    _train(table, _batches(1))
    root = FolderTarget(tmp_path / "ck")
    chain = [Source(root.child("s0"), table.save(root.child("s0"), "t"))]
    g = torch.Generator().manual_seed(3)
    for k in (1, 2):
        idx = torch.randint(20 * k, 20 * k + 40, (6, 4), generator=g)  # rows 20k .. 20k+39
        _train(table, [(idx, torch.rand(6, 4, generator=g), torch.randn(6, DIM, generator=g))])
        objects = table.save(root.child(f"s{k}"), "t", changed_only=True)
        chain.append(Source(root.child(f"s{k}"), objects))
        saved = zarr.open_group(str(tmp_path / "ck" / f"s{k}" / "t"), mode="r")
        assert saved.attrs["kind"] == "delta"
        rows = set()
        for _name, region in saved.groups():
            rows |= set(region["rows"][:].tolist())
        assert rows == set(idx.unique().tolist())  # exactly the rows the step changed
    table.flush()
    fresh = LocalTable(ROWS, DIM, spec, seed=SEED + 1)
    fresh.load(chain, "t")
    _assert_same_state(fresh.state_dict(), table.state_dict())
    with pytest.raises(CheckpointError, match="form no chain"):
        fresh.load(chain[1:], "t")


class _FailingTarget(FolderTarget):
    def put_tree(self, key_prefix, local_dir):
        raise OSError("disk full")


@pytest.mark.parametrize("impl", ["local", "inprocess-row"])
def test_a_failed_save_keeps_its_rows_for_the_next_incremental_one(make, impl, tmp_path):
    spec = OptimizerSpec("sgd", lr=0.5)
    table = make(impl, spec)
    root = FolderTarget(tmp_path / "ck")
    chain = [Source(root.child("full"), table.save(root.child("full"), "t"))]
    _train(table, _batches(1))
    with pytest.raises(CheckpointError, match="disk full"):
        table.save(_FailingTarget(tmp_path / "bad"), "t", changed_only=True)
    objects = table.save(root.child("delta"), "t", changed_only=True)
    chain.append(Source(root.child("delta"), objects))
    fresh = LocalTable(ROWS, DIM, spec, seed=SEED + 1)
    fresh.load(chain, "t")
    _assert_same_state(fresh.state_dict(), table.state_dict())


class RecordingTransport(InProcessTransport):
    """Shard servers in this process (each request answered when sent); records the
    requests in the order they were sent."""

    def __init__(self, servers):
        super().__init__(servers)
        self.sent = []

    def submit(self, shard, req):
        self.sent.append(type(req).__name__)
        return super().submit(shard, req)


def _recorded(spec):
    plan = make_plan("row", ROWS, DIM, 2)
    transport = RecordingTransport(
        [ShardServer(r, "row", DIM, spec, seed=SEED) for r in plan.regions]
    )
    return RemoteTable(plan, transport, spec), transport


def _two_micro_batches(table, expect=None):
    """Two lookups, then (after ``expect_step(expect)``) their backwards; returns what
    the table had sent after each backward."""
    outs = []
    for idx, scores, dy in _batches(2):
        outs.append((table.lookup(idx, scores.clone().requires_grad_(True)), dy))
    if expect is not None:
        table.expect_step(expect)
    sent = []
    for y, dy in outs:
        y.backward(dy)
        sent.append(list(table.transport.sent))
    return sent


@pytest.mark.parametrize("clip", [None, 0.05])
def test_an_announced_step_goes_out_behind_the_last_backward(clip):
    """After ``expect_step`` a remote table sends its step right behind the backward of
    the last lookup awaiting one (not before), and ``step_async`` only collects it; the
    rows are those of a step sent the usual way. With clipping the step needs the norm
    first: the norm's requests go out there instead, the step at ``step_async``."""
    spec = OptimizerSpec("adam", lr=0.05, grad_clip=clip)
    (early, transport), (plain, _) = _recorded(spec), _recorded(spec)
    first, last = _two_micro_batches(early, expect=0.5)
    _two_micro_batches(plain)
    assert "Step" not in first  # one lookup still awaited its backward
    ahead = "Step" if clip is None else "GradNorm"
    assert last[-4:] == ["KeptBackward", "KeptBackward", ahead, ahead]
    sent = len(transport.sent)
    got, want = early.step_async(0.5).wait(), plain.step_async(0.5).wait()
    assert transport.sent[sent:] == ([] if clip is None else ["Step"] * 2)
    assert (got.rows, got.grad_norm) == (want.rows, want.grad_norm)
    for key, value in plain.read_rows(0, ROWS).items():
        torch.testing.assert_close(early.read_rows(0, ROWS)[key], value, rtol=0, atol=0, msg=key)


def test_an_announced_norm_must_keep_its_scale():
    table, _ = _recorded(OptimizerSpec("sgd", lr=0.05, grad_clip=0.05))
    _two_micro_batches(table, expect=0.5)
    with pytest.raises(ConfigError, match=r"the gradient norm was sent with 0.5 already"):
        table.step_async(1.0)


def test_an_announced_step_must_keep_its_scale():
    table, transport = _recorded(OptimizerSpec("sgd", lr=0.05))
    _two_micro_batches(table, expect=0.5)
    with pytest.raises(
        ConfigError, match=r"step\(grad_scale=1.0\) after expect_step\(grad_scale=0.5\)"
    ):
        table.step_async(1.0)
    table.expect_step(0.5)  # announced, but no backward came: the step goes out when asked
    sent = len(transport.sent)
    table.step_async(0.5).wait()
    assert transport.sent[sent:] == ["Step", "Step"]
