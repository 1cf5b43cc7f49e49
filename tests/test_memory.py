"""The memory layer against brute-force torch references: selection, output, gradients, tables."""

import math

import pytest
import torch
import torch.nn.functional as F

from memdist.config import MemoryConfig
from memdist.errors import ConfigError
from memdist.memory import MemoryLayer, key_usage, product_key_topk
from memdist.values import LocalTable

DIM = 32


def small_cfg(**kw) -> MemoryConfig:
    base = dict(layers=[0], n_keys=8, k_dim=16, heads=2, knn=4, value_optimizer="sgd", value_lr=0.1)
    base.update(kw)
    return MemoryConfig(**base)


def make_layer(cfg: MemoryConfig, seed: int = 0, table=None) -> MemoryLayer:
    torch.manual_seed(seed)
    v_dim = cfg.v_dim or DIM
    if table is None:
        table = LocalTable(
            cfg.rows,
            v_dim,
            optimizer=cfg.value_optimizer,
            lr=cfg.value_lr,
            seed=seed,
        )
    return MemoryLayer(DIM, cfg, table)


def test_product_key_topk_matches_brute_force():
    torch.manual_seed(0)
    n, h, c, q, k = 50, 3, 10, 6, 5
    q_NH2Q, keys = torch.randn(n, h, 2, q), torch.randn(h, 2, c, q)
    scores, idx = product_key_topk(q_NH2Q, keys, k)
    s1 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 1], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (n, h, c*c), row = i1*c + i2
    ref_scores, ref_idx = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert idx.dtype == torch.int64


def reference_forward(layer: MemoryLayer, values_VD: torch.Tensor, x_BTD: torch.Tensor):
    """The same layer computed with a dense value tensor and torch's embedding_bag."""
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(-1, d)
    idx_NK, scores_NK = layer.select(x_ND)
    y = F.embedding_bag(idx_NK, values_VD, per_sample_weights=scores_NK, mode="sum")
    if layer.cfg.swilu:
        y = layer.wo(y * F.silu(layer.w1(x_ND)))
    if layer.gate is not None:
        y = y * torch.sigmoid(layer.gate(x_ND))
    return y.view(b, t, d)


