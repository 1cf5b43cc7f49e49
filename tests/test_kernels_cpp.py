"""The C++ CPU kernels' own promises, beyond matching the reference (test_kernels*.py).

The value gradient equals the torch path's bit for bit; every result is the same on 1
and 2 threads; a row-wise shard's own entries (bags of any length) give the same bits as
the whole bags, and a column-wise shard's lookup its columns of the whole one; bf16 tables fall back to the torch path; the half-key top-k matches einsum + topk.
"""

import pytest
import torch

from memdist import kernels
from memdist.errors import ConfigError, IndexOutOfRangeError, ShapeError
from memdist.kernels import OptimizerSpec, cpp_ops, torch_ops

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="no C++ compiler here")


def inputs(n=64, k=32, v=300, d=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(v, d, generator=g)
    idx = torch.randint(0, v, (n, k), generator=g)
    idx[:, :4] = 7  # a hot row, read several times per bag
    return values, idx, torch.rand(n, k, generator=g), torch.randn(n, d, generator=g)


def test_value_gradient_equals_the_torch_path_bitwise():
    _, idx, scores, dy = inputs()
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="cpp")
    rows_t, grad_t = kernels.bag_backward_values(idx, scores, dy, backend="torch")
    assert torch.equal(rows, rows_t) and torch.equal(grad, grad_t)


def run_all(values, idx, scores, dy):
    out = [kernels.bag_forward(values, idx, scores, backend="cpp")]
    out.append(kernels.bag_backward_scores(values, idx, dy, backend="cpp"))
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="cpp")
    out.append(grad)
    out += kernels.bag_backward(values, idx, scores, dy, backend="cpp")
    idx_e, scores_e, offsets, _ = own_entries(idx, scores, idx % 3 != 0)
    out.append(kernels.entries_forward(values, idx_e, scores_e, offsets, backend="cpp"))
    out += kernels.entries_backward(values, idx_e, scores_e, offsets, dy, backend="cpp")
    for name in ("sgd", "adagrad", "adam"):
        table = values.clone()
        state = kernels.init_optimizer_state(name, *values.shape)
        for _ in range(2):
            kernels.sparse_update_(OptimizerSpec(name, lr=0.1, weight_decay=0.01), table,
                                   state, rows, grad, backend="cpp")  # fmt: skip
        out += [table, *state.values()]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_backwards_in_one_pass_give_each_ones_bits(dtype):
    values, idx, scores, dy = inputs(n=512, k=64, v=2000, d=128)
    values = values.to(dtype)
    dscores, rows, grad = kernels.bag_backward(values, idx, scores, dy, backend="cpp")
    assert torch.equal(dscores, kernels.bag_backward_scores(values, idx, dy, backend="cpp"))
    rows_t, grad_t = kernels.bag_backward_values(idx, scores, dy, backend="torch")
    assert torch.equal(rows, rows_t) and torch.equal(grad, grad_t)
    idx[3, 5] = 2000
    with pytest.raises(IndexOutOfRangeError, match=r"index 2000 at position \(3, 5\)"):
        kernels.bag_backward(values, idx, scores, dy, backend="cpp")


