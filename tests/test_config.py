"""Config tree: YAML named configs, overrides, unknown keys and every rule's error."""

import os

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
        ("shards.threads_per_shard=0", "shards.threads_per_shard=0 must be >= 1 or null"),
        ("train.checkpoint.s3_max_attempts=0", "train.checkpoint.s3_max_attempts=0 must be >= 1"),
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


def test_recovery_needs_checkpoints_and_shards_ray_restarts():
    ck = ["train.checkpoint.dir=/tmp/ck", "train.checkpoint.every=5"]
    with pytest.raises(
        ConfigError, match="cluster.max_failures=2 recovers from the run's checkpoints"
    ):
        load_config("small", ["cluster.max_failures=2", "shards.count=2"])
    with pytest.raises(ConfigError, match="every=0"):
        load_config(
            "small", ["cluster.max_failures=2", "shards.count=2", "train.checkpoint.dir=/c"]
        )
    with pytest.raises(ConfigError, match="shards.transport='collective'"):
        load_config("small", ["cluster.max_failures=1", "shards.count=2",
                              "shards.transport=collective", *ck])  # fmt: skip
    with pytest.raises(ConfigError, match="shards.count=0"):
        load_config("small", ["cluster.max_failures=1", "shards.count=0", *ck])
    with pytest.raises(ConfigError, match="cluster.max_failures=-1 must be >= 0"):
        load_config("small", ["cluster.max_failures=-1"])
    assert load_config("small", ["cluster.max_failures=3", "shards.count=2", *ck])
    assert load_config("dense", ["cluster.max_failures=3", *ck]).cluster.max_failures == 3


def test_memdists_own_ray_instance_requires_a_token(tmp_path):
    """The local instance a run starts keeps Ray's token authentication on."""
    import subprocess
    import sys

    code = ("from memdist.shards import ensure_ray; ensure_ray(); "
            "from ray._raylet import get_authentication_mode, AuthenticationMode; "
            "print(get_authentication_mode() == AuthenticationMode.TOKEN)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"  # Ray made it; memdist keeps it the owner's only
    assert token.stat().st_mode & 0o077 == 0


def test_cluster_address_needs_shard_servers_reachable_from_the_driver():
    """With an address the run goes to Ray Train workers: a local table or in-process
    shards would stay inside the worker and values.safetensors would come back empty."""
    with pytest.raises(ConfigError) as info:
        load_config("small", ["cluster.address=auto", "shards.count=0"])
    assert "cluster.address='auto' needs value tables in shard servers" in str(info.value)
    assert "shards.count=0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(
            "small", ["cluster.address=auto", "shards.count=2", "shards.transport=inprocess"]
        )
    assert "shards.transport='inprocess'" in str(info.value)
    assert "would not come back" in str(info.value)
    for transport in ("ray", "collective"):
        cfg = load_config(
            "small", ["cluster.address=auto", "shards.count=2", f"shards.transport={transport}"]
        )
        assert cfg.cluster.address == "auto" and cfg.shards.transport == transport
    assert load_config("dense", ["cluster.address=auto"]).model.memory is None


def test_a_folder_or_file_named_like_a_named_config_does_not_shadow_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dense").mkdir()
    cfg = load_config("dense")
    assert cfg.name == "dense" and cfg.model.memory is None
    note = capsys.readouterr().err
    assert "'dense' is the named config; write ./dense to use the file" in note
    assert len(note.strip().splitlines()) == 1
    # A plain file without a suffix: the named config still wins, with the same note.
    (tmp_path / "small").write_text("model: {dim: 64, n_heads: 2}\n")
    assert load_config("small").model.dim == 128
    assert "write ./small to use the file" in capsys.readouterr().err
    assert load_config("./small").model.dim == 64
    # No note when nothing in the working directory shares the name.
    (tmp_path / "dense").rmdir()
    load_config("dense")
    assert capsys.readouterr().err == ""
    # A name that is not a named config: the error lists the known ones and says how
    # to use a file of that name.
    (tmp_path / "mine").write_text("model: {dim: 64, n_heads: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config("mine")
    assert "unknown config 'mine'" in str(info.value) and "'dense'" in str(info.value)
    assert "write ./mine to use it" in str(info.value)
    assert load_config("./mine").model.dim == 64
    with pytest.raises(ConfigError) as info:
        load_config("nope")
    assert "write ./" not in str(info.value)
    # Paths (a separator or a YAML suffix) are paths, as before.
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="'./d' is not a file"):
        load_config("./d")
    with pytest.raises(ConfigError, match="config file 'sub/missing' does not exist"):
        load_config("sub/missing")
