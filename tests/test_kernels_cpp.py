"""The C++ CPU kernels' own promises, beyond matching the reference (test_kernels*.py).

The value gradient equals the torch path's bit for bit; every result is the same on 1
and 2 threads; a row-wise shard's bags of one give the rows the same bits as the whole
bags; bf16 tables fall back to the torch path.
"""

import pytest
import torch

from memdist import kernels
from memdist.errors import ConfigError
from memdist.kernels import OptimizerSpec, cpp_ops

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
    out = [kernels.bag_backward_scores(values, idx, dy, backend="cpp")]
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="cpp")
    out.append(grad)
    for name in ("sgd", "adagrad", "adam"):
        table = values.clone()
        state = kernels.init_optimizer_state(name, *values.shape)
        for _ in range(2):
            kernels.sparse_update_(OptimizerSpec(name, lr=0.1, weight_decay=0.01), table,
                                   state, rows, grad, backend="cpp")  # fmt: skip
        out += [table, *state.values()]
    return out


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


def test_bags_of_one_give_a_row_wise_shard_the_same_bits():
    """What cluster/shard.py does for a row-wise region: its entries, in flat position
    order, as bags of one; masked-out entries read row 0 and are zeroed."""
    values, idx, scores, dy = inputs()
    mask = idx < 150
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="cpp")
    n_M, k_M = mask.nonzero(as_tuple=True)
    rows_s, grad_s = kernels.bag_backward_values(
        idx[n_M, k_M].view(-1, 1), scores[n_M, k_M].view(-1, 1), dy[n_M], backend="cpp"
    )
    assert torch.equal(rows_s, rows[rows < 150]) and torch.equal(grad_s, grad[rows < 150])
    ds = kernels.bag_backward_scores(values, idx, dy, backend="cpp")
    ds_s = kernels.bag_backward_scores(values, torch.where(mask, idx, 0), dy, backend="cpp")
    assert torch.equal(ds_s * mask, ds * mask)


def test_bf16_tables_use_the_torch_path():
    values, idx, scores, dy = inputs()
    values = values.to(torch.bfloat16)
    expect = kernels.bag_backward_scores(values, idx, dy, backend="torch")
    assert torch.equal(kernels.bag_backward_scores(values, idx, dy, backend="cpp"), expect)


def test_cpp_backend_refuses_non_cpu_tensors():
    values, idx, scores, _ = inputs()
    with pytest.raises(ConfigError, match="backend='cpp' runs on CPU tensors, got meta"):
        kernels.bag_forward(values.to("meta"), idx.to("meta"), scores.to("meta"), backend="cpp")
