"""The memory layer against brute-force references written with plain tensor ops (they
share no code with the layer): selection with qk-norm, output, gradients, tables, usage."""

import math

import pytest
import torch
import torch.nn.functional as F

from memdist.config import MemoryConfig
from memdist.errors import ConfigError
from memdist.kernels import OptimizerSpec
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
            cfg.rows, v_dim, OptimizerSpec(cfg.value_optimizer, lr=cfg.value_lr), seed=seed
        )
    return MemoryLayer(DIM, cfg, table)


def test_product_key_topk_matches_brute_force():
    torch.manual_seed(0)
    n, h, c, q, k = 50, 3, 10, 6, 5
    q_NH2Q, keys = torch.randn(n, h, 2, q), torch.randn(h, 2, c, q)
    scores, idx = product_key_topk(q_NH2Q[:, :, 0], q_NH2Q[:, :, 1], keys, k)
    s1 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 1], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (n, h, c*c), row = i1*c + i2
    ref_scores, ref_idx = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert idx.dtype == torch.int64


def reference_select(layer: MemoryLayer, x_ND: torch.Tensor):
    """Rows and softmax scores ``(N, H*K)`` from plain tensor ops: the query projection,
    qk-norm (RMS normalisation with the learned gains, scores over sqrt(Q)), every one
    of the ``C*C`` product-key scores, then top-k. Shares no code with the layer."""
    cfg = layer.cfg
    n, h, c, q, k = x_ND.shape[0], cfg.heads, cfg.n_keys, cfg.k_dim // 2, cfg.knn
    q_NH2Q = (x_ND @ layer.query_proj.weight.T).view(n, h, 2, q)
    keys_H2CQ = layer.keys
    scale = 1.0
    if cfg.qk_norm:
        eps = torch.finfo(x_ND.dtype).eps
        g_q = layer.query_norm.weight.view(h, 2, q)
        g_k = layer.key_norm.weight.view(h, 2, 1, q)
        q_NH2Q = q_NH2Q * torch.rsqrt(q_NH2Q.pow(2).mean(-1, keepdim=True) + eps) * g_q
        keys_H2CQ = keys_H2CQ * torch.rsqrt(keys_H2CQ.pow(2).mean(-1, keepdim=True) + eps) * g_k
        scale = q**-0.5
    s1_NHC = (q_NH2Q[:, :, 0, None, :] * keys_H2CQ[:, 0]).sum(-1) * scale
    s2_NHC = (q_NH2Q[:, :, 1, None, :] * keys_H2CQ[:, 1]).sum(-1) * scale
    all_NHCC = s1_NHC[..., :, None] + s2_NHC[..., None, :]  # row i1*C + i2
    raw_NHK, idx_NHK = all_NHCC.reshape(n, h, c * c).topk(k, dim=-1)
    return idx_NHK.reshape(n, -1), torch.softmax(raw_NHK, dim=-1).reshape(n, -1)


def reference_forward(layer: MemoryLayer, values_VD: torch.Tensor, x_BTD: torch.Tensor):
    """The layer computed with ``reference_select``, a dense value tensor and plain
    matmuls."""
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(-1, d)
    idx_NK, scores_NK = reference_select(layer, x_ND)
    y = (values_VD[idx_NK] * scores_NK[..., None]).sum(1)
    if layer.cfg.swilu:
        y = (y * F.silu(x_ND @ layer.w1.weight.T)) @ layer.wo.weight.T
    if layer.gate is not None:
        y = y * torch.sigmoid(x_ND @ layer.gate.weight.T + layer.gate.bias)
    return y.view(b, t, d)


def randomise_gains(layer: MemoryLayer) -> None:
    """Non-trivial qk-norm gains, so a test sees whether they are used, and how."""
    with torch.no_grad():
        for norm in (layer.query_norm, layer.key_norm):
            norm.weight.copy_(torch.empty_like(norm.weight).uniform_(0.2, 3.0))


def assert_same_selection(idx_a, scores_a, idx_b, scores_b):
    """Equal row sets per token with equal scores, whatever the order within a token."""
    order_a, order_b = idx_a.argsort(-1), idx_b.argsort(-1)
    assert torch.equal(idx_a.gather(-1, order_a), idx_b.gather(-1, order_b))
    torch.testing.assert_close(scores_a.gather(-1, order_a), scores_b.gather(-1, order_b))


@pytest.mark.parametrize("qk_norm, gains", [(True, "init"), (True, "random"), (False, None)])
def test_selection_matches_brute_force_reference(qk_norm, gains):
    layer = make_layer(small_cfg(qk_norm=qk_norm, n_keys=12, heads=3, knn=5))
    if gains == "random":
        randomise_gains(layer)
    x_ND = torch.randn(40, DIM)
    idx, scores = layer.select(x_ND)
    assert idx.shape == scores.shape == (40, 3 * 5)
    assert_same_selection(idx, scores, *reference_select(layer, x_ND))


