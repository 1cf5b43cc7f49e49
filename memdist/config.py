"""The run configuration: one tree of typed dataclasses, YAML named configs and overrides.

A run is described by ``RunConfig``. Named configs live in ``memdist/configs/*.yaml``;
``load_config(name_or_path, overrides)`` merges the YAML over the dataclass
defaults, applies ``key.sub=value`` overrides, rejects unknown keys and validates
every rule, raising ``ConfigError`` naming the value. ``to_dict`` gives the resolved
config that is written into each run folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memdist.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "small"
MAX_ATTRIBUTES = 10  # len(memdist.data.corpus.ALL_ATTRIBUTES)
MAX_VALUES_PER_ATTRIBUTE = 2000  # memdist.data.corpus's limit on invented values
VALUE_OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclass(kw_only=True, slots=True)
class MemoryConfig:
    """Product-key memory layers (Memory+ by default) and their value table."""

    layers: list[int] = field(default_factory=lambda: [1])  # blocks whose FFN becomes memory
    n_keys: int = 64  # keys per half; the table has n_keys**2 rows
    k_dim: int = 64  # query/key width per head, split into two halves
    heads: int = 4
    knn: int = 16  # rows read per head and token
    v_dim: int | None = None  # row width; None means the model width
    shared_table: bool = False  # all memory layers read one table (the paper's shared pool)
    qk_norm: bool = True
    swilu: bool = True  # Memory+ output W_o(y * silu(W_1 x))
    gate: bool = False  # optional sigmoid gate on the memory output
    value_optimizer: str = "adam"
    value_lr: float = 1e-3  # values have their own, fixed learning rate (paper: 1e-3)
    value_weight_decay: float = 0.0
    value_eps: float = 1e-8
    value_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # lazy Adam's
    value_grad_clip: float | None = None  # max norm of the values' gradient (null: off)
    backend: str = "auto"  # kernels: auto | cpp | torch | triton | reference

    @property
    def rows(self) -> int:
        return self.n_keys**2

    def state_floats_per_value(self, v_dim: int) -> float:
        """Optimizer state per value, in floats: Adam's two moments, row-wise Adagrad's
        one float per row (its row step count and the like are left out)."""
        return {"sgd": 0.0, "adagrad": 1.0 / v_dim, "adam": 2.0}[self.value_optimizer]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A small Llama-style decoder; ``memory`` is None for the dense baseline."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int | None = None  # None means the Llama rule: 8/3 * dim rounded to 32
    vocab_size: int = 264  # bytes + specials, rounded up
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    memory: MemoryConfig | None = field(default_factory=MemoryConfig)

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 32 * ((8 * self.dim // 3 + 31) // 32)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where tokens come from: the built-in factual corpus or the user's Parquet files."""

    source: str = "builtin"  # "builtin", or a Parquet file, directory or glob
    text_column: str = "text"
    qa_eval: str | None = None  # Parquet with prompt/answer columns for QA eval (user data)
    cache_dir: str = "~/.cache/memdist/data"
    n_people: int = 200
    n_bio_variants: int = 3
    qa_train_fraction: float = 0.5
    n_attributes: int = 5  # facts per person (up to 10 built-in attributes)
    values_per_attribute: int | None = None  # width of every value list; None: built-in (~10)
    seq_len: int = 128
    batch_size: int = 16
    shuffle_buffer: int = 1024
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW for the dense backbone, warmup then cosine decay, gradient clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often a run saves checkpoints, and which one it resumes from."""

    dir: str | None = None  # a folder or s3://bucket/prefix; null: no checkpoints
    every: int = 0  # steps between saves; 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3  # complete checkpoints kept (the newest is never deleted)
    full_every: int = 0  # steps between full saves; the saves between write changed rows only
    background: bool = True  # tables are written while the next steps run
    endpoint_url: str | None = None  # an S3-compatible store's endpoint (s3:// only)
    # Each S3 request is tried this many times in all (backing off exponentially) before
    # the save fails; training goes on and the next save tries again.
    s3_max_attempts: int = 5
    resume: str | None = None  # a checkpoint's URI, or "latest" (the newest in dir)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop: length, precision, DeepSpeed stage, logging cadence."""

    steps: int = 1000
    max_minutes: float | None = None  # stop early at this wall-clock budget (None = no limit)
    seed: int = 0
    grad_accum: int = 1
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end
    # Start from a finished run's folder: its backbone and value rows, with fresh
    # optimizers, schedule and step 0 (finetuning, e.g. on new documents).
    init_from: str | None = None
    # Train only the memory values: every backbone parameter (attention, FFNs, the memory
    # layers' queries, keys and projections) keeps the value it started with.
    freeze_backbone: bool = False
    deepspeed: str | None = None  # the user's DeepSpeed JSON; memdist fills only what it must
    # false: the value tables are not saved into the run folder at the end (the backbone
    # is), nor required to be kept by checkpoints: for benchmarks of very large tables.
    save_tables: bool = True
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """What evaluation measures and how much of it."""

    max_qa: int = 200  # held-out questions answered by greedy decoding
    max_new_tokens: int = 24
    ppl_batches: int = 4  # batches of held-out text for perplexity
    batch_size: int = 64


