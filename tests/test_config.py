"""Config tree: YAML named configs, overrides, unknown keys and every rule's error."""

import pytest
import yaml

from memdist.config import RunConfig, config_from_dict, load_config, to_dict
from memdist.errors import ConfigError


def test_named_configs_load_and_differ_only_in_memory():
    small, dense = load_config("small"), load_config("dense")
    assert small.name == "small" and dense.name == "dense"
    assert small.model.memory is not None and dense.model.memory is None
    assert small.model.dim == dense.model.dim and small.model.n_layers == dense.model.n_layers
    assert load_config(None).name == "small"


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "small",
        [
            "model.dim=256",
            "optim.lr=1e-3",
            "model.memory.layers=[0, 3]",
            "train.max_minutes=null",
            "model.memory.gate=true",
        ],
    )
    assert cfg.model.dim == 256 and cfg.optim.lr == 1e-3
    assert cfg.model.memory.layers == [0, 3] and cfg.model.memory.gate is True
    assert cfg.train.max_minutes is None
    # An int where a float is expected is accepted and converted.
    assert load_config("small", ["optim.lr=1"]).optim.lr == 1.0


def test_override_can_turn_memory_on_for_dense():
    cfg = load_config("dense", ["model.memory={layers: [1], n_keys: 16, knn: 4}"])
    assert cfg.model.memory.rows == 256 and cfg.model.memory.k_dim == 64


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dimm=3", "unknown key(s) ['dimm']"),
        ("model.memory.k_dim=63", "k_dim=63 must be a positive even number"),
        ("model.memory.knn=65", "knn=65 must be between 1 and n_keys=64"),
        ("model.memory.value_optimizer=rmsprop", "value_optimizer='rmsprop'"),
        ("model.memory.layers=[7]", "blocks [7] are outside 0..3"),
        ("model.dim=130", "model.dim=130 must be divisible by model.n_heads=4"),
        ("model.dim=100", "= 25 must be even (RoPE"),
        ("data.seq_len=1000", "data.seq_len=1000 must be <= model.max_seq_len=256"),
        ("train.zero_stage=4", "train.zero_stage=4 must be 0, 1, 2 or 3"),
        ("optim.lr=fast", "optim.lr='fast' must be a number"),
        ("train.steps=2.5", "train.steps=2.5 must be an integer"),
        ("cluster.workers=0", "cluster.workers=0 must be >= 1"),
        ("shards.staleness=2", "shards.staleness=2 must be 0 (synchronous) or 1"),
        ("model.memory.v_dim=64", None),  # allowed with swilu on
    ],
)
def test_rules_raise_config_error_naming_the_value(override, fragment):
    if fragment is None:
        assert load_config("small", [override]).model.memory.v_dim == 64
        return
    with pytest.raises(ConfigError) as info:
        load_config("small", [override])
    assert fragment in str(info.value)


def test_v_dim_must_match_dim_without_swilu():
    with pytest.raises(ConfigError, match="v_dim=64 must equal model.dim=128 when swilu is off"):
        load_config("small", ["model.memory.v_dim=64", "model.memory.swilu=false"])


def test_unknown_config_name_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config("small", ["model.dim"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("small", ["model.memory.shared_table=true"])
    text = yaml.safe_dump(to_dict(cfg))
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model: {dim: 64, n_heads: 2, memory: {n_keys: 8, knn: 4}}\ntrain: {steps: 5}\n"
    )
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.model.dim == 64 and cfg.model.memory.rows == 64


def test_workers_need_ray_shard_servers():
    with pytest.raises(ConfigError, match="cluster.workers=2 with a memory model needs shard"):
        load_config("small", ["cluster.workers=2", "shards.count=0"])
    with pytest.raises(
        ConfigError, match="cluster.workers=2 needs shards.transport=ray or collective"
    ):
        load_config("small", ["cluster.workers=2", "shards.transport=inprocess"])
    assert load_config("dense", ["cluster.workers=2"]).cluster.workers == 2
    assert load_config("small", ["cluster.workers=2"]).cluster.workers == 2
