"""Finetuning from a finished run (``train.init_from``) and training only the memory values
(``train.freeze_backbone``): real runs through ``memdist.train.train``, a few steps each."""

import pytest
import torch
from safetensors.torch import load_file

from memdist.assembly import build_model, make_engine, resolve_runtime
from memdist.config import load_config
from memdist.errors import ConfigError
from memdist.train import train

TINY = [
    "shards.count=0", "model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.memory.layers=[1]",
    "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.k_dim=16",
    "data.n_people=20", "data.seq_len=32", "data.batch_size=4", "train.steps=4",
    "train.log_every=1", "optim.warmup_steps=1", "eval.max_qa=2", "eval.max_new_tokens=2",
    "eval.ppl_batches=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished run whose weights later runs start from."""
    root = tmp_path_factory.mktemp("finetune")
    cfg = load_config("small", [*TINY, f"data.cache_dir={root / 'data'}"])
    train(cfg, root / "base", progress=False)
    return root


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors")), load_file(
        str(run_dir / "values.safetensors")
    )


def test_frozen_backbone_keeps_every_parameter_and_trains_the_values(base_run):
    """From the base run's weights, on other data (another corpus seed): every backbone
    parameter comes out bit-identical, the value rows move, and the values' optimizer
    starts afresh (its step count is this run's)."""
    run = base_run / "frozen"
    cfg = load_config("small", [
        *TINY, f"data.cache_dir={base_run / 'data'}", "data.seed=1", "train.steps=3",
        f"train.init_from={base_run / 'base'}", "train.freeze_backbone=true",
    ])  # fmt: skip
    train(cfg, run, progress=False)
    base_model, base_values = _weights(base_run / "base")
    model, values = _weights(run)
    assert model.keys() == base_model.keys()
    for name, tensor in model.items():
        assert torch.equal(tensor, base_model[name]), name
    assert not torch.equal(values["table0.weight"], base_values["table0.weight"])
    assert int(values["table0.steps"]) == 3 and int(base_values["table0.steps"]) == 4


def test_init_from_without_freezing_trains_everything_from_the_run(base_run):
    run = base_run / "full"
    cfg = load_config("small", [
        *TINY, f"data.cache_dir={base_run / 'data'}", "data.seed=1", "train.steps=2",
        f"train.init_from={base_run / 'base'}", "train.eval_every=0",
    ])  # fmt: skip
    first = train(cfg, run, progress=False)
    base_model, base_values = _weights(base_run / "base")
    model, values = _weights(run)
    assert all(not torch.equal(model[n], base_model[n]) for n in ("tok_emb.weight",
               "blocks.1.ffn.query_proj.weight", "blocks.0.attn.qkv.weight"))  # fmt: skip
    assert not torch.equal(values["table0.weight"], base_values["table0.weight"])
    # It started from the base weights: one step from them is nowhere near a fresh model.
    fresh = train(load_config("small", [*TINY, f"data.cache_dir={base_run / 'data'}",
                                        "data.seed=1", "train.steps=2"]),
                  base_run / "fresh", progress=False)  # fmt: skip
    assert first["loss"] < fresh["loss"]


def test_freeze_and_init_from_rules(tmp_path):
    with pytest.raises(ConfigError, match="train.freeze_backbone=true needs a memory model"):
        load_config("dense", ["train.freeze_backbone=true"])
    with pytest.raises(ConfigError, match=r"needs train.zero_stage=0 \(got 2\)"):
        load_config("small", ["train.freeze_backbone=true", "train.zero_stage=2"])
    # A DeepSpeed JSON that asks for ZeRO-2 fails before the engine is built.
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    cfg = load_config("small", [*TINY, "train.freeze_backbone=true", f"train.deepspeed={ds}"])
    rt = resolve_runtime(cfg)
    model, _ = build_model(cfg, rt.device)
    with pytest.raises(
        ConfigError, match="needs ZeRO stage 0 and memdist's optimizer .got stage 2"
    ):
        make_engine(cfg, model, rt)
    with pytest.raises(ConfigError, match="train.init_from='runs/a' and train.checkpoint.resume"):
        load_config("small", ["train.init_from=runs/a", "train.checkpoint.resume=runs/ck"])
