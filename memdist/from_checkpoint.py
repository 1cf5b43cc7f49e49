"""A model from a checkpoint, for evaluation, generation and export; no training state.

``load_model(uri)`` rebuilds the saved model: the backbone from DeepSpeed's checkpoint
(its files checked against the manifest before DeepSpeed's pickle-based format is
read; ZeRO-3 partitions are gathered with DeepSpeed's own ``zero_to_fp32``), and each
value table either in this process, when it fits ``max_table_mb``, or in shard
servers as the run had them, each shard reading its own region. ``export`` writes a
folder that loads without Ray or DeepSpeed (``model.safetensors``,
``values.safetensors``, ``config.yaml``), and ``memdist eval`` reads. ``generate``
continues a prompt greedily or by sampling.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from memdist import checkpoint as weights
from memdist.assembly import build_model, unique_tables, value_optimizer
from memdist.checkpointing import BACKBONE, TAG, load_tables
from memdist.config import RunConfig, config_from_dict, to_dict
from memdist.data.tokenizer import ByteTokenizer
from memdist.errors import CheckpointError
from memdist.model import Transformer
from memdist.storage import manifest as mf
from memdist.storage.table_store import check_objects
from memdist.storage.targets import open_target

DEFAULT_MAX_TABLE_MB = 4096.0


def table_mb(cfg: RunConfig, *, with_state: bool = False) -> float:
    """Megabytes of one value table's rows (fp32), with or without its optimizer state."""
    mem = cfg.model.memory
    if mem is None:
        return 0.0
    v_dim = mem.v_dim if mem.v_dim is not None else cfg.model.dim
    extra = mem.state_floats_per_value(v_dim) if with_state else 0.0
    return mem.rows * v_dim * 4 * (1 + extra) / 2**20


def backbone_state(local: Path) -> dict[str, torch.Tensor]:
    """The whole backbone's fp32 state from a DeepSpeed checkpoint folder (verified)."""
    states = torch.load(local / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)  # fmt: skip
    if states["ds_config"].get("zero_optimization", {}).get("stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(local), tag=TAG))
    return {k: v.float() for k, v in states["module"].items()}


class Loaded:
    """A model rebuilt from a checkpoint; ``close()`` stops shard servers it started."""

    def __init__(self, cfg: RunConfig, model: Transformer, tables: list[Any], group: Any) -> None:
        self.cfg, self.model, self.tables, self.group = cfg, model, tables, group

    def close(self) -> None:
        if self.group is not None:
            self.group.stop()

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(
    uri: str, *, endpoint_url: str | None = None, max_table_mb: float = DEFAULT_MAX_TABLE_MB
) -> Loaded:
    target = open_target(uri, endpoint_url=endpoint_url)
    manifest = mf.read_manifest(target)
    cfg = config_from_dict(manifest.config)
    remote, group = None, None
    if table_mb(cfg) > max_table_mb:
        if cfg.shards.count == 0:
            raise CheckpointError(
                f"a value table of the checkpoint at {uri} is {table_mb(cfg):.0f} MB, over the "
                f"{max_table_mb:g} MB one process may hold here, and the run had no shards "
                "to spread it over: raise the budget (--max-table-mb)"
            )
        from memdist.shards import start_remote_tables

        remote, group = start_remote_tables(cfg)
    try:
        model, tables = build_model(cfg, torch.device("cpu"), remote)
        with tempfile.TemporaryDirectory(prefix="memdist-model-") as tmp:
            local = Path(tmp) / BACKBONE
            target.get_tree(BACKBONE, local)
            check_objects(local, BACKBONE, manifest.objects, "")  # before torch.load
            model.load_state_dict(backbone_state(local))
        folder = mf.folder_of(target, endpoint_url=endpoint_url)
        load_tables(mf.chain(target, manifest, folder=folder), unique_tables(tables))
    except BaseException:
        if group is not None:
            group.stop()
        raise
    model.eval()
    return Loaded(cfg, model, unique_tables(tables), group)


def export(uri: str, out: Path, *, endpoint_url: str | None = None,
           max_table_mb: float = DEFAULT_MAX_TABLE_MB) -> dict[str, Any]:  # fmt: skip
    """Write the checkpoint's model as a folder of safetensors and its config; a table
    over ``max_table_mb`` is refused (it would be gathered into this process)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"export folder {str(out)!r} is not empty")
    with load_model(uri, endpoint_url=endpoint_url, max_table_mb=max_table_mb) as loaded:
        out.mkdir(parents=True, exist_ok=True)
        cfg = loaded.cfg
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        weights.save_weights(out, loaded.model, loaded.tables)
    return {"exported": str(out), "from": uri, "table_mb": table_mb(cfg),
            "optimizer": value_optimizer(cfg.model.memory).name if cfg.model.memory else None}  # fmt: skip


@torch.no_grad()
def generate(model: Transformer, prompt: str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0) -> str:  # fmt: skip
    """Continue ``prompt``: greedy at temperature 0, else sampled; stops at EOS."""
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-model.cfg.max_seq_len :]], dtype=torch.long)
        logits = model(window)[0, -1].float()
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
        out.append(nxt)
    return tok.decode(out)
