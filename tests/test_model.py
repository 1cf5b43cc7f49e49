"""The decoder: causality, memory blocks, FLOPs matching, and the table seam."""

import torch

from memdist.assembly import build_model, build_tables, unique_tables
from memdist.config import ModelConfig, RunConfig, load_config
from memdist.memory import MemoryLayer
from memdist.model import SwiGLU, Transformer, flops_per_token


def tiny(**over) -> RunConfig:
    cfg = load_config(
        "small",
        [f"model.{k}={v}" for k, v in over.items()]
        + [
            "model.dim=32",
            "model.n_heads=2",
            "model.memory.n_keys=8",
            "model.memory.knn=4",
            "model.memory.k_dim=16",
        ],
    )
    return cfg


def test_memory_blocks_replace_the_ffn_at_the_configured_layers():
    cfg = tiny(**{"memory.layers": "[0, 2]"})
    model, tables = build_model(cfg, torch.device("cpu"))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [MemoryLayer, SwiGLU, MemoryLayer, SwiGLU]
    assert len(unique_tables(tables)) == 2


def test_shared_table_is_one_object():
    cfg = tiny(**{"memory.layers": "[1, 3]", "memory.shared_table": "true"})
    model, tables = build_model(cfg, torch.device("cpu"))
    a, b = model.memory_layers()
    assert a.table is b.table and len(unique_tables(tables)) == 1


def test_forward_is_causal_and_shaped():
    cfg = tiny()
    model, _ = build_model(cfg, torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, cfg.model.vocab_size)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:])


def test_same_seed_same_model_and_tables():
    cfg = tiny()
    (m1, t1), (m2, t2) = (
        build_model(cfg, torch.device("cpu")),
        build_model(cfg, torch.device("cpu")),
    )
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(t1[0].weight_VD, t2[0].weight_VD)


def test_memory_and_dense_configs_match_in_flops():
    small, dense = load_config("small"), load_config("dense")
    f_mem = flops_per_token(small.model, small.data.seq_len)
    f_dense = flops_per_token(dense.model, dense.data.seq_len)
    assert 0.85 < f_mem["forward"] / f_dense["forward"] <= 1.0
    # The memory layer's cost does not grow with its rows beyond the keys: 16x the rows
    # (4x n_keys) costs far less than 16x.
    big = load_config("small", ["model.memory.n_keys=256"])
    f_big = flops_per_token(big.model, big.data.seq_len)
    assert f_big["memory_layer"] < 2 * f_mem["memory_layer"]
    assert f_mem["train"] == 3 * f_mem["forward"]


def test_flops_count_matches_a_hand_count():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_hidden=128, vocab_size=300, memory=None)
    f = flops_per_token(cfg, seq_len=10)
    attn = 2 * 64 * 192 + 2 * 64 * 64 + 2 * 2 * 5 * 64
    assert f["forward"] == attn + 2 * 3 * 64 * 128 + 2 * 64 * 300


class HugeTable:
    """A table that only reports its size: the model must never touch its rows."""

    num_rows = 10**10
    dim = 32

    def lookup(self, idx_NK, scores_NK):
        raise AssertionError("not called in this test")

    def step(self):
        pass

    def zero_grad(self):
        pass


def test_building_a_model_never_materialises_the_table():
    cfg = load_config(
        "small",
        [
            "model.dim=32",
            "model.n_heads=2",
            "model.memory.n_keys=100000",
            "model.memory.knn=4",
            "model.memory.k_dim=16",
        ],
    ).model
    with torch.device("meta"):
        model = Transformer(cfg, [HugeTable()])
    assert model.memory_layers()[0].table.num_rows == 10**10
    n = sum(p.numel() for p in model.parameters())
    assert n < 10**8  # keys grow with sqrt(rows); the 3.2e11 values are elsewhere
    assert all(p.device.type == "meta" for p in model.parameters())


def test_build_tables_none_for_dense():
    assert build_tables(load_config("dense").model, torch.device("cpu"), 0) == []
