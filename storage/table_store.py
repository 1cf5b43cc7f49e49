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

An incremental save (group attribute ``kind: "delta"``) holds only the rows changed
since the previous save: ``region{s}/rows`` (their global numbers, sorted) beside
``weight`` and ``state.<name>`` for those rows. Loading takes a chain, the full save
first and then each delta in order, and lays the deltas' rows over the full one.

Letters: R rows of a block, C columns of a region.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


def _region_group(out: Path, region: Region, n: int) -> tuple[Any, int]:
    """An empty region group at ``out`` and its rows per chunk for ``n`` rows."""
    cols = region.col_stop - region.col_start
    rows_per_chunk = max(1, min(n, CHUNK_BYTES // (4 * max(cols, 1))))
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    group.attrs.update({"row_start": region.row_start, "row_stop": region.row_stop,
                        "col_start": region.col_start, "col_stop": region.col_stop})  # fmt: skip
    return group, rows_per_chunk


def _write_blocks(group: Any, n: int, rows_per_chunk: int, block: int,
                  read: Callable[[int, int], dict[str, Any]]) -> None:  # fmt: skip
    arrays: dict[str, Any] = {}
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        for name, t in read(lo, hi).items():
            a = t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if name not in arrays:
                arrays[name] = group.create_array(
                    name, shape=(n, *a.shape[1:]), dtype=a.dtype,
                    chunks=(rows_per_chunk, *a.shape[1:]), fill_value=0,
                )  # fmt: skip
            arrays[name][lo:hi] = a


def write_region(out: Path, region: Region, read: ReadRows, *, block_rows: int | None = None):
    """Write one region as a zarr group at ``out`` from ``read(lo, hi)`` (region-local
    rows), one block of chunk-aligned rows at a time."""
    group, rows_per_chunk = _region_group(out, region, region.rows)
    _write_blocks(group, region.rows, rows_per_chunk, block_rows or rows_per_chunk, read)


def write_delta(out: Path, region: Region, rows_U: np.ndarray, data: dict[str, torch.Tensor]):
    """Write the changed rows ``rows_U`` (global, sorted) of a region and their state."""
    group, rows_per_chunk = _region_group(out, region, int(rows_U.size))
    group.attrs["delta"] = True
    if rows_U.size == 0:  # nothing changed: the arrays exist, empty
        for name, t in {"rows": torch.from_numpy(rows_U.astype(np.int64)), **data}.items():
            group.create_array(name, shape=tuple(t.shape), dtype=t.cpu().numpy().dtype,
                               chunks=(1, *t.shape[1:]), fill_value=0)  # fmt: skip
        return
    full = {"rows": torch.from_numpy(rows_U.astype(np.int64)), **data}
    _write_blocks(group, int(rows_U.size), rows_per_chunk, rows_per_chunk,
                  lambda lo, hi: {k: v[lo:hi] for k, v in full.items()})  # fmt: skip


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
        self.kind = str(attrs.get("kind", "full"))  # "full", or "delta" (incremental)
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


class Delta:
    """The rows of one saved delta region that fall in a region being loaded."""

    def __init__(self, group: Any, saved: Region, region: Region) -> None:
        rows = np.asarray(group["rows"][:])
        keep = (rows >= region.row_start) & (rows < region.row_stop)
        self.rows = rows[keep]
        self.c0, self.c1 = (
            max(saved.col_start, region.col_start),
            min(saved.col_stop, region.col_stop),
        )
        self.arrays: dict[str, np.ndarray] = {}
        for name, arr in group.arrays():
            if name == "rows":
                continue
            a = np.asarray(arr[:])[keep]
            self.arrays[name] = (
                a if a.ndim == 1 else a[:, self.c0 - saved.col_start : self.c1 - saved.col_start]
            )

    def lay_over(self, out: dict[str, np.ndarray], start: int, stop: int, col_start: int) -> None:
        """Write this delta's rows in ``[start, stop)`` into ``out`` (columns from ``col_start``)."""
        inside = (self.rows >= start) & (self.rows < stop)
        if not inside.any():
            return
        at = self.rows[inside] - start
        for name, a in self.arrays.items():
            if a.ndim == 1:
                out[name][at] = a[inside]
            else:
                out[name][at, self.c0 - col_start : self.c1 - col_start] = a[inside]


def load_into(saved: SavedTable, region: Region, write: Callable[[int, dict], None],
              *, deltas: list[Delta] = (), block_rows: int = 65536) -> None:  # type: ignore[assignment]  # fmt: skip
    """Fill ``region`` (global coordinates) from ``saved`` with ``deltas`` laid over it in
    order: ``write(lo, state)`` gets region-local rows from ``lo``, block by block."""
    for lo in range(region.row_start, region.row_stop, block_rows):
        hi = min(lo + block_rows, region.row_stop)
        part = saved.read(lo, hi, region.col_start, region.col_stop)
        for delta in deltas:
            delta.lay_over(part, lo, hi, region.col_start)
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


def _put_region(target: Any, prefix: str, region: Region, write: Callable[[Path], None]) -> Objects:
    key = f"{prefix}/region{region.shard}"
    with tempfile.TemporaryDirectory(prefix="memdist-save-") as tmp:
        out = Path(tmp) / f"region{region.shard}"
        write(out)
        objects = tree_objects(out, key)
        target.put_tree(key, out)
    return objects


def save_region_to(target: Any, prefix: str, region: Region, read: ReadRows) -> Objects:
    """Write ``region`` of a table under ``prefix`` of ``target``; its objects."""
    return _put_region(target, prefix, region, lambda out: write_region(out, region, read))


def save_delta_to(target: Any, prefix: str, region: Region, rows_U: np.ndarray,
                  data: dict[str, torch.Tensor]) -> Objects:  # fmt: skip
    """Write the changed rows ``rows_U`` (global) of ``region`` under ``prefix``; its objects."""
    return _put_region(target, prefix, region, lambda out: write_delta(out, region, rows_U, data))


def save_table_group(target: Any, prefix: str, *, num_rows: int, dim: int, plan: str,
                     regions: list[Region], meta: dict[str, Any]) -> Objects:  # fmt: skip
    """The table group's ``zarr.json``, written after its regions."""
    with tempfile.TemporaryDirectory(prefix="memdist-save-") as tmp:
        root = Path(tmp)
        write_table_attrs(root, num_rows=num_rows, dim=dim, plan=plan, regions=regions,
                          meta=meta)  # fmt: skip
        target.put_file(f"{prefix}/zarr.json", root / "zarr.json")
        return tree_objects(root, prefix)


def _overlaps(a: Region, b: Region) -> bool:
    rows = a.row_start < b.row_stop and b.row_start < a.row_stop
    return rows and a.col_start < b.col_stop and b.col_start < a.col_stop


@dataclass(frozen=True, slots=True)
class Source:
    """One saved table in a chain: the checkpoint target and the objects its manifest lists."""

    target: Any
    objects: Objects


def _fetch_group(src: Source, prefix: str, root: Path, region: Region, num_rows: int,
                 dim: int) -> SavedTable:  # fmt: skip
    """The saved table under ``prefix`` of ``src`` in ``root`` with the regions overlapping
    ``region`` fetched, each checked against the manifest before zarr reads it."""
    root.mkdir(parents=True, exist_ok=True)
    if f"{prefix}/zarr.json" not in src.objects:
        raise CheckpointError(
            f"checkpoint object {prefix + '/zarr.json'!r} is not listed in {src.target.uri}"
        )
    src.target.get_file(f"{prefix}/zarr.json", root / "zarr.json")
    check_objects(root, prefix, src.objects, "zarr.json")
    saved = SavedTable(root)
    if (saved.num_rows, saved.dim) != (num_rows, dim):
        raise CheckpointError(
            f"the table saved under {prefix!r} is {saved.num_rows} x {saved.dim}; "
            f"this run's table is {num_rows} x {dim}"
        )
    for i, r in enumerate(saved.regions):
        if _overlaps(r, region):
            src.target.get_tree(f"{prefix}/region{i}", root / f"region{i}")
            check_objects(root, prefix, src.objects, f"region{i}")
    return saved


def load_region_from(chain: list[Source], prefix: str, region: Region,
                     write: Callable[[int, dict], None], *, num_rows: int,
                     dim: int) -> dict[str, Any]:  # fmt: skip
    """Fill ``region`` (global rows and columns) from the table saved under ``prefix`` of
    each checkpoint of ``chain`` (a full save, then incremental ones in order): only the
    saved regions that overlap it are fetched, and each is checked against its manifest's
    objects before zarr reads it. Returns the newest table group's attributes."""
    with tempfile.TemporaryDirectory(prefix="memdist-load-") as tmp:
        groups = [
            _fetch_group(src, prefix, Path(tmp) / f"link{k}", region, num_rows, dim)
            for k, src in enumerate(chain)
        ]
        base, *rest = groups
        if base.kind != "full" or any(g.kind != "delta" for g in rest):
            kinds = [g.kind for g in groups]
            raise CheckpointError(
                f"the saves of {prefix!r} form no chain (kinds {kinds}): a full save must "
                "come first and only incremental ones after it"
            )
        deltas = [
            Delta(g.group[f"region{i}"], r, region)
            for g in rest
            for i, r in enumerate(g.regions)
            if _overlaps(r, region)
        ]
        load_into(base, region, write, deltas=deltas)
        return dict(groups[-1].group.attrs)
