"""Saving a run as a checkpoint and resuming from one, exactly.

A checkpoint is a ``step-NNNNNN/`` prefix of a checkpoint folder or ``s3://`` prefix
(``memdist.storage.targets``) holding:

- ``tables/table{i}/``: one zarr group per value table (``memdist.storage.table_store``),
  each region written by the shard (or process) that holds it;
- ``backbone/``: DeepSpeed's own checkpoint of the engine (every worker writes its
  part), so DeepSpeed's tools such as ``zero_to_fp32.py`` work on it;
- ``trainer.json``: step, tokens, and the RNG state (base64), in plain JSON;
- ``manifest.json``, written last (``memdist.storage.manifest``): the step, the resolved
  config, the plans and each object's size and SHA-256. No manifest, no checkpoint.

Resuming checks each object against the manifest before it is deserialised (the
backbone's files before DeepSpeed's loader, which unpickles, reads them; each table
region before zarr reads it), loads the backbone and the tables (into any number of
shards under either plan), and skips the data the saved steps consumed, so the steps
after a resume are the steps the run would have taken.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from memdist.config import RunConfig, to_dict
from memdist.errors import CheckpointError
from memdist.storage import manifest as mf
from memdist.storage.table_store import check_objects, tree_objects
from memdist.storage.targets import CheckpointTarget, open_target
from memdist.table import ValueTable

TRAINER_KEY = "trainer.json"
BACKBONE = "backbone"
TAG = "engine"  # DeepSpeed's tag inside backbone/


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


class Checkpointer:
    """Saves and restores one worker's part of a run; the lead worker (rank 0) writes the
    tables, the trainer state and the manifest, every worker its backbone partition."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg = cfg
        self.rank, self.world = rank, world
        ck = cfg.train.checkpoint
        self.root: CheckpointTarget | None = (
            open_target(ck.dir, endpoint_url=ck.endpoint_url) if ck.dir else None
        )

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def check(self) -> None:
        """Fail now, not after hours of training, when the checkpoint folder or bucket
        cannot be written."""
        if self.root is not None and self.rank == 0:
            self.root.check_writable()

    # -- saving ------------------------------------------------------------------------
    def save(self, step: int, engine, tables: list[ValueTable], state: dict[str, Any]) -> str:
        """Write the checkpoint of ``step`` (every worker calls this); returns its URI."""
        assert self.root is not None
        ck = self.root.child(mf.step_prefix(step))
        with tempfile.TemporaryDirectory(prefix="memdist-backbone-") as tmp:
            engine.save_checkpoint(tmp, tag=TAG)  # a collective: every worker its part
            objects = tree_objects(Path(tmp), BACKBONE)
            ck.put_tree(BACKBONE, tmp)
        parts = _all_gather(objects, self.world)
        if self.rank == 0:
            objects = {k: v for part in parts for k, v in part.items()}
            for i, table in enumerate(tables):
                objects.update(table.save(ck, f"tables/table{i}"))
            blob = json.dumps({**state, "step": step, "rng": _rng_state()}).encode()
            ck.put_bytes(TRAINER_KEY, blob)
            objects[TRAINER_KEY] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            meta = {"tables": [t.describe() for t in tables], "workers": self.world,
                    "shapes": [[t.num_rows, t.dim] for t in tables]}  # fmt: skip
            mf.write_manifest(ck, step, to_dict(self.cfg), meta, objects)
            mf.prune(self.root, self.cfg.train.checkpoint.keep)
        _barrier(self.world)
        return ck.uri

    # -- resuming ------------------------------------------------------------------------
    def resolve(self, where: str) -> CheckpointTarget:
        """The checkpoint ``where`` names: a URI, or ``latest`` (newest complete in dir)."""
        ck = self.cfg.train.checkpoint
        if where == "latest":
            assert self.root is not None  # validated with the config
            found = mf.latest_complete(self.root)
            if found is None:
                raise CheckpointError(f"no complete checkpoint under {self.root.uri!r}")
            return self.root.child(found.key)
        return open_target(where, endpoint_url=ck.endpoint_url)

    def restore(self, where: str, engine, tables: list[ValueTable]) -> dict[str, Any]:
        """Load the checkpoint ``where`` into ``engine`` and ``tables`` (every worker calls
        this); returns the trainer state saved with it."""
        ck = self.resolve(where)
        manifest = mf.read_manifest(ck)
        self._check_model(manifest)
        objects = manifest.objects
        with tempfile.TemporaryDirectory(prefix="memdist-restore-") as tmp:
            root = Path(tmp)
            ck.get_tree(BACKBONE, root / BACKBONE)
            check_objects(root / BACKBONE, BACKBONE, objects, "")  # before DeepSpeed unpickles
            path, _ = engine.load_checkpoint(str(root / BACKBONE), tag=TAG)
            if path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint under {ck.uri}/{BACKBONE}")
        blob = ck.get_bytes(TRAINER_KEY)
        meta = objects.get(TRAINER_KEY)
        if meta is None or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"checkpoint object {TRAINER_KEY!r} does not match its checksum")
        state = json.loads(blob)
        if self.rank == 0:  # the tables are shared: one worker loads them
            saved = sum(1 for k in objects if k.startswith("tables/") and k.endswith("/zarr.json")
                        and k.count("/") == 2)  # fmt: skip
            if saved != len(tables):
                raise CheckpointError(
                    f"{ck.uri} holds {saved} value tables; this run has {len(tables)}"
                )
            for i, table in enumerate(tables):
                table.load(ck, f"tables/table{i}", objects)
        _barrier(self.world)  # no worker reads a table before it is loaded
        _set_rng_state(state.pop("rng"))
        state["uri"] = ck.uri
        return state

    def _check_model(self, manifest: mf.Manifest) -> None:
        saved, ours = manifest.config.get("model"), to_dict(self.cfg.model)
        if saved != ours:
            diff = sorted(
                k for k in set(saved or {}) | set(ours) if (saved or {}).get(k) != ours.get(k)
            )
            raise CheckpointError(
                f"the checkpoint of step {manifest.step} was saved with another model "
                f"(model keys that differ: {diff}); resume with the same model config"
            )


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