@dataclass(kw_only=True, slots=True)
class ShardsConfig:
    """Where value tables live: in the training process (count 0) or in shard servers."""

    count: int = 0  # shard servers per table; 0 keeps a local table in the worker
    plan: str = "auto"  # row | column | auto (fewest bytes moved per step)
    transport: str = "ray"  # ray (object store) | collective (gloo group) | inprocess
    timeout_s: float = 60.0  # a shard that does not answer within this fails the step
    budget_mb: float | None = None  # per-shard memory for values + optimizer state
    # Where shards over budget keep their zarr arrays: a folder on each shard's own node
    # (a run gets its own subfolder); None: the run folder's shards/ (one machine).
    store_dir: str | None = None
    # Place shards on memory nodes (the `memdist_shard` resource; the autoscaler adds
    # such nodes when there are none): null when the cluster has them or its launcher
    # config offers them, true always, false never.
    memory_nodes: bool | None = None
    # Shards not running by then fail the run (no node for them), as does a shard that
    # writes no row of its new zarr region for this long (it shows progress meanwhile).
    start_timeout_s: float = 900.0
    cpus_per_shard: float = 0.0  # Ray resources each shard actor reserves
    gpus_per_shard: float = 0.0
    # Torch threads in each shard; null: its reserved CPUs (cpus_per_shard >= 1), else
    # all of a memory node's CPUs shared among the shards it takes, else 1.
    threads_per_shard: int | None = None
    # Each shard's threads on cores of their own among the shards on its node (none of
    # two shards sharing a core while another idles); off: the system's scheduler moves
    # them. For nodes whose cores these shards have to themselves: another run's pinned
    # shards on the same node would take the same cores.
    pin_cores: bool = False
    payload: str = "fp32"  # dtype of scores, outputs and gradients on the wire: fp32 | bf16 | fp16
    staleness: int = 0  # 1: a step's update may overlap the next step's lookups (not exact)
    prefetch: bool = False  # hint the next batch's rows to zarr-backed shards (exact)
    # Lookups, backwards and their replies to Ray shards on the worker's own node travel
    # through shared memory (memdist.shm) instead of Ray's object store (same bits, less
    # time a step).
    shared_memory: bool = True
    # The ordered requests (lookups, backwards, hints, steps sent ahead) go to each Ray
    # shard on a direct line (memdist.line: a Unix socket on the worker's node, TCP to
    # others) instead of Ray's actor calls (same bits, less time a step).
    direct_lines: bool = True


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Where the run's processes go: data-parallel backbone workers on a Ray cluster."""

    workers: int = 1  # 1 trains in this process; more run as Ray Train workers
    address: str | None = None  # None starts a local Ray instance; "auto" or "ray://host:port"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    # Recoveries a run may make: a shard actor, a worker or a node that dies sends every
    # shard and worker back to the last checkpoint (Ray restarts what died) and training
    # goes on; one more failure fails the run. 0: the first failure fails it.
    max_failures: int = 0


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The whole run: every value a run uses is in here and saved with it."""

    name: str = DEFAULT_CONFIG
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats where allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r} does not match {tp}: {'; '.join(errors)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = _dataclass_type(tp)
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value, f"{prefix}{name}.")
        elif sub is not None and value is not None:
            raise ConfigError(f"{prefix}{name} must be a mapping or null, got {value!r}")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The resolved config as plain data (for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.dim=256"`` -> (["model", "dim"], 256); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the nested dict (before validation)."""
    out = _deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _is_path(name: str) -> bool:
    """A path has a separator or a YAML suffix; anything else names a config."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in name for sep in seps) or Path(name).suffix in (".yaml", ".yml")


def resolve_config_path(name_or_path: str | None) -> Path:
    """A named config (``small``, ``dense``) or a path to a YAML file.

    The form decides, not what happens to exist: a name without a separator or a
    ``.yaml``/``.yml`` suffix is a named config even when the working directory has a
    file or folder of that name (``memdist train dense`` next to a ``dense/`` folder
    must not change meaning); a one-line note on stderr says so. ``./NAME`` is the file.
    """
    name = name_or_path or DEFAULT_CONFIG
    if _is_path(name):
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"config file {name!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {name!r} is not a file")
        return path
    named = CONFIG_DIR / f"{name}.yaml"
    local = Path(name)
    if not named.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        hint = f"; a file {name!r} is here: write ./{name} to use it" if local.is_file() else ""
        raise ConfigError(
            f"unknown config {name!r}: not one of the named configs {known} (a path needs "
            f"a / or a .yaml suffix){hint}"
        )
    if local.exists():
        print(
            f"memdist: {name!r} is the named config; write ./{name} to use the file",
            file=sys.stderr,
        )
    return named


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a named or file config, apply overrides, validate, and return the tree."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}") from exc
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild and validate a saved (resolved) config."""
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_memory(mem: MemoryConfig, dim: int, n_layers: int | None = None) -> None:
    """Rules of a memory layer; shared with the model so direct users get the same errors."""
    _check(
        mem.k_dim > 0 and mem.k_dim % 2 == 0,
        f"model.memory.k_dim={mem.k_dim} must be a positive even number "
        "(the query is split into two halves, one per key set)",
    )
    _check(mem.n_keys >= 1, f"model.memory.n_keys={mem.n_keys} must be >= 1")
    _check(mem.heads >= 1, f"model.memory.heads={mem.heads} must be >= 1")
    _check(
        1 <= mem.knn <= mem.n_keys,
        f"model.memory.knn={mem.knn} must be between 1 and n_keys={mem.n_keys} "
        "(top-k is taken within each half-key set)",
    )
    v_dim = mem.v_dim if mem.v_dim is not None else dim
    _check(v_dim >= 1, f"model.memory.v_dim={mem.v_dim} must be >= 1")
    _check(
        mem.swilu or v_dim == dim,
        f"model.memory.v_dim={v_dim} must equal model.dim={dim} when swilu is off "
        "(the memory output is added to the residual stream directly)",
    )
    _check(
        mem.value_optimizer in VALUE_OPTIMIZERS,
        f"model.memory.value_optimizer={mem.value_optimizer!r} must be one of {VALUE_OPTIMIZERS}",
    )
    _check(mem.value_lr > 0, f"model.memory.value_lr={mem.value_lr} must be > 0")
    _check(
        mem.value_eps > 0 and mem.value_weight_decay >= 0,
        f"model.memory.value_eps={mem.value_eps} must be > 0 and "
        f"model.memory.value_weight_decay={mem.value_weight_decay} >= 0",
    )
    _check(
        len(mem.value_betas) == 2 and all(0 <= b < 1 for b in mem.value_betas),
        f"model.memory.value_betas={mem.value_betas} must be two numbers in [0, 1)",
    )
    _check(
        mem.value_grad_clip is None or mem.value_grad_clip > 0,
        f"model.memory.value_grad_clip={mem.value_grad_clip} must be > 0 or null (off)",
    )
    _check(
        mem.backend in ("auto", "cpp", "torch", "triton", "reference"),
        f"model.memory.backend={mem.backend!r} must be auto, cpp, torch, triton or reference",
    )
    _check(len(mem.layers) >= 1, "model.memory.layers must name at least one block")
    _check(
        len(set(mem.layers)) == len(mem.layers),
        f"model.memory.layers={mem.layers} names a block twice",
    )
    if n_layers is not None:
        bad = [i for i in mem.layers if not 0 <= i < n_layers]
        _check(
            not bad,
            f"model.memory.layers={mem.layers}: blocks {bad} are outside "
            f"0..{n_layers - 1} (model.n_layers={n_layers})",
        )