@pytest.mark.parametrize(
    "swilu, gate, qk_norm", [(True, False, True), (False, True, False), (True, True, True)]
)
def test_forward_and_gradients_match_dense_reference(swilu, gate, qk_norm):
    cfg = small_cfg(swilu=swilu, gate=gate, qk_norm=qk_norm)
    layer = make_layer(cfg)
    if gate:  # non-trivial gate so its gradient path is exercised
        torch.nn.init.normal_(layer.gate.weight)
    x = torch.randn(2, 5, DIM)
    values = layer.table.weight_VD.clone().requires_grad_(True)
    ref = reference_forward(layer, values, x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    rows, grad = layer.table.pending_grads()
    dense = torch.zeros_like(values)
    dense[rows] = grad
    torch.testing.assert_close(dense, values.grad, rtol=1e-5, atol=1e-6)
    assert set(rows.tolist()) == set(torch.nonzero(values.grad.abs().sum(1)).flatten().tolist())


def test_sgd_step_equals_dense_sgd_and_leaves_untouched_rows():
    layer = make_layer(small_cfg(value_optimizer="sgd", value_lr=0.5))
    before = layer.table.weight_VD.clone()
    values = before.clone().requires_grad_(True)
    x = torch.randn(1, 3, DIM)
    reference_forward(layer, values, x).sum().backward()
    layer(x).sum().backward()
    layer.table.step()
    expected = before - 0.5 * values.grad
    torch.testing.assert_close(layer.table.weight_VD, expected, rtol=1e-6, atol=1e-6)
    untouched = values.grad.abs().sum(1) == 0
    assert untouched.any()
    assert torch.equal(layer.table.weight_VD[untouched], before[untouched])
    assert layer.table.rows_touched_last_step == int((~untouched).sum())


def test_shared_table_accumulates_both_layers_gradients():
    cfg = small_cfg()
    table = LocalTable(cfg.rows, DIM, optimizer="sgd", lr=1.0, seed=3)
    a, b = make_layer(cfg, seed=1, table=table), make_layer(cfg, seed=2, table=table)
    assert a.table is b.table
    values = table.weight_VD.clone().requires_grad_(True)
    x = torch.randn(2, 4, DIM)
    (reference_forward(a, values, x) + reference_forward(b, values, x)).sum().backward()
    (a(x) + b(x)).sum().backward()
    before = table.weight_VD.clone()
    table.step()
    torch.testing.assert_close(table.weight_VD, before - values.grad, rtol=1e-5, atol=1e-6)


def test_values_are_not_backbone_parameters():
    layer = make_layer(small_cfg())
    ids = {id(p) for p in layer.parameters()}
    assert id(layer.table.weight_VD) not in ids
    assert all(p.numel() != layer.table.weight_VD.numel() for p in layer.parameters())
    assert not any("table" in name or "weight_VD" in name for name, _ in layer.state_dict().items())


def test_no_grad_lookup_accumulates_nothing():
    layer = make_layer(small_cfg())
    with torch.no_grad():
        layer(torch.randn(1, 4, DIM))
    assert layer.table.pending_grads() is None


def test_paper_initialisation():
    cfg = small_cfg(n_keys=32, k_dim=64)
    table = LocalTable(cfg.rows, 256, seed=0)
    layer = MemoryLayer(256, cfg, table)
    bound = 64**-0.5
    assert layer.keys.abs().max() <= bound and layer.keys.abs().max() > 0.9 * bound
    assert math.isclose(float(table.weight_VD.std()), 256**-0.5, rel_tol=0.02)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(k_dim=15), "k_dim=15 must be a positive even number"),
        (dict(knn=9), "knn=9 must be between 1 and n_keys=8"),
        (dict(v_dim=16, swilu=False), "v_dim=16 must equal model.dim=32"),
    ],
)
def test_invalid_settings_raise_config_error(kw, fragment):
    cfg = small_cfg(**kw)
    table = LocalTable(cfg.rows, cfg.v_dim or DIM)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        MemoryLayer(DIM, cfg, table)


def test_table_shape_mismatch_is_a_config_error():
    cfg = small_cfg()
    with pytest.raises(ConfigError, match="needs n_keys\\*\\*2 = 64 rows of v_dim = 32"):
        MemoryLayer(DIM, cfg, LocalTable(63, DIM))
    with pytest.raises(ConfigError, match="needs n_keys\\*\\*2 = 64 rows of v_dim = 32"):
        MemoryLayer(DIM, cfg, LocalTable(64, 16))


def test_key_usage_statistics():
    uniform = key_usage(torch.full((16,), 5))
    assert uniform["key_usage"] == 1.0 and abs(uniform["key_kl"]) < 1e-12
    one = torch.zeros(16, dtype=torch.long)
    one[3] = 7
    peaked = key_usage(one)
    assert peaked["key_usage"] == 1 / 16 and math.isclose(peaked["key_kl"], math.log(16))
    half = torch.tensor([1, 1, 0, 0])
    assert math.isclose(key_usage(half)["key_kl"], math.log(2))


def test_usage_counts_every_read():
    layer = make_layer(small_cfg())
    layer.usage_V = torch.zeros(layer.table.num_rows, dtype=torch.long)
    with torch.no_grad():
        layer(torch.randn(3, 7, DIM))
    assert int(layer.usage_V.sum()) == 3 * 7 * 2 * 4  # tokens x heads x knn


def test_any_region_of_a_table_initialises_identically():
    from memdist.values import INIT_BLOCK_ROWS, init_values

    rows, dim = 3 * INIT_BLOCK_ROWS + 17, 24
    whole = init_values(0, rows, dim, seed=5)
    for r0, r1, c0, c1 in [(0, 10, 0, 24), (4000, 9000, 3, 11), (rows - 5, rows, 20, 24)]:
        part = init_values(r0, r1, dim, seed=5, col_start=c0, col_stop=c1)
        assert torch.equal(part, whole[r0:r1, c0:c1])
    assert not torch.equal(init_values(0, 10, dim, seed=6), whole[:10])