@torch.no_grad()
def test_qk_norm_at_init_keeps_the_old_scores_and_range():
    """Unit gains and the 1/sqrt(Q) scale give the scores of RMS-normalised queries
    against L2-normalised keys (the previous form): the same temperature at init, each
    half score within +-sqrt(Q). The gains then make the temperature learnable."""
    layer = make_layer(small_cfg(qk_norm=True))
    cfg, n = layer.cfg, 30
    x_ND = torch.randn(n, DIM)
    q_NH2Q = F.rms_norm((x_ND @ layer.query_proj.weight.T).view(n, cfg.heads, 2, 8), (8,))
    keys = F.normalize(layer.keys, dim=-1)
    s1 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 1], keys[:, 1])
    assert s1.abs().max() <= 8**0.5 + 1e-5 and s2.abs().max() <= 8**0.5 + 1e-5
    raw, idx = (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(cfg.knn, dim=-1)
    old_idx, old_scores = idx.reshape(n, -1), torch.softmax(raw, -1).reshape(n, -1)
    assert_same_selection(*layer.select(x_ND), old_idx, old_scores)
    # A learned gain is a learned temperature: doubling both gains sharpens the softmax.
    layer.query_norm.weight.fill_(2.0)
    layer.key_norm.weight.fill_(2.0)
    idx2, scores2 = layer.select(x_ND)
    assert torch.equal(idx2.sort(-1).values, old_idx.sort(-1).values)
    top2, top = scores2.max(-1).values, old_scores.max(-1).values
    assert bool((top2 >= top - 1e-6).all()) and float(top2.mean()) > float(top.mean()) + 0.05


def test_each_head_and_half_has_its_own_key_gain():
    layer = make_layer(small_cfg(qk_norm=True))
    x_ND = torch.randn(20, DIM)
    idx, scores = layer.select(x_ND)
    with torch.no_grad():  # scale only head 1's second-half key gain
        layer.key_norm.weight.view(2, 2, 8)[1, 1] *= 5.0
    idx2, scores2 = layer.select(x_ND)
    k = layer.cfg.knn
    assert torch.equal(idx2[:, :k], idx[:, :k]) and torch.equal(scores2[:, :k], scores[:, :k])
    assert not torch.equal(scores2[:, k:], scores[:, k:])
    assert_same_selection(idx2, scores2, *reference_select(layer, x_ND))


@pytest.mark.parametrize(
    "swilu, gate, qk_norm", [(True, False, True), (False, True, False), (True, True, True)]
)
def test_forward_and_gradients_match_dense_reference(swilu, gate, qk_norm):
    cfg = small_cfg(swilu=swilu, gate=gate, qk_norm=qk_norm)
    layer = make_layer(cfg)
    if gate:  # non-trivial gate so its gradient path is exercised
        torch.nn.init.normal_(layer.gate.weight)
    if qk_norm:  # non-trivial gains so theirs is
        randomise_gains(layer)
    x = torch.randn(2, 5, DIM)
    values = layer.table.weight_VD.clone().requires_grad_(True)
    ref = reference_forward(layer, values, x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    assert all(g.abs().sum() > 0 for g in ref_grads.values())  # every path is exercised
    layer.zero_grad()

    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    rows, grad = layer.table.rows.pending_grads()
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
    table = LocalTable(cfg.rows, DIM, OptimizerSpec("sgd", lr=1.0), seed=3)
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
    x = torch.randn(1, 4, DIM)
    with torch.no_grad():
        out = layer(x)
        ref = reference_forward(layer, layer.table.weight_VD, x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert layer.table.rows.pending_grads() is None


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
    x = torch.randn(3, 7, DIM)
    with torch.no_grad():
        layer(x)
        idx_NK, _ = reference_select(layer, x.reshape(-1, DIM))
    assert int(layer.usage_V.sum()) == 3 * 7 * 2 * 4  # tokens x heads x knn
    assert torch.equal(layer.usage_V, torch.bincount(idx_NK.flatten(), minlength=64))


def test_usage_counts_only_positions_from_usage_from_t():
    """Re-running a prefix (greedy decoding without a cache) must not count its reads
    again: only positions ``t >= usage_from_t`` are counted."""
    layer = make_layer(small_cfg())
    layer.usage_V = torch.zeros(layer.table.num_rows, dtype=torch.long)
    layer.usage_from_t = 5
    x = torch.randn(3, 7, DIM)
    with torch.no_grad():
        out = layer(x)
        idx_NK, _ = reference_select(layer, x.reshape(-1, DIM))
    counted = idx_NK.view(3, 7, -1)[:, 5:].flatten()
    assert torch.equal(layer.usage_V, torch.bincount(counted, minlength=64))
    layer.usage_V, layer.usage_from_t = None, 0
    with torch.no_grad():  # the output does not depend on what is counted
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


def test_any_region_of_a_table_initialises_identically():
    from memdist.values import INIT_BLOCK_ROWS, init_values

    rows, dim = 3 * INIT_BLOCK_ROWS + 17, 24
    whole = init_values(0, rows, dim, seed=5)
    for r0, r1, c0, c1 in [(0, 10, 0, 24), (4000, 9000, 3, 11), (rows - 5, rows, 20, 24)]:
        part = init_values(r0, r1, dim, seed=5, col_start=c0, col_stop=c1)
        assert torch.equal(part, whole[r0:r1, c0:c1])
    assert not torch.equal(init_values(0, 10, dim, seed=6), whole[:10])
