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

Saving stalls training as little as it can: the backbone is written before the next
step (DeepSpeed's save is a collective of every worker; it is the small part), then
every table region takes its snapshot and is written in the background while the
next steps run (``memdist.region_save``); the manifest follows when every part is
durable. A save waits for the one before it. With ``train.checkpoint.full_every`` the
saves between full ones are incremental: their tables hold only the rows changed
since the previous save, and their manifest names that save as ``parent``.

Resuming checks each object against the manifest before it is deserialised (the
backbone's files before DeepSpeed's loader, which unpickles, reads them; each table
region before zarr reads it), loads the backbone and the tables (the chain of saves
for an incremental checkpoint, into any number of shards under either plan), and
skips the data the saved steps consumed, so the steps after a resume are the steps
the run would have taken.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from memdist.config import RunConfig, to_dict
from memdist.errors import CheckpointError
from memdist.storage import manifest as mf
from memdist.storage.table_store import Source, check_objects, tree_objects
from memdist.storage.targets import CheckpointTarget, open_target
from memdist.table import PendingSave, ValueTable

log = logging.getLogger(__name__)

TRAINER_KEY = "trainer.json"
BACKBONE = "backbone"
TAG = "engine"  # DeepSpeed's tag inside backbone/
PROGRESS_EVERY_S = 5.0  # a save still being written says how far it is this often
POLL_S = 0.2


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
        self.root: CheckpointTarget | None = self._open(ck.dir) if ck.dir else None
        self.records: list[dict[str, Any]] = []  # what finished saves report (``drain``)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._parent: str | None = None  # the previous save's key, when it completed
        self._last_full = -1  # the step of the last full save
        self._error_step = -1  # the step of the save that failed

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def check(self) -> None:
        """Fail now, not after hours of training, when the checkpoint folder or bucket
        cannot be written."""
        if self.root is not None and self.rank == 0:
            self.root.check_writable()

    # -- saving ------------------------------------------------------------------------
    def _incremental(self, step: int) -> bool:
        every = self.cfg.train.checkpoint.full_every
        return every > 0 and self._parent is not None and step - self._last_full < every

    def save(self, step: int, engine, tables: list[ValueTable], state: dict[str, Any]) -> str:
        """Begin the checkpoint of ``step`` (every worker calls this): the backbone is
        written now, the tables in the background, the manifest last. Returns its URI.
        A store that fails (an S3 outage) fails this save only: it is reported, the
        previous checkpoints stay, training goes on, and the next save is a full one."""
        assert self.root is not None
        self.wait(raise_error=False)  # one save at a time; a failed one was reported
        ck = self.root.child(mf.step_prefix(step))
        failed = ""
        with tempfile.TemporaryDirectory(prefix="memdist-backbone-") as tmp:
            # A collective, every worker its part; the universal-checkpoint info lets a
            # resume with another worker count convert it (``to_universal``).
            engine.save_checkpoint(tmp, tag=TAG, client_state=_universal_info())
            objects = tree_objects(Path(tmp), BACKBONE)
            try:
                ck.put_tree(BACKBONE, tmp)
            except CheckpointError as exc:
                failed = f"worker {self.rank}: {exc}"
        parts = _all_gather((objects, failed), self.world)
        errors = [error for _, error in parts if error]
        if errors:
            self._parent = None
            self._error = CheckpointError(
                f"the checkpoint of step {step} failed: {'; '.join(errors)}"
            )
            self._error_step = step
        elif self.rank == 0:
            objects = {k: v for part, _ in parts for k, v in part.items()}
            incremental = self._incremental(step)
            parent = self._parent if incremental else None
            started = time.perf_counter()
            saves = [
                t.begin_save(ck, f"tables/table{i}", changed_only=incremental)
                for i, t in enumerate(tables)
            ]  # every region's snapshot is taken: training may go on
            blob = json.dumps({**state, "step": step, "rng": _rng_state()}).encode()
            meta = {"tables": [t.describe() for t in tables], "workers": self.world,
                    "shapes": [[t.num_rows, t.dim] for t in tables],
                    "kind": "incremental" if incremental else "full", "parent": parent}  # fmt: skip
            self._parent = None  # until this save completes
            if not incremental:
                self._last_full = step
            args = (ck, step, saves, objects, blob, meta, started)
            self._thread = threading.Thread(
                target=self._finish, args=args, name="memdist-checkpoint", daemon=True
            )
            self._thread.start()
            if not self.cfg.train.checkpoint.background:
                self.wait(raise_error=False)  # written before the next step
        _barrier(self.world)
        return ck.uri

    def _finish(self, ck: CheckpointTarget, step: int, saves: list[PendingSave],
                objects: dict[str, Any], blob: bytes, meta: dict[str, Any],
                started: float) -> None:  # fmt: skip
        """The background part of a save: wait for the tables, then the trainer state and
        the manifest, then prune. Errors are kept for ``wait``."""
        try:
            self._follow(step, saves, started)
            for save in saves:
                objects.update(save.result())
            ck.put_bytes(TRAINER_KEY, blob)
            objects[TRAINER_KEY] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            table_bytes = sum(o["size"] for k, o in objects.items() if k.startswith("tables/"))
            meta["bytes"] = {
                "tables": table_bytes,
                "total": sum(o["size"] for o in objects.values()),
            }
            mf.write_manifest(ck, step, to_dict(self.cfg), meta, objects)
            self._parent = mf.step_prefix(step)  # complete: the next save may build on it
            self._prune()
            seconds = time.perf_counter() - started
            self.records.append({"kind": "checkpoint_done", "step": step, "uri": ck.uri,
                         "save": meta["kind"], "table_bytes": table_bytes,
                         "total_bytes": meta["bytes"]["total"], "seconds": round(seconds, 3),
                         "mb_per_s": round(table_bytes / 2**20 / max(seconds, 1e-9), 1)})  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self._error = CheckpointError(f"the checkpoint of step {step} failed: {exc}")
            self._error.__cause__ = exc
            self._error_step = step

    def _follow(self, step: int, saves: list[PendingSave], started: float) -> None:
        """Wait for the tables' regions, reporting how far they are every few seconds."""
        next_report = started + PROGRESS_EVERY_S
        while True:
            parts = [p for save in saves for p in save.progress()]
            if all(p["done"] for p in parts):
                return
            now = time.perf_counter()
            if now >= next_report:
                next_report = now + PROGRESS_EVERY_S
                done, total = (
                    sum(p["rows_done"] for p in parts),
                    sum(p["rows_total"] for p in parts),
                )
                self.records.append({"kind": "message", "text": (
                    f"checkpoint of step {step}: {done} of {total} table rows written by "
                    f"{len(parts)} regions in {now - started:.0f} s ({done / (now - started):.0f} rows/s)"
                )})  # fmt: skip
            time.sleep(POLL_S)

    def _prune(self) -> None:
        """Delete checkpoints beyond ``keep``; a store that fails here leaves them for the
        next save to delete (the checkpoint just written is complete either way)."""
        assert self.root is not None
        try:
            mf.prune(self.root, self.cfg.train.checkpoint.keep)
        except CheckpointError as exc:
            log.warning("old checkpoints stay until the next save: %s", exc)
            self.records.append({"kind": "message", "text": f"old checkpoints stay: {exc}"})

    def wait(self, *, raise_error: bool = True, emit: Any = None) -> None:
        """Wait for the save under way (on the lead worker) to be complete, passing its
        progress records to ``emit`` meanwhile. A failed save leaves the previous
        checkpoints as they were; it is raised here, or logged with ``raise_error=False``
        (a later save will try again, in full)."""
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(POLL_S)
                for record in self.drain() if emit is not None else []:
                    emit(record)
            self._thread = None
        error, self._error = self._error, None
        if error is None:
            return
        if raise_error:
            raise error
        log.error("%s; training goes on, the next save is a full one", error)
        self.records.append({"kind": "checkpoint_failed", "step": self._error_step,
                             "error": f"{error}; training goes on, the next save is a full one"})  # fmt: skip

    def drain(self) -> list[dict[str, Any]]:
        """Records of saves finished since the last call (for the training thread's log)."""
        out = []
        while self.records:
            out.append(self.records.pop(0))
        return out

    # -- resuming ------------------------------------------------------------------------
    def resolve(self, where: str) -> CheckpointTarget:
        """The checkpoint ``where`` names: a URI, or ``latest`` (newest complete in dir)."""
        if where == "latest":
            assert self.root is not None  # validated with the config
            found = mf.latest_complete(self.root)
            if found is None:
                raise CheckpointError(f"no complete checkpoint under {self.root.uri!r}")
            return self.root.child(found.key)
        return self._open(where)

    def _open(self, uri: str) -> CheckpointTarget:
        ck = self.cfg.train.checkpoint
        return open_target(uri, endpoint_url=ck.endpoint_url, max_attempts=ck.s3_max_attempts)

    def check_resume(self, where: str) -> bool:
        """Check that this run can resume from ``where`` (the same model and global
        batch); returns whether the worker count changes under ZeRO, so the backbone
        goes through DeepSpeed's universal checkpoint (its optimizer state is
        partitioned by worker)."""
        manifest = mf.read_manifest(self.resolve(where))
        self._check_model(manifest)
        saved = int(manifest.meta.get("workers", self.world))
        data, train = manifest.config.get("data", {}), manifest.config.get("train", {})
        batch = int(data.get("batch_size", 0)) * saved
        accum = int(train.get("grad_accum", self.cfg.train.grad_accum))
        ours = self.cfg.data.batch_size * self.world
        if (batch, accum) != (ours, self.cfg.train.grad_accum):
            raise CheckpointError(
                f"the checkpoint of step {manifest.step} trained on global batches of {batch} "
                f"rows ({saved} workers x data.batch_size) with train.grad_accum={accum}; this "
                f"run's are {ours} rows ({self.world} x {self.cfg.data.batch_size}) with "
                f"{self.cfg.train.grad_accum}: keep workers x batch_size and grad_accum, so the "
                "batches after the resume are the ones the run would have read"
            )
        ours = self.cfg.train.zero_stage
        stage = int(train.get("zero_stage", ours))
        if (stage == 3) != (ours == 3):
            raise CheckpointError(
                f"the checkpoint of step {manifest.step} was saved under ZeRO stage {stage}; "
                f"this run has train.zero_stage={ours}: ZeRO-3 keeps the backbone's "
                "parameters partitioned, and DeepSpeed loads its checkpoints only under "
                f"ZeRO-3 and ZeRO-3 only from those: resume with train.zero_stage={stage}"
            )
        return saved != self.world and ours > 0

    def restore(self, where: str, engine, tables: list[ValueTable]) -> dict[str, Any]:
        """Load the checkpoint ``where`` into ``engine`` and ``tables`` (every worker calls
        this); returns the trainer state saved with it."""
        started = time.perf_counter()
        ck = self.resolve(where)
        manifest = mf.read_manifest(ck)
        self._check_model(manifest)
        objects = manifest.objects
        links = mf.chain(ck, manifest, folder=self._folder_of(ck))
        with tempfile.TemporaryDirectory(prefix="memdist-restore-") as tmp:
            root = Path(tmp)
            ck.get_tree(BACKBONE, root / BACKBONE)
            check_objects(root / BACKBONE, BACKBONE, objects, "")  # before DeepSpeed unpickles
            folder = root / BACKBONE
            if int(manifest.meta.get("workers", self.world)) != self.world and (
                engine.zero_optimization_stage() > 0
            ):
                folder = to_universal(root / BACKBONE, root / "universal")
            path, _ = engine.load_checkpoint(str(folder), tag=TAG)
            if path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint under {ck.uri}/{BACKBONE}")
        blob = ck.get_bytes(TRAINER_KEY)
        meta = objects.get(TRAINER_KEY)
        if meta is None or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"checkpoint object {TRAINER_KEY!r} does not match its checksum")
        state = json.loads(blob)
        if self.rank == 0:  # the tables are shared: one worker loads them
            load_tables(links, tables)
        _barrier(self.world)  # no worker reads a table before it is loaded
        _set_rng_state(state.pop("rng"))
        state["uri"] = ck.uri
        read = [o["size"] for k, o in objects.items() if not k.startswith("tables/")]
        read += [
            o["size"] for _, m in links for k, o in m.objects.items() if k.startswith("tables/")
        ]
        state["loaded_mb"] = sum(read) / 2**20
        state["load_seconds"] = time.perf_counter() - started
        # The next save may build on this one when it lies in this run's folder.
        if self.root is not None and ck == self.root.child(mf.step_prefix(manifest.step)):
            self._parent = mf.step_prefix(manifest.step)
            self._last_full = links[0][1].step
        return state

    def _folder_of(self, ck: CheckpointTarget) -> CheckpointTarget:
        c = self.cfg.train.checkpoint
        return mf.folder_of(ck, endpoint_url=c.endpoint_url, max_attempts=c.s3_max_attempts)

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


def _universal_info() -> dict[str, Any]:
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }


def to_universal(saved: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint in ``saved`` (its own
    ``ds_to_universal`` converter), which loads into any number of workers."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as convert

    convert(argparse.Namespace(
        input_folder=str(saved / TAG), output_folder=str(out / TAG), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False,
    ))  # fmt: skip
    return out


def load_tables(links: list[tuple[CheckpointTarget, mf.Manifest]],
                tables: list[ValueTable]) -> None:  # fmt: skip
    """Load ``tables`` from a chain of checkpoints (``manifest.chain``: full, then
    incremental ones), checking the table count first."""
    objects = links[-1][1].objects
    saved = sum(1 for k in objects if k.startswith("tables/") and k.endswith("/zarr.json")
                and k.count("/") == 2)  # fmt: skip
    if saved != len(tables):
        raise CheckpointError(
            f"{links[-1][0].uri} holds {saved} value tables; this run has {len(tables)}"
        )
    sources = [Source(target, manifest.objects) for target, manifest in links]
    for i, table in enumerate(tables):
        table.load(sources, f"tables/table{i}")


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
