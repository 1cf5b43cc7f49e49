"""Kernels against torch's F.embedding_bag: forward, both gradients, sparse optimizers.

The Triton kernels run under the interpreter on CPU and compiled on CUDA; the same
cases check the fast torch path. Inputs are kept small so the interpreter is quick.
"""

import pytest
import torch
import torch.nn.functional as F

from memdist import kernels
from memdist.errors import ConfigError, IndexOutOfRangeError, ShapeError
from memdist.kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
# (bags N, bag size K, rows V, width D, index pattern)
CASES = [
    (16, 1, 50, 1, "random"),
    (8, 7, 40, 33, "random"),
    (6, 64, 100, 100, "repeated"),
    (2, 512, 1000, 128, "random"),
    (3, 512, 1000, 33, "repeated"),
]


def make_inputs(n, k, v, d, pattern, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(v, d, generator=g).to(dtype)
    if pattern == "repeated":
        idx = torch.tensor([3, v - 1, 7])[torch.randint(0, 3, (n, k), generator=g)]
    else:
        idx = torch.randint(0, v, (n, k), generator=g)
    scores = torch.rand(n, k, generator=g).to(dtype)
    dy = torch.randn(n, d, generator=g)
    return values.to(DEVICE), idx.to(DEVICE), scores.to(DEVICE), dy.to(DEVICE)


def torch_reference(values, idx, scores, dy):
    """F.embedding_bag with autograd on fp32 copies: output, dense dvalues, dscores."""
    v = values.detach().clone().float().requires_grad_(True)
    s = scores.detach().clone().float().requires_grad_(True)
    y = F.embedding_bag(idx, v, per_sample_weights=s, mode="sum")
    y.backward(dy)
    return y.detach(), v.grad, s.grad


def densify(rows, grad, num_rows):
    dense = torch.zeros(num_rows, grad.shape[1], device=grad.device)
    dense[rows] = grad
    return dense


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}K{c[1]}D{c[3]}-{c[4]}" for c in CASES])
def test_bag_matches_embedding_bag(backend, dtype, case):
    n, k, v, d, pattern = case
    values, idx, scores, dy = make_inputs(n, k, v, d, pattern, dtype)
    y_ref, dv_ref, ds_ref = torch_reference(values, idx, scores, dy)
    # Both paths read the same (possibly bf16) inputs and accumulate in fp32; rounding
    # differences of a sum grow like the square root of its number of terms.
    terms = (n * k) ** 0.5
    tol = (
        dict(rtol=1e-5, atol=1e-5 * terms)
        if dtype == torch.float32
        else dict(rtol=1e-4, atol=1e-4 * terms)
    )
    y = kernels.bag_forward(values, idx, scores, backend=backend)
    torch.testing.assert_close(y, y_ref, **tol)
    ds = kernels.bag_backward_scores(values, idx, dy, backend=backend)
    torch.testing.assert_close(ds, ds_ref, **tol)
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    assert torch.equal(rows, torch.unique(idx))
    assert rows.dtype == torch.int64 and grad.dtype == torch.float32
    torch.testing.assert_close(densify(rows, grad, v), dv_ref, **tol)
    if dtype == torch.bfloat16:
        # And against torch's own bf16 embedding_bag, within bf16's precision.
        y_bf16 = F.embedding_bag(idx, values, per_sample_weights=scores, mode="sum")
        torch.testing.assert_close(y.to(torch.bfloat16), y_bf16, rtol=2e-2, atol=2e-2 * k**0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_gradient_is_deterministic(backend):
    values, idx, scores, dy = make_inputs(4, 256, 50, 40, "repeated", torch.float32)
    rows1, grad1 = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    rows2, grad2 = kernels.bag_backward_values(idx, scores, dy, backend=backend)
    assert torch.equal(rows1, rows2) and torch.equal(grad1, grad2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_update_matches_reference(backend, optimizer, dtype):
    g = torch.Generator().manual_seed(1)
    v, d = 30, 37
    values = torch.randn(v, d, generator=g).to(dtype).to(DEVICE)
    expect = values.clone()
    state = kernels.init_optimizer_state(optimizer, v, d, DEVICE)
    state_ref = {k: t.clone() for k, t in state.items()}
    row_sets = [[0, 3, 5, 9], [3, 4, 5, 28], [9, 28, 29]]  # overlapping across steps
    for step, rows in enumerate(row_sets):
        rows_U = torch.tensor(rows, device=DEVICE)
        grad = torch.randn(len(rows), d, generator=g).to(DEVICE)
        kw = dict(lr=0.05, eps=1e-8, betas=(0.9, 0.99), weight_decay=0.01 * step)
        kernels.sparse_update_(optimizer, values, state, rows_U, grad, backend=backend, **kw)
        reference.sparse_update_(optimizer, expect, state_ref, rows_U, grad, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(values.float(), expect.float(), **tol)
    for key in state:
        torch.testing.assert_close(state[key], state_ref[key], rtol=1e-5, atol=1e-7)
    untouched = sorted(set(range(v)) - {r for rs in row_sets for r in rs})
    before = torch.randn(v, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    assert torch.equal(values[untouched], before[untouched])
    for t in state.values():
        assert not t[untouched].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_function_gives_scores_grad_and_feeds_the_sink(backend):
    values, idx, scores, dy = make_inputs(5, 9, 20, 12, "random", torch.float32)
    y_ref, dv_ref, ds_ref = torch_reference(values, idx, scores, dy)
    received = []
    s = scores.detach().clone().requires_grad_(True)
    y = kernels.weighted_embedding_bag(
        values, idx, s, lambda r, g: received.append((r, g)), backend=backend
    )
    # A non-contiguous output gradient must work too.
    y.backward(dy.t().contiguous().t())
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, ds_ref, rtol=1e-5, atol=1e-5)
    ((rows, grad),) = received
    torch.testing.assert_close(densify(rows, grad, 20), dv_ref, rtol=1e-5, atol=1e-5)
    assert values.grad is None


def test_out_of_range_indices_name_the_value():
    values = torch.zeros(10, 4)
    scores = torch.ones(2, 3)
    with pytest.raises(IndexOutOfRangeError, match=r"index 10 at position \(1, 2\) .* 10 rows"):
        kernels.bag_forward(values, torch.tensor([[0, 1, 2], [3, 4, 10]]), scores)
    with pytest.raises(IndexOutOfRangeError, match=r"index -1 at position \(0, 0\)"):
        kernels.bag_forward(values, torch.tensor([[-1, 1, 2], [3, 4, 5]]), scores)
    with pytest.raises(IndexOutOfRangeError, match="index 12 .* 10 rows"):
        kernels.sparse_update_("sgd", values, {}, torch.tensor([1, 12]), torch.zeros(2, 4), lr=1.0)


def test_int64_indices_beyond_2_to_the_32():
    big = 2**32 + 5
    kernels.check_indices(torch.tensor([[big, 0]]), 2**33)
    with pytest.raises(IndexOutOfRangeError, match=f"index {big}"):
        kernels.check_indices(torch.tensor([[0, big]]), 2**32)


def test_shape_dtype_and_name_errors():
    values, idx, scores = torch.zeros(10, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(
        ShapeError, match=r"scores shape \(2, 2\) must equal indices shape \(2, 3\)"
    ):
        kernels.bag_forward(values, idx, scores[:, :2])
    with pytest.raises(ShapeError, match="indices must be a 2-D int64"):
        kernels.bag_forward(values, idx.float(), scores)
    with pytest.raises(ShapeError, match=r"output gradient has shape \(2, 5\), expected \(2, 4\)"):
        kernels.bag_backward_scores(values, idx, torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="backend='cuda-magic'"):
        kernels.bag_forward(values, idx, scores, backend="cuda-magic")
    with pytest.raises(ConfigError, match="'rmsprop' must be one of"):
        kernels.init_optimizer_state("rmsprop", 10, 4)
    with pytest.raises(ShapeError, match=r"gradient shape \(1, 4\) must be \(2, 4\)"):
        kernels.sparse_update_("sgd", values, {}, torch.tensor([1, 2]), torch.zeros(1, 4), lr=1.0)