def validate(cfg: RunConfig) -> None:
    """Every cross-field rule of a run; raises ConfigError naming the value and the rule."""
    m = cfg.model
    _check(
        m.dim > 0 and m.n_layers > 0 and m.n_heads > 0,
        f"model.dim={m.dim}, model.n_layers={m.n_layers}, model.n_heads={m.n_heads} "
        "must all be positive",
    )
    _check(
        m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}"
    )
    _check(
        (m.dim // m.n_heads) % 2 == 0,
        f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE rotates pairs)",
    )
    _check(
        m.vocab_size >= 259,
        f"model.vocab_size={m.vocab_size} must be >= 259 (256 bytes + 3 special tokens)",
    )
    if m.memory is not None:
        validate_memory(m.memory, m.dim, m.n_layers)
    d = cfg.data
    _check(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
    _check(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}",
    )
    _check(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    _check(d.n_people >= 2, f"data.n_people={d.n_people} must be >= 2")
    _check(
        1 <= d.n_attributes <= MAX_ATTRIBUTES,
        f"data.n_attributes={d.n_attributes} must be between 1 and {MAX_ATTRIBUTES} "
        "(the built-in corpus's attributes)",
    )
    _check(
        d.values_per_attribute is None or 2 <= d.values_per_attribute <= MAX_VALUES_PER_ATTRIBUTE,
        f"data.values_per_attribute={d.values_per_attribute} must be between 2 and "
        f"{MAX_VALUES_PER_ATTRIBUTE} or null (the built-in lists of about 10 words)",
    )
    _check(
        0.0 < d.qa_train_fraction < 1.0,
        f"data.qa_train_fraction={d.qa_train_fraction} must be in (0, 1): some people's "
        "QA pairs train the format, the others' are held out for evaluation",
    )
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    t = cfg.train
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    _check(
        t.precision in ("auto", "fp32", "bf16"),
        f"train.precision={t.precision!r} must be auto, fp32 or bf16",
    )
    _check(
        t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} must be auto, cpu or cuda"
    )
    _check(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    ck = t.checkpoint
    _check(ck.every >= 0, f"train.checkpoint.every={ck.every} must be >= 0 (0: at the end only)")
    _check(ck.keep >= 1, f"train.checkpoint.keep={ck.keep} must be >= 1")
    _check(
        ck.s3_max_attempts >= 1,
        f"train.checkpoint.s3_max_attempts={ck.s3_max_attempts} must be >= 1",
    )
    _check(
        ck.full_every >= 0,
        f"train.checkpoint.full_every={ck.full_every} must be >= 0 (0: every save is full)",
    )
    _check(
        ck.resume != "latest" or ck.dir is not None,
        "train.checkpoint.resume='latest' needs train.checkpoint.dir (where to look)",
    )

    _check(
        not t.freeze_backbone or m.memory is not None,
        "train.freeze_backbone=true needs a memory model (model.memory is null): only the "
        "memory values train when the backbone is frozen, and a dense model has none",
    )
    _check(
        not t.freeze_backbone or t.zero_stage == 0,
        f"train.freeze_backbone=true needs train.zero_stage=0 (got {t.zero_stage}): ZeRO "
        "partitions the backbone's gradients and optimizer state, and a frozen one has none",
    )
    _check(
        t.init_from is None or ck.resume is None,
        f"train.init_from={t.init_from!r} and train.checkpoint.resume={ck.resume!r} both "
        "say where to start: resume continues a run (step, optimizer, data position), "
        "init_from starts a new one from a run's weights; set one",
    )
    _check(
        t.max_minutes is None or t.max_minutes > 0,
        f"train.max_minutes={t.max_minutes} must be > 0 or null",
    )
    sh = cfg.shards
    _check(sh.count >= 0, f"shards.count={sh.count} must be >= 0 (0 keeps a local table)")
    _check(
        sh.plan in ("row", "column", "auto"), f"shards.plan={sh.plan!r} must be row, column or auto"
    )
    _check(
        sh.transport in ("ray", "collective", "inprocess"),
        f"shards.transport={sh.transport!r} must be ray, collective or inprocess",
    )
    _check(
        sh.staleness in (0, 1),
        f"shards.staleness={sh.staleness} must be 0 (synchronous) or 1 (one step of overlap)",
    )
    _check(
        not sh.prefetch or sh.count > 0,
        "shards.prefetch=true needs shard servers (shards.count > 0): "
        "a local table has nothing to prefetch",
    )
    c = cfg.cluster
    _check(c.workers >= 1, f"cluster.workers={c.workers} must be >= 1")
    # An address sends even one worker to Ray Train (memdist.train.uses_workers); the
    # driver saves the values it can reach, so they must be in shard actors, not inside
    # the worker (values.safetensors would come back empty).
    _check(
        c.address is None
        or m.memory is None
        or (sh.count > 0 and sh.transport in ("ray", "collective")),
        f"cluster.address={c.address!r} needs value tables in shard servers reachable from "
        f"the driver: shards.count > 0 with shards.transport=ray or collective (got "
        f"shards.count={sh.count}, shards.transport={sh.transport!r}); a local table or "
        "in-process shards live inside the worker and would not come back",
    )
    _check(c.max_failures >= 0, f"cluster.max_failures={c.max_failures} must be >= 0")
    _check(
        c.max_failures == 0 or (t.checkpoint.dir is not None and t.checkpoint.every > 0),
        f"cluster.max_failures={c.max_failures} recovers from the run's checkpoints: set "
        f"train.checkpoint.dir and train.checkpoint.every > 0 (got dir={t.checkpoint.dir!r}, "
        f"every={t.checkpoint.every})",
    )
    _check(
        c.max_failures == 0 or m.memory is None or (sh.count > 0 and sh.transport == "ray"),
        f"cluster.max_failures={c.max_failures} with a memory model needs its tables in shard "
        f"actors over shards.transport=ray, which Ray restarts (got shards.count={sh.count}, "
        f"shards.transport={sh.transport!r}; the collective transport's groups are not "
        "rebuilt after a failure yet)",
    )
    _check(c.cpus_per_worker >= 0, f"cluster.cpus_per_worker={c.cpus_per_worker} must be >= 0")
    _check(
        c.gpus_per_worker is None or c.gpus_per_worker >= 0,
        f"cluster.gpus_per_worker={c.gpus_per_worker} must be >= 0 or null (auto)",
    )
    _check(
        c.workers == 1 or sh.count > 0 or m.memory is None,
        f"cluster.workers={c.workers} with a memory model needs shard servers (shards.count > 0): "
        "workers cannot share local value tables",
    )
    _check(
        c.workers == 1 or sh.transport != "inprocess",
        f"cluster.workers={c.workers} needs shards.transport=ray or collective: in-process shard servers "
        "live in one worker",
    )
    _check(
        t.deepspeed is None or Path(t.deepspeed).expanduser().is_file(),
        f"train.deepspeed={t.deepspeed!r} is not a file",
    )
    _check(
        sh.payload in ("fp32", "bf16", "fp16"),
        f"shards.payload={sh.payload!r} must be fp32, bf16 or fp16",
    )
    _check(
        sh.threads_per_shard is None or sh.threads_per_shard >= 1,
        f"shards.threads_per_shard={sh.threads_per_shard} must be >= 1 or null (auto)",
    )
    _check(sh.timeout_s > 0, f"shards.timeout_s={sh.timeout_s} must be > 0")
    _check(sh.start_timeout_s > 0, f"shards.start_timeout_s={sh.start_timeout_s} must be > 0")
    _check(
        sh.count == 0 or m.memory is not None,
        f"shards.count={sh.count} needs a memory model (model.memory is null)",
    )
    e = cfg.eval
    _check(
        e.max_qa >= 0 and e.max_new_tokens >= 1 and e.batch_size >= 1,
        f"eval.max_qa={e.max_qa}, eval.max_new_tokens={e.max_new_tokens}, "
        f"eval.batch_size={e.batch_size} must be >= 0, >= 1, >= 1",
    )