def test_results_do_not_depend_on_thread_count():
    # Large enough that the kernels split the work between threads.
    args = inputs(n=512, k=64, v=2000, d=128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(*args)
        torch.set_num_threads(2)
        two = run_all(*args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def own_entries(idx, scores, mine):
    """A row-wise shard's entries (``mine``): in flat position order, bags of any length."""
    positions = mine.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(idx.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = mine.sum(1).cumsum(0)
    return idx.reshape(-1)[positions], scores.reshape(-1)[positions], offsets, positions


@pytest.mark.parametrize("d", [128, 72, 33])  # whole 32-column blocks, and tails
def test_a_row_wise_shards_own_entries_give_the_same_bits(d):
    """What cluster/shard.py computes for a row-wise region: only its entries, in bags of
    any length (some empty, some whole), as the whole bags with the others weighing zero:
    the same sums in the same order, so the same bits, and its rows' gradients those of
    the whole table."""
    values, idx, scores, dy = inputs(n=200, k=40, v=300, d=d)
    idx[5] = 200  # a bag wholly another shard's
    idx[6] = 9  # one wholly this shard's
    mine = idx < 150
    idx_e, scores_e, offsets, positions = own_entries(idx, scores, mine)
    masked = torch.where(mine, idx, 0)
    y = kernels.entries_forward(values, idx_e, scores_e, offsets, backend="cpp")
    assert torch.equal(y, kernels.bag_forward(values, masked, scores * mine, backend="cpp"))
    ds, rows, grad = kernels.entries_backward(values, idx_e, scores_e, offsets, dy, backend="cpp")
    whole_ds, whole_rows, whole_grad = kernels.bag_backward(values, idx, scores, dy, backend="cpp")
    assert torch.equal(ds, whole_ds.reshape(-1)[positions])
    assert torch.equal(rows, whole_rows[whole_rows < 150])
    assert torch.equal(grad, whole_grad[whole_rows < 150])


@pytest.mark.parametrize("d", [128, 72, 33])  # whole 32-column blocks, and tails
def test_forward_gives_a_column_shard_the_same_bits(d):
    """A column-wise shard's lookup over its columns equals those columns of the whole
    table's: each output column is summed in bag order on its own."""
    values, idx, scores, _ = inputs(n=300, k=40, v=500, d=d)
    whole = kernels.bag_forward(values, idx, scores, backend="cpp")
    for lo, hi in ((0, d // 2), (d // 2, d), (5, d - 3)):
        part = kernels.bag_forward(values[:, lo:hi].contiguous(), idx, scores, backend="cpp")
        assert torch.equal(part, whole[:, lo:hi])
    y_ref = torch.nn.functional.embedding_bag(idx, values, per_sample_weights=scores, mode="sum")
    torch.testing.assert_close(whole, y_ref, rtol=1e-5, atol=1e-5 * 40**0.5)


def test_gradient_memory_is_kept_for_the_next_backward_and_fully_rewritten():
    values, idx, scores, dy = inputs(n=512, k=64, v=20000, d=128)
    _, rows, grad = kernels.bag_backward(values, idx, scores, dy, backend="cpp")
    first = grad.data_ptr()
    grad.fill_(float("nan"))  # what the next call finds in the memory
    del grad
    idx2 = idx[:, :60]  # a few rows fewer: the kept buffer is large enough
    dscores, rows2, grad2 = kernels.bag_backward(values, idx2, scores[:, :60], dy, backend="cpp")
    assert grad2.data_ptr() == first
    rows_t, grad_t = kernels.bag_backward_values(idx2, scores[:, :60], dy, backend="torch")
    assert torch.equal(rows2, rows_t) and torch.equal(grad2, grad_t)
    _, none = kernels.bag_backward_values(idx[:0], scores[:0], dy[:0], backend="cpp")
    assert none.shape == (0, 128)


def test_adam_bias_corrections_are_kept_and_grow_past_the_longest_step_count():
    beta = 0.875  # a beta of this test's own: the table starts empty
    first = cpp_ops.bias_corrections(beta, 10)
    assert cpp_ops.bias_corrections(beta, first.numel() - 1) is first  # kept
    grown = cpp_ops.bias_corrections(beta, first.numel() + 5000)
    assert grown.numel() > first.numel() + 5000
    t = torch.arange(grown.numel())
    assert torch.equal(grown, (1 - beta ** t.double()).float())  # float64, then rounded


def test_bf16_tables_use_the_torch_path():
    values, idx, scores, dy = inputs()
    values = values.to(torch.bfloat16)
    expect = kernels.bag_backward_scores(values, idx, dy, backend="torch")
    assert torch.equal(kernels.bag_backward_scores(values, idx, dy, backend="cpp"), expect)


def test_cpp_backend_refuses_non_cpu_tensors():
    values, idx, scores, _ = inputs()
    with pytest.raises(ConfigError, match="backend='cpp' runs on CPU tensors, got meta"):
        kernels.bag_forward(values.to("meta"), idx.to("meta"), scores.to("meta"), backend="cpp")


@pytest.mark.parametrize("c, q", [(10, 6), (64, 32), (300, 3)])
def test_half_key_topk_matches_einsum_topk_with_gradients(c, q):
    g = torch.Generator().manual_seed(c)
    q_NHQ = torch.randn(40, 3, q, generator=g)
    keys_HCQ = torch.randn(3, c, q, generator=g)
    out = {}
    for backend in ("cpp", "reference"):
        qq, kk = q_NHQ.clone().requires_grad_(), keys_HCQ.clone().requires_grad_()
        vals, idx = kernels.half_key_topk(qq, kk, 5, backend=backend)
        (vals * torch.arange(1.0, 6.0)).sum().backward()
        out[backend] = vals.detach(), idx, qq.grad, kk.grad
    (v, i, dq, dk), (v_ref, i_ref, dq_ref, dk_ref) = out["cpp"], out["reference"]
    assert torch.equal(i, i_ref) and i.dtype == torch.int64
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, dk_ref, rtol=1e-5, atol=1e-5)


def test_half_key_topk_breaks_ties_by_lower_index_and_never_returns_nan_keys():
    keys_HCQ = torch.tensor([[[1.0], [2.0], [2.0], [float("nan")], [0.5]]])
    vals, idx = kernels.half_key_topk(torch.ones(1, 1, 1), keys_HCQ, 3, backend="cpp")
    assert idx.tolist() == [[[1, 2, 0]]] and vals.tolist() == [[[2.0, 2.0, 1.0]]]


@pytest.mark.parametrize(
    ("c", "knn", "levels"),
    [(64, 16, 3), (64, 16, 1), (50, 7, 5), (200, 80, 4), (600, 4, 6), (64, 16, 0)],
)  # radix select (early stop, all keys equal), more than 64 picked, the insertion path
def test_half_key_topk_selects_like_the_reference_among_many_ties(c, knn, levels):
    g = torch.Generator().manual_seed(c + knn)
    keys_HCQ = torch.randn(2, c, 1, generator=g)
    if levels:  # few distinct scores: ties straddle the knn-th place
        keys_HCQ = (keys_HCQ * levels).round() / levels
    q_NHQ = torch.randn(30, 2, 1, generator=g).sign()  # negative and positive scores
    vals, idx = kernels.half_key_topk(q_NHQ, keys_HCQ, knn, backend="cpp")
    # The promised order: score descending, equal scores lower index first (a stable
    # sort; torch.topk, the reference's, leaves the order of ties open).
    scores_NHC = (q_NHQ.unsqueeze(2) * keys_HCQ.unsqueeze(0)).sum(-1)
    want_vals, want_idx = scores_NHC.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(idx, want_idx[..., :knn]) and torch.equal(vals, want_vals[..., :knn])


def test_best_pairs_break_equal_sums_in_flat_order():
    g = torch.Generator().manual_seed(1)
    top1, top2 = (torch.randint(0, 3, (40, 2, 16), generator=g).float().sort(-1, descending=True)
                  .values for _ in range(2))  # fmt: skip
    sums = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)
    flat = sums.sort(dim=-1, descending=True, stable=True).indices[..., :16]
    r1, r2 = kernels.best_pairs(top1, top2, backend="cpp")
    assert torch.equal(r1, flat // 16) and torch.equal(r2, flat % 16)


def test_half_key_topk_threads_and_errors():
    g = torch.Generator().manual_seed(0)
    q_NHQ, keys_HCQ = torch.randn(256, 4, 8, generator=g), torch.randn(4, 512, 8, generator=g)
    dv = torch.randn(256, 4, 16, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            qq, kk = q_NHQ.clone().requires_grad_(), keys_HCQ.clone().requires_grad_()
            vals, idx = kernels.half_key_topk(qq, kk, 16, backend="cpp")
            vals.backward(dv)
            results.append((vals, idx, qq.grad, kk.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with pytest.raises(ConfigError, match="knn=513 must be in"):
        kernels.half_key_topk(q_NHQ, keys_HCQ, 513, backend="cpp")
    with pytest.raises(ShapeError, match="must be"):
        kernels.half_key_topk(q_NHQ, keys_HCQ[:3], 4, backend="cpp")


@pytest.mark.parametrize("knn", [1, 4, 16])
def test_best_pairs_match_all_pairs_on_every_backend(knn):
    g = torch.Generator().manual_seed(knn)
    top1, top2 = (torch.randn(50, 3, knn, generator=g).sort(-1, descending=True).values
                  for _ in range(2))  # fmt: skip
    expect = kernels.best_pairs(top1, top2, backend="reference")
    for backend in ("cpp", "torch"):
        r1, r2 = kernels.best_pairs(top1, top2, backend=backend)
        assert torch.equal(r1, expect[0]) and torch.equal(r2, expect[1]), backend
    with pytest.raises(ShapeError, match="must both be"):
        kernels.best_pairs(top1, top2[:, :2], backend="cpp")


@pytest.mark.parametrize("knn, levels", [(16, 0), (4, 0), (16, 2)])  # levels: tied sums
def test_product_pairs_match_the_reference_with_gradients_on_any_thread_count(knn, levels):
    g = torch.Generator().manual_seed(knn + levels)
    top1, top2 = (torch.randn(3000, 2, knn, generator=g).sort(-1, descending=True).values
                  for _ in range(2))  # fmt: skip
    if levels:
        top1, top2 = (t.mul(levels).round().div(levels) for t in (top1, top2))
    i1, i2 = (torch.randint(0, 50, (3000, 2, knn), generator=g) for _ in range(2))
    dbest = torch.randn(3000, 2, knn, generator=g)
    out = {}
    threads = torch.get_num_threads()
    try:
        for backend, t in (("reference", threads), ("cpp", 1), ("cpp", 2)):
            torch.set_num_threads(t)
            a, b = top1.clone().requires_grad_(), top2.clone().requires_grad_()
            best, rows = kernels.product_pairs(a, i1, b, i2, 50, backend=backend)
            best.backward(dbest)
            out[backend, t] = best.detach(), rows, a.grad, b.grad
    finally:
        torch.set_num_threads(threads)
    assert all(map(torch.equal, out["cpp", 1], out["cpp", 2]))
    # What the ranks make through gathers (tied sums ranked as best_pairs promises).
    r1, r2 = kernels.best_pairs(top1, top2, backend="cpp")
    a, b = top1.clone().requires_grad_(), top2.clone().requires_grad_()
    best = a.gather(-1, r1) + b.gather(-1, r2)
    best.backward(dbest)
    expect = best.detach(), i1.gather(-1, r1) * 50 + i2.gather(-1, r2), a.grad, b.grad
    assert all(map(torch.equal, out["cpp", 1], expect))
    if not levels:  # the reference's top-k leaves the order of ties open
        assert all(map(torch.equal, out["cpp", 1], out["reference", threads]))
    assert out["cpp", 1][1].dtype == torch.int64
    with pytest.raises(ShapeError, match="must have the shapes of their top-k lists"):
        kernels.product_pairs(top1, i1[:, :1], top2, i2, 50, backend="cpp")


# Few rows: a counting sort; more than 4 per position: a radix sort of 1 to 4 passes.
@pytest.mark.parametrize("v", [5, 300, 5000, 70000, 10**7, 2**40])
def test_reverse_index_equals_the_stable_sort(v):
    g = torch.Generator().manual_seed(v % 10**6)
    idx = torch.randint(0, v, (40, 9), generator=g)
    idx[3] = v - 1
    idx[5, :6] = idx[7, 2]  # a row at several positions, in two bags
    expect = torch_ops.reverse_index(idx)
    got = cpp_ops.reverse_index(idx)
    assert all(torch.equal(a, b) for a, b in zip(got, expect, strict=True))
    pool = torch.randint(0, v, (50,), generator=g)  # many repeats of a few rows
    idx = pool[torch.randint(0, 50, (300, 64), generator=g)]
    expect = torch_ops.reverse_index(idx)
    assert all(torch.equal(a, b) for a, b in zip(cpp_ops.reverse_index(idx), expect, strict=True))


def test_large_tables_ask_for_huge_pages_and_stay_plain_tensors():
    t = cpp_ops.empty_table((cpp_ops.HUGE_PAGE_MIN_BYTES // 4 + 3,), torch.float32, "cpu")
    t.fill_(2.0)  # the advice changes how pages are backed, never what they hold
    assert t.is_contiguous() and float(t[::4096].sum()) == 2.0 * t[::4096].numel()
    small = cpp_ops.empty_table((3, 4), torch.float32, "cpu")
    assert small.shape == (3, 4)


@pytest.mark.parametrize("shape", [(0, 8), (1, 3), (300, 37), (4096, 128)])
def test_sum_squares_matches_float64_and_not_the_thread_count(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    expect = float(g.double().pow(2).sum())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.sum_squares(g, backend="cpp")
        torch.set_num_threads(max(2, threads))
        two = kernels.sum_squares(g, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert one == two
    assert one == pytest.approx(expect, rel=1e-12, abs=0.0)
    assert kernels.sum_squares(g, backend="torch") == pytest.approx(expect, rel=1e-12, abs=0.0)
    # A strided or bf16 gradient takes the torch path and gives the same value.
    assert kernels.sum_squares(g.t().contiguous().t(), backend="cpp") == pytest.approx(one)
    with pytest.raises(ShapeError, match=r"gradient must be 2-D"):
        kernels.sum_squares(g.reshape(-1), backend="cpp")


@pytest.mark.parametrize("q", [32, 6, 20])  # whole lanes, a tail only, lanes and a tail
def test_query_norm_matches_the_reference_with_gradients_on_any_thread_count(q):
    g = torch.Generator().manual_seed(q)
    q_NH2Q = torch.randn(2000, 3, 2, q, generator=g) * 3  # rows split between threads
    gain_H2Q = torch.empty(3, 2, q).uniform_(0.2, 3.0, generator=g)
    d1, d2 = torch.randn(2000, 3, q, generator=g), torch.randn(2000, 3, q, generator=g)
    out = {}
    threads = torch.get_num_threads()
    try:
        for backend, t in (("reference", threads), ("cpp", 1), ("cpp", 2)):
            torch.set_num_threads(t)
            qq, gg = q_NH2Q.clone().requires_grad_(), gain_H2Q.clone().requires_grad_()
            h1, h2 = kernels.query_norm(qq, gg, q**-0.5, backend=backend)
            assert h1.shape == h2.shape == (2000, 3, q)
            ((h1 * d1).sum() + (h2 * d2).sum()).backward()
            out[backend, t] = h1.detach(), h2.detach(), qq.grad, gg.grad
    finally:
        torch.set_num_threads(threads)
    assert all(h.is_contiguous() for h in out["cpp", 1][:2])
    assert all(map(torch.equal, out["cpp", 1], out["cpp", 2]))
    for got, want in zip(out["cpp", 1], out["reference", threads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match=r"must be \(N, H, 2, Q\) and \(H, 2, Q\)"):
        kernels.query_norm(q_NH2Q, gain_H2Q[:2], 1.0, backend="cpp")


def test_parked_gives_back_what_the_wait_returns_or_raises_on_any_thread_count():
    """``cpp_ops.parked`` runs a transport's wait with the other OpenMP threads asleep:
    the wait's result and its exception come back unchanged, torch ops inside still run
    (on the calling thread), and a parked call inside another one is a plain call."""

    class LateError(Exception):
        pass

    def raise_late():
        raise LateError("memory shard 3 did not answer")

    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.ones(1 << 20).mul_(2.0)  # a parallel region first: the team exists
            assert cpp_ops.parked(lambda n=n: ("replies", n)) == ("replies", n)
            with pytest.raises(LateError, match="shard 3"):
                cpp_ops.parked(raise_late)
            total = cpp_ops.parked(lambda: float(torch.arange(1 << 20, dtype=torch.float64).sum()))
            assert total == (1 << 20) * ((1 << 20) - 1) / 2
            assert cpp_ops.parked(lambda: cpp_ops.parked(lambda: 7)) == 7
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 9, 33])
def test_row_entries_split_a_lookup_as_the_masks_do(shards):
    """The C++ split of a lookup's entries among row shards (a branchless one up to 8
    shards, cursors past that) gives the parts of the torch path's mask per shard, on 1
    and 2 threads, with bags wholly in one shard, empty bags and the regions' edges."""
    from memdist.cluster.plan import make_plan
    from memdist.remote import RowEntries

    g = torch.Generator().manual_seed(shards)
    rows = 1000
    plan = make_plan("row", rows, 8, shards)
    edges = torch.tensor(
        [r.row_start for r in plan.regions] + [r.row_stop - 1 for r in plan.regions]
    )
    idx_NK = torch.randint(0, rows, (300, 17), generator=g)
    idx_NK[0] = 0  # a whole bag in the first shard: empty in the others
    idx_NK[1] = edges[torch.arange(17) % edges.numel()]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for lookup in (idx_NK, idx_NK[:, :0], idx_NK[:1]):
                got = RowEntries.split(lookup, plan)
                want = RowEntries.split_by_masks(lookup, plan)
                assert got.shape == want.shape and len(got.parts) == shards
                for (pos, off), (pos_w, off_w) in zip(got.parts, want.parts, strict=True):
                    assert torch.equal(pos, pos_w) and off.dtype == off_w.dtype == torch.int32
                    assert torch.equal(off, off_w)
    finally:
        torch.set_num_threads(threads)
