"""Sparse optimizer updates (sgd, row-wise adagrad, lazy adam) against the reference.

Each backend runs several steps over overlapping row sets and must match the
row-by-row reference; rows never touched, and their state, must not change at all.
"""

import pytest
import torch

from memdist import kernels
from memdist.errors import ConfigError, DataError, IndexOutOfRangeError, ShapeError
from memdist.kernels import OptimizerSpec, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPP = pytest.param(
    "cpp", marks=pytest.mark.skipif(DEVICE.type != "cpu", reason="C++ kernels run on CPU tensors")
)
BACKENDS = [CPP, "torch", pytest.param("triton", marks=pytest.mark.triton)]
OPTIMIZERS = ["sgd", "adagrad", "adam"]


def update(optimizer, values, state, rows_U, grad_UD, *, backend="auto", **spec):
    kernels.sparse_update_(
        OptimizerSpec(optimizer, **spec), values, state, rows_U, grad_UD, backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [37, 1500])  # 1500: a row tile of 2048, wider than 1024
def test_sparse_update_matches_reference(backend, optimizer, dtype, d):
    g = torch.Generator().manual_seed(1)
    v = 30
    values = torch.randn(v, d, generator=g).to(dtype).to(DEVICE)
    before = values.clone()
    expect = values.clone()
    state = kernels.init_optimizer_state(optimizer, v, d, DEVICE)
    state_before = {k: t.clone() for k, t in state.items()}
    state_ref = {k: t.clone() for k, t in state.items()}
    # Overlapping across steps, and one set out of order; row 28 is touched 3 times.
    row_sets = [[0, 3, 5, 9, 28], [3, 4, 5, 28], [29, 9, 28]]
    for step, rows in enumerate(row_sets):
        rows_U = torch.tensor(rows, device=DEVICE)
        grad_UD = torch.randn(len(rows), d, generator=g).to(DEVICE)
        kw = dict(lr=0.05, eps=1e-8, betas=(0.9, 0.99), weight_decay=0.1 * step)
        update(optimizer, values, state, rows_U, grad_UD, backend=backend, **kw)
        reference.sparse_update_(OptimizerSpec(optimizer, **kw), expect, state_ref, rows_U, grad_UD)
    # bf16 rows are rounded after every step; one rounding step apart is fine.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(values.float(), expect.float(), **tol)
    assert state.keys() == state_ref.keys()
    for key in state:
        torch.testing.assert_close(state[key], state_ref[key], rtol=1e-5, atol=1e-7)
    untouched = sorted(set(range(v)) - {r for rs in row_sets for r in rs})
    assert torch.equal(values[untouched], before[untouched])
    for key, t in state.items():
        assert torch.equal(t[untouched], state_before[key][untouched])
    if optimizer == "adam":
        assert state["step"][28].item() == 3 and state["step"][0].item() == 1


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_first_step_closed_forms(backend):
    """On the first step Adam moves each coordinate by about lr * sign(g), and Adagrad
    by lr * g / rms(g): the formulas the reference is meant to implement."""
    g_UD = torch.tensor([[0.5, -2.0, 1e-3], [3.0, 0.0, -1.0]], device=DEVICE)
    rows_U = torch.tensor([1, 3], device=DEVICE)
    for optimizer, step_UD in [
        ("sgd", 0.1 * g_UD),
        ("adagrad", 0.1 * g_UD / g_UD.pow(2).mean(1, keepdim=True).sqrt()),
        ("adam", 0.1 * g_UD.sign()),
    ]:
        values = torch.ones(5, 3, device=DEVICE)
        state = kernels.init_optimizer_state(optimizer, 5, 3, DEVICE)
        update(optimizer, values, state, rows_U, g_UD, lr=0.1, backend=backend)
        torch.testing.assert_close(values[rows_U], 1 - step_UD, rtol=1e-5, atol=1e-5)
        assert torch.equal(values[[0, 2, 4]], torch.ones(3, 3, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_rows_round_to_nearest_even_like_torch(backend):
    # SGD with lr=1 from w=0 and g=-x stores exactly bf16(x): ties, subnormals, overflow.
    x_D = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20), 1e-40, 3.4e38, float("inf"), 0.1, 1 / 3]
    )
    values = torch.zeros(2, x_D.numel(), dtype=torch.bfloat16, device=DEVICE)
    rows_U = torch.tensor([1], device=DEVICE)
    update("sgd", values, {}, rows_U, -x_D.view(1, -1).to(DEVICE), lr=1.0,
                           backend=backend)  # fmt: skip
    assert torch.equal(values[1].cpu(), x_D.bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_decay_shrinks_touched_rows_only(backend):
    values = torch.ones(4, 5, device=DEVICE)
    rows_U = torch.tensor([2], device=DEVICE)
    zero_UD = torch.zeros(1, 5, device=DEVICE)
    update("sgd", values, {}, rows_U, zero_UD, lr=0.5, weight_decay=0.1, backend=backend)
    assert torch.allclose(values[2], torch.full((5,), 0.95, device=DEVICE))
    assert torch.equal(values[[0, 1, 3]], torch.ones(3, 5, device=DEVICE))


def test_torch_path_updates_a_column_slice_in_place():
    wide = torch.zeros(6, 10, device=DEVICE)
    values = wide[:, 2:5]
    update(
        "sgd", values, {}, torch.tensor([1], device=DEVICE), torch.ones(1, 3, device=DEVICE),
        lr=1.0, backend="torch",
    )  # fmt: skip
    assert wide[1, 2:5].tolist() == [-1.0, -1.0, -1.0] and wide.sum().item() == -3.0


@pytest.mark.triton
def test_triton_update_refuses_a_table_it_cannot_write_in_place():
    values = torch.zeros(3, 6, device=DEVICE).t()  # column stride 6
    with pytest.raises(ShapeError, match="column stride 6 cannot be updated in place"):
        update(
            "sgd", values, {}, torch.tensor([0], device=DEVICE), torch.ones(1, 3, device=DEVICE),
            lr=1.0, backend="triton",
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_is_a_no_op(backend):
    values = torch.randn(4, 3, device=DEVICE)
    before = values.clone()
    state = kernels.init_optimizer_state("adam", 4, 3, DEVICE)
    rows_U = torch.zeros(0, dtype=torch.long, device=DEVICE)
    update("adam", values, state, rows_U, torch.zeros(0, 3, device=DEVICE), lr=1.0, backend=backend)
    assert torch.equal(values, before) and not state["step"].any()


def test_init_optimizer_state_layout():
    assert kernels.init_optimizer_state("sgd", 7, 3) == {}
    (acc,) = kernels.init_optimizer_state("adagrad", 7, 3).values()
    assert acc.shape == (7,) and acc.dtype == torch.float32
    adam = kernels.init_optimizer_state("adam", 7, 3)
    assert {k: (tuple(t.shape), t.dtype) for k, t in adam.items()} == {
        "exp_avg": ((7, 3), torch.float32),
        "exp_avg_sq": ((7, 3), torch.float32),
        "step": ((7,), torch.int64),
    }


def test_update_errors_name_the_value_and_the_rule():
    values = torch.zeros(10, 4)
    rows, grad = torch.tensor([1, 2]), torch.zeros(2, 4)
    adam = kernels.init_optimizer_state("adam", 10, 4)
    with pytest.raises(ConfigError, match=r"'rmsprop' must be one of \('sgd', 'adagrad', 'adam'\)"):
        kernels.init_optimizer_state("rmsprop", 10, 4)
    with pytest.raises(ConfigError, match="'rmsprop' must be one of"):
        update("rmsprop", values, {}, rows, grad, lr=1.0)
    with pytest.raises(ConfigError, match=r"backend='gpu' must be one of"):
        update("sgd", values, {}, rows, grad, lr=1.0, backend="gpu")
    with pytest.raises(ShapeError, match=r"gradient shape \(1, 4\) must be \(2, 4\)"):
        update("sgd", values, {}, rows, torch.zeros(1, 4), lr=1.0)
    with pytest.raises(IndexOutOfRangeError, match=r"index 12 at position \(1,\) .* 10 rows"):
        update("sgd", values, {}, torch.tensor([1, 12]), grad, lr=1.0)
    with pytest.raises(DataError, match="row 2 appears 2 times"):
        update("sgd", values, {}, torch.tensor([2, 1, 2]), torch.zeros(3, 4), lr=1)
    with pytest.raises(ConfigError, match=r"lacks \['exp_avg_sq', 'step'\]"):
        update("adam", values, {"exp_avg": adam["exp_avg"]}, rows, grad, lr=1.0)
    with pytest.raises(ShapeError, match=r"state 'sum_sq' is torch.float32 \(9,\)"):
        update("adagrad", values, {"sum_sq": torch.zeros(9)}, rows, grad, lr=1.0)
    with pytest.raises(ConfigError, match="lr=-0.1 must be >= 0"):
        update("sgd", values, {}, rows, grad, lr=-0.1)
    with pytest.raises(ConfigError, match=r"betas=\(0.9, 1.0\) must be two numbers in \[0, 1\)"):
        update("adam", values, adam, rows, grad, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="eps=0.0 must be > 0 for adagrad"):
        update(
            "adagrad", values, kernels.init_optimizer_state("adagrad", 10, 4), rows, grad,
            lr=0.1, eps=0.0,
        )  # fmt: skip
