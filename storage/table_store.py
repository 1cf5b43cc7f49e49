"""A value table in a checkpoint: one zarr v3 group, one sub-group per shard region.

Layout of ``tables/table{i}/`` (plain zarr: ``zarr.open_group`` reads it without memdist)::

    zarr.json                  group attributes: rows, dim, plan kind, regions, optimizer
    region{s}/zarr.json        attributes: row_start, row_stop, col_start, col_stop
    region{s}/weight           (rows, cols) float32 values of that region
    region{s}/state.<name>     its optimizer state ((rows, cols) or per row (rows,))

Each region is written by the process that holds it (a shard server, or the one
process of a local table), block by block from ``read_rows``, so no process holds
more than one block of rows it does not own; regions never share a chunk. Loading
reads any global range back from the regions that overlap it, so a table saved
with M shards under one plan loads into M' shards under either plan.

Letters: R rows of a block, C columns of a region.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from memdist.cluster.plan import ShardRegion as Region  # global rows x columns
from memdist.errors import CheckpointError

CHUNK_BYTES = 4 * 2**20  # about 4 MiB per chunk
ReadRows = Callable[[int, int], dict[str, torch.Tensor]]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_objects(root: Path, prefix: str) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``root``, keyed ``prefix/relative/path``."""
    return {
        f"{prefix}/{p.relative_to(root).as_posix()}": {
            "size": p.stat().st_size,
            "sha256": sha256_file(p),
        }
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_region(out: Path, region: Region, read: ReadRows, *, block_rows: int | None = None):
    """Write one region as a zarr group at ``out`` from ``read(lo, hi)`` (region-local
    rows), one block of chunk-aligned rows at a time."""
    cols = region.col_stop - region.col_start
    rows_per_chunk = max(1, min(region.rows, CHUNK_BYTES // (4 * max(cols, 1))))
    block = block_rows or rows_per_chunk
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    group.attrs.update({"row_start": region.row_start, "row_stop": region.row_stop,
                        "col_start": region.col_start, "col_stop": region.col_stop})  # fmt: skip
    arrays: dict[str, Any] = {}
    for lo in range(0, region.rows, block):
        hi = min(lo + block, region.rows)
        part = read(lo, hi)
        for name, t in part.items():
            a = t.cpu().numpy()
            if name not in arrays:
                arrays[name] = group.create_array(
                    name, shape=(region.rows, *a.shape[1:]), dtype=a.dtype,
                    chunks=(rows_per_chunk, *a.shape[1:]), fill_value=0,
                )  # fmt: skip
            arrays[name][lo:hi] = a


class SavedTable:
    """Reads global rows and columns of a saved table from its region groups."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.group = zarr.open_group(str(self.root), mode="r")
        except Exception as exc:
            raise CheckpointError(f"{self.root} is not a saved value table: {exc}") from exc
        attrs: dict[str, Any] = dict(self.group.attrs)
        self.num_rows, self.dim = int(attrs["num_rows"]), int(attrs["dim"])
        self.regions = [Region(i, *r) for i, r in enumerate(attrs["regions"])]

    def read(self, start: int, stop: int, col_start: int, col_stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` and columns ``[col_start, col_stop)`` of every array
        (per-row arrays whole), assembled from the regions that hold them."""
        out: dict[str, np.ndarray] = {}
        for i, r in enumerate(self.regions):
            lo, hi = max(start, r.row_start), min(stop, r.row_stop)
            c0, c1 = max(col_start, r.col_start), min(col_stop, r.col_stop)
            if hi <= lo or c1 <= c0:
                continue
            region = self.group[f"region{i}"]
            for name, arr in region.arrays():  # type: ignore[union-attr]
                rows = slice(lo - r.row_start, hi - r.row_start)
                if arr.ndim == 1:
                    piece = arr[rows]
                    target = out.setdefault(name, np.empty(stop - start, dtype=arr.dtype))
                    target[lo - start : hi - start] = piece
                    continue
                piece = arr[rows, c0 - r.col_start : c1 - r.col_start]
                target = out.setdefault(
                    name, np.empty((stop - start, col_stop - col_start), dtype=arr.dtype)
                )
                target[lo - start : hi - start, c0 - col_start : c1 - col_start] = piece
        return out


def write_table_attrs(root: Path, *, num_rows: int, dim: int, plan: str,
                      regions: list[Region], meta: dict[str, Any]) -> None:  # fmt: skip
    """The table group's own ``zarr.json`` (after the regions were written)."""
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    group.attrs.update({
        "num_rows": num_rows, "dim": dim, "plan": plan,
        "regions": [[r.row_start, r.row_stop, r.col_start, r.col_stop] for r in regions],
        **meta,
    })  # fmt: skip


def load_into(saved: SavedTable, region: Region, write: Callable[[int, dict], None],
              *, block_rows: int = 65536) -> None:  # fmt: skip
    """Fill ``region`` (global coordinates) from ``saved``: ``write(lo, state)`` gets
    region-local rows from ``lo``, block by block."""
    for lo in range(region.row_start, region.row_stop, block_rows):
        hi = min(lo + block_rows, region.row_stop)
        part = saved.read(lo, hi, region.col_start, region.col_stop)
        write(lo - region.row_start, {k: torch.from_numpy(v) for k, v in part.items()})


Objects = dict[str, dict[str, Any]]


def check_objects(local_root: Path, prefix: str, objects: Objects, sub: str) -> None:
    """Every object of ``objects`` under ``prefix/sub`` is at ``local_root/sub`` with its
    size and SHA-256 (checked before anything reads it), else ``CheckpointError`` naming it."""
    want = f"{prefix}/{sub}" if sub else prefix
    for key, meta in objects.items():
        if key != want and not key.startswith(want + "/"):
            continue
        path = local_root / key[len(prefix) + 1 :]
        if not path.is_file():
            raise CheckpointError(f"checkpoint object {key!r} is missing")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint object {key!r} does not match its checksum (truncated or altered)"
            )


def save_region_to(target: Any, prefix: str, index: int, region: Region, read: ReadRows) -> Objects:
    """Write region ``index`` of a table under ``prefix`` of ``target``; its objects."""
    with tempfile.TemporaryDirectory(prefix="memdist-save-") as tmp:
        out = Path(tmp) / f"region{index}"
        write_region(out, region, read)
        objects = tree_objects(out, f"{prefix}/region{index}")
        target.put_tree(f"{prefix}/region{index}", out)
    return objects


def save_table_group(target: Any, prefix: str, *, num_rows: int, dim: int, plan: str,
                     regions: list[Region], meta: dict[str, Any]) -> Objects:  # fmt: skip
    """The table group's ``zarr.json``, written after its regions."""
    with tempfile.TemporaryDirectory(prefix="memdist-save-") as tmp:
        root = Path(tmp)
        write_table_attrs(root, num_rows=num_rows, dim=dim, plan=plan, regions=regions,
                          meta=meta)  # fmt: skip
        target.put_file(f"{prefix}/zarr.json", root / "zarr.json")
        return tree_objects(root, prefix)


def load_region_from(target: Any, prefix: str, objects: Objects, region: Region,
                     write: Callable[[int, dict], None], *, num_rows: int,
                     dim: int) -> dict[str, Any]:  # fmt: skip
    """Fill ``region`` (global rows and columns) from the table saved under ``prefix``:
    only the saved regions that overlap it are fetched, and each is checked against
    ``objects`` before zarr reads it. Returns the table group's attributes."""
    with tempfile.TemporaryDirectory(prefix="memdist-load-") as tmp:
        root = Path(tmp)
        if f"{prefix}/zarr.json" not in objects:
            raise CheckpointError(f"checkpoint object {prefix + '/zarr.json'!r} is not listed")
        target.get_file(f"{prefix}/zarr.json", root / "zarr.json")
        check_objects(root, prefix, objects, "zarr.json")
        saved = SavedTable(root)
        if (saved.num_rows, saved.dim) != (num_rows, dim):
            raise CheckpointError(
                f"the table saved under {prefix!r} is {saved.num_rows} x {saved.dim}; "
                f"this run's table is {num_rows} x {dim}"
            )
        for i, r in enumerate(saved.regions):
            overlaps = r.row_start < region.row_stop and region.row_start < r.row_stop
            if overlaps and r.col_start < region.col_stop and region.col_start < r.col_stop:
                target.get_tree(f"{prefix}/region{i}", root / f"region{i}")
                check_objects(root, prefix, objects, f"region{i}")
        load_into(saved, region, write)
        return dict(saved.group.attrs)
