"""The decoder: causality, memory blocks, initialisation, FLOPs matching, the table seam,
and the key-usage counts of an evaluation."""

from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from memdist import evaluate as evaluate_module
from memdist.assembly import build_model, build_tables, unique_tables
from memdist.config import MemoryConfig, ModelConfig, RunConfig, load_config
from memdist.evaluate import evaluate, greedy_answers
from memdist.memory import MemoryLayer
from memdist.model import SwiGLU, Transformer, flops_per_token
from memdist.table import ValueTable


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


def test_flops_count_of_a_memory_layer_matches_a_hand_count():
    """qk-norm adds no matmul: the memory layer costs the query projection, the 2 x C
    half-key scores per head, the weighted sum of H*K rows and the Memory+ branch."""
    mem = MemoryConfig(layers=[0], n_keys=10, k_dim=8, heads=2, knn=3, gate=True)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_hidden=128, vocab_size=300, memory=mem)
    f = flops_per_token(cfg, seq_len=10)
    query, keys, bag = 2 * 64 * 2 * 8, 2 * 2 * 10 * 8, 2 * 2 * 3 * 64
    swilu, gate = 2 * 2 * 64 * 64 + 64, 2 * 64
    assert f["memory_layer"] == query + keys + bag + swilu + gate
    attn = 2 * 64 * 192 + 2 * 64 * 64 + 2 * 2 * 5 * 64
    ffn = 2 * 3 * 64 * 128
    assert f["forward"] == 2 * attn + ffn + f["memory_layer"] + 2 * 64 * 300
    assert flops_per_token(replace(cfg, memory=replace(mem, qk_norm=False)), 10) == f


INIT_FNS = ("normal_", "uniform_", "zeros_", "ones_", "trunc_normal_", "kaiming_uniform_")


def test_every_parameter_is_initialised_exactly_once(monkeypatch):
    """A parent-first walk that re-initialises a memory layer's linears would undo the
    layer's own init (the gate's zeros); count the init calls each parameter gets."""
    cfg = tiny(**{"memory.gate": "true", "memory.layers": "[1, 3]"}).model
    model = Transformer(cfg, build_tables(cfg, torch.device("cpu"), 0))
    calls: Counter[int] = Counter()
    for fn in INIT_FNS:
        orig = getattr(torch.nn.init, fn)

        def counted(t, *a, _orig=orig, **kw):
            calls[id(t)] += 1
            return _orig(t, *a, **kw)

        monkeypatch.setattr(torch.nn.init, fn, counted)
    model.reset_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    assert {n: calls[i] for i, n in names.items() if calls[i] != 1} == {}
    assert set(calls) <= set(names)


@torch.no_grad()
def test_built_model_has_the_documented_initialisation():
    cfg = tiny(**{"memory.gate": "true", "memory.layers": "[1, 3]"}).model
    torch.manual_seed(0)
    model = Transformer(cfg, build_tables(cfg, torch.device("cpu"), 0))
    std, mem = cfg.init_std, cfg.memory
    assert mem is not None and len(model.memory_layers()) == 2
    for layer in model.memory_layers():
        assert layer.gate is not None
        assert torch.count_nonzero(layer.gate.weight) == 0
        assert torch.count_nonzero(layer.gate.bias) == 0
        bound = mem.k_dim**-0.5
        assert layer.keys.abs().max() <= bound and layer.keys.abs().max() > 0.9 * bound
        assert layer.query_norm is not None and layer.key_norm is not None
        assert torch.equal(layer.query_norm.weight, torch.ones_like(layer.query_norm.weight))
        assert torch.equal(layer.key_norm.weight, torch.ones_like(layer.key_norm.weight))
        for w in (layer.query_proj.weight, layer.w1.weight, layer.wo.weight):
            assert abs(float(w.mean())) < 0.2 * std
            assert float(w.std()) == pytest.approx(std, rel=0.1)
    out_std = std / (2 * cfg.n_layers) ** 0.5
    for block in model.block_list():
        assert float(block.attn.out.weight.std()) == pytest.approx(out_std, rel=0.1)
        assert float(block.attn.qkv.weight.std()) == pytest.approx(std, rel=0.1)
        for norm in (block.attn_norm, block.ffn_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert float(model.tok_emb.weight.std()) == pytest.approx(std, rel=0.1)
    # A zero gate at init: every token's memory output is scaled by exactly 1/2.
    gate = model.memory_layers()[0].gate
    assert gate is not None
    assert torch.equal(torch.sigmoid(gate(torch.randn(10, cfg.dim))), torch.full((10, 1), 0.5))


def chain_ends(calls: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last input of each run of calls where each call extends the previous one by
    one token (one greedy-decoded group): the positions that group processed."""
    ends: list[torch.Tensor] = []
    for c in calls:
        prev = ends[-1] if ends else None
        extends = (
            prev is not None
            and c.shape == (prev.shape[0], prev.shape[1] + 1)
            and torch.equal(c[:, :-1], prev)
        )
        if extends:
            ends[-1] = c
        else:
            ends.append(c)
    return ends


@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_evaluation_counts_each_position_once(max_new_tokens, monkeypatch):
    """Greedy decoding re-runs the whole sequence each step; a position's reads depend
    only on its prefix, so they are counted once, as one forward over the final
    sequences would count them."""
    cfg = tiny(**{"memory.layers": "[0, 2]"})
    model, _ = build_model(cfg, torch.device("cpu"))
    calls: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].clone()))
    qa = [
        SimpleNamespace(prompt=p, answer="x")
        for p in ["Who is A?", "Who is B?", "Who is Cee?", "Q?", "Where is D?"]
    ]
    texts = ["some held-out text", "more text, longer than the first one"]
    reads: list[int] = []
    real_key_usage = evaluate_module.key_usage

    def spy(counts_V):
        reads.append(int(counts_V.sum()))
        return real_key_usage(counts_V)

    monkeypatch.setattr(evaluate_module, "key_usage", spy)
    evaluate(model, qa, texts, max_qa=10, max_new_tokens=max_new_tokens, batch_size=2)
    mem = cfg.model.memory
    assert mem is not None
    positions = sum(c.numel() for c in chain_ends(calls))
    assert len(calls) > len(chain_ends(calls)) or max_new_tokens == 1
    expected = positions * mem.heads * mem.knn
    assert reads == [expected, expected]


def test_greedy_answers_counts_the_final_sequences_reads():
    cfg = tiny()
    model, _ = build_model(cfg, torch.device("cpu"))
    (layer,) = model.memory_layers()
    calls: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].clone()))
    layer.usage_V = torch.zeros(layer.table.num_rows, dtype=torch.long)
    greedy_answers(model, ["abc", "abd", "hello"], max_new_tokens=5, batch_size=4)
    counted = layer.usage_V.clone()
    ends = chain_ends(calls)
    assert len(ends) == 2  # the two prompt lengths
    single = torch.zeros_like(counted)
    with torch.no_grad():
        for tokens_BT in ends:
            _, idx_NK = model.first_memory_rows(tokens_BT)  # type: ignore[misc]
            single += torch.bincount(idx_NK.flatten(), minlength=single.numel())
    assert int(counted.sum()) == int(single.sum())
    # The same reads, not just as many (up to rare top-k ties between sequence lengths).
    assert int((counted - single).abs().sum()) <= 0.02 * int(single.sum())
    assert layer.usage_from_t == 0  # left as it was: later forwards count every position
    layer.usage_V = None


class HugeTable(ValueTable):
    """A table that only reports its size: the model must never touch its rows. It is a
    ``ValueTable`` (the ABC refuses a double that misses a method of the contract)."""

    num_rows = 10**10
    dim = 32

    def _untouched(self, *args, **kwargs):
        raise AssertionError("a model being built must not call its table")

    lookup_async = prefetch = step = zero_grad = flush = _untouched
    describe = stats = state_names = read_rows = write_rows = set_steps = _untouched
    begin_save = load = _untouched
    last_step = wait_seconds = rows_prefetched = steps = property(_untouched)


def test_test_doubles_must_implement_the_table_contract():
    class Partial(ValueTable):
        num_rows, dim = 4, 2

        def lookup_async(self, idx_NK, scores_NK):
            raise AssertionError

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


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
