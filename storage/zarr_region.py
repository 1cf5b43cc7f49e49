"""A shard region's rows and optimizer state persisted as zarr arrays on local disk.

Each shard has its own zarr group (``<root>/shard{s}``). A row's values and the
optimizer state of the same width (Adam's two moments) lie side by side in one array,
``rows`` (rows x parts x cols; its attribute ``parts`` names them, ``values`` first),
so a row read from disk is one run of bytes: a row of 128 columns under Adam touches
one or two 4 KiB pages, not a page in each of three files, which on a table larger
than RAM is what the disk reads and the page cache must hold. Per-row state (Adam's
step count, row-wise Adagrad) is an array of its own. All are chunked by
``chunk_rows`` rows (about 4 MiB of values per chunk, uncompressed), so no two shards
ever write the same chunk. A new group is filled with the table's initial values
chunk by chunk, never materialising the whole region in memory.

Rows are read and written through memory maps of the chunk files. The arrays are
plain zarr v3 (raw little-endian chunks, every chunk written), so any zarr reader
opens them; but zarr's own orthogonal indexing reads and rewrites whole chunks, and a
row cache gathers a few hundred scattered rows at a time: measured here, 300 random
rows of a 131072 x 128 region took 19.5 ms to read and 112 ms to write through zarr
(4 MiB chunks; 67 and 155 ms with 256 KiB chunks), while a memory map touches only
their pages. The maps are advised for random access (no read-ahead), and the pages a
read or write needs are requested all at once before the copy, so that a region larger
than RAM, whose rows are not all in the page cache, keeps the disk's queue full instead
of waiting on one fault at a time. Arrays this module did not lay out so (compressed, big-endian, not on a
local disk) are read and written through zarr.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.storage import LocalStore

from memdist.errors import CheckpointError, ConfigError, ShardError

# Values and optimizer state are dense floats that do not compress, so chunks are raw.
CHUNK_BYTES = 4 * 2**20
# Open chunk maps per region: Linux allows about 65530 per process, and a 16M-row region
# of 128 columns under Adam has about 4100 chunk files (rows with their moments, steps).
MAX_MAPS = 16384
WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}  # zeros are a file too
PACKED = "rows"  # the array holding a row's values and its state of the same width
# Runs of touched pages at most this many pages apart are advised in one call: a dense
# request (most pages touched) then costs a few calls a chunk, not one per run.
WILLNEED_GAP_PAGES = 4


class ZarrRegion:
    """Rows ``[0, rows)`` of a region (local numbering) with ``cols`` columns, on disk."""

    def __init__(
        self,
        path: Path | str,
        rows: int,
        cols: int,
        state_spec: dict[str, tuple[tuple[int, ...], str]],
        *,
        chunk_rows: int | None = None,
        init_rows: Any = None,
        fill: bool = True,
    ) -> None:
        """``state_spec`` maps a state name to (trailing shape, dtype). With ``init_rows(r0,
        r1)`` (the initial values of local rows ``[r0, r1)``) a new region is created and
        ``path`` must not hold one yet; without it an existing region is opened. Arrays
        created here are written chunk by chunk at once, or with ``fill=False`` by a later
        ``fill()`` (a large region takes minutes), before which rows cannot be read."""
        self.path = Path(path)
        self.rows, self.cols = rows, cols
        if chunk_rows is None:  # about CHUNK_BYTES of values per chunk
            chunk_rows = max(1024, CHUNK_BYTES // (4 * cols))
        self.chunk_rows = max(1, min(chunk_rows, rows))
        specs = {"values": ((cols,), "float32"), **state_spec}
        self.packed = [n for n, (t, d) in specs.items() if t == (cols,) and d == "float32"]
        layout: dict[str, tuple[tuple[int, ...], str]] = {
            PACKED: ((len(self.packed), cols), "float32")
        }
        layout.update({n: spec for n, spec in specs.items() if n not in self.packed})
        exists = (self.path / "zarr.json").is_file()
        if exists and init_rows is not None:
            raise ConfigError(
                f"{self.path} already holds a zarr region (another run's rows?); a new table "
                "starts from its initial values: remove it or choose another shards.store_dir"
            )
        self.group = zarr.open_group(str(self.path), mode="a")
        if exists and PACKED not in self.group:
            raise CheckpointError(
                f"{self.path} holds no {PACKED!r} array (a row's values beside its "
                f"{self.packed[1:] or 'no'} state): not a region this memdist lays out"
            )
        self.arrays: dict[str, Any] = {}
        self._unfilled: list[str] = []  # arrays created here whose chunks are not written yet
        for name, (trailing, dtype) in layout.items():
            shape = (rows, *trailing)
            if exists and name in self.group:
                arr: Any = self.group[name]
                if tuple(arr.shape) != shape:
                    raise CheckpointError(
                        f"zarr array {self.path / name} has shape {tuple(arr.shape)}, expected {shape}"
                    )
            else:
                arr = self.group.create_array(
                    name, shape=shape, chunks=(self.chunk_rows, *trailing), dtype=dtype,
                    fill_value=0, compressors=None, config=WRITE_EVERY_CHUNK,
                )  # fmt: skip
                self._unfilled.append(name)
            self.arrays[name] = arr
        # what ``read`` gives and ``write`` takes -> (array, part of the packed rows)
        self.fields: dict[str, tuple[str, int | None]] = {
            n: (PACKED, i) for i, n in enumerate(self.packed)
        } | {n: (n, None) for n in layout if n != PACKED}
        if PACKED in self._unfilled:
            self.arrays[PACKED].attrs["parts"] = self.packed
        elif list(self.arrays[PACKED].attrs.get("parts", [])) != self.packed:
            raise CheckpointError(
                f"zarr array {self.path / PACKED} holds parts "
                f"{self.arrays[PACKED].attrs.get('parts')}, expected {self.packed}"
            )
        self._init_rows = init_rows
        self.rows_filled = 0 if self._unfilled else rows  # progress of ``fill``
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._maps_lock = threading.RLock()  # a background save reads rows too
        self.mapped = False
        if fill:
            self.fill()

    def fill(self) -> None:
        """Write every chunk of the arrays created by this region (initial values, zeros
        for optimizer state), a block of ``chunk_rows`` rows at a time; ``rows_filled``
        says how far it got. Nothing to do for a region that is filled."""
        for r0 in range(self.rows_filled, self.rows, self.chunk_rows):
            r1 = min(self.rows, r0 + self.chunk_rows)
            for name in self._unfilled:
                if name == PACKED and self._init_rows is not None:
                    block = np.zeros((r1 - r0, len(self.packed), self.cols), np.float32)
                    block[:, 0] = np.asarray(self._init_rows(r0, r1), np.float32)
                    self.arrays[name][r0:r1] = block
                else:
                    self.arrays[name][r0:r1] = 0
            self.rows_filled = r1
        self._unfilled = []
        self.mapped = all(self._mappable(a) for a in self.arrays.values())

    def _check_filled(self) -> None:
        if self._unfilled:
            raise ShardError(
                f"zarr region {self.path} is being created ({self.rows_filled} of {self.rows} "
                "rows written): its rows cannot be read or written yet"
            )

    # -- chunk files as memory maps ---------------------------------------------------
    def _mappable(self, arr: Any) -> bool:
        codecs = arr.metadata.codecs
        return (
            isinstance(arr.store, LocalStore)
            and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and (arr.dtype.itemsize == 1 or getattr(codecs[0].endian, "value", None) == "little")
            and arr.chunks[0] == self.chunk_rows
            and all(self._chunk_file(arr, c).is_file() for c in range(arr.cdata_shape[0]))
        )

    def _chunk_file(self, arr: Any, c: int) -> Path:
        key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
        return Path(arr.store.root) / arr.path / key

    def _map(self, name: str, c: int) -> np.memmap:
        with self._maps_lock:
            mm = self._maps.get((name, c))
            if mm is None:
                if len(self._maps) >= MAX_MAPS:  # a process may hold only so many mappings
                    self.sync()  # a map still in use elsewhere stays open until dropped
                    self._maps.clear()
                arr = self.arrays[name]
                shape = (self.chunk_rows, *arr.shape[1:])  # edge chunks are stored whole
                dtype = np.dtype(arr.dtype).newbyteorder("<")
                mm = np.memmap(self._chunk_file(arr, c), dtype=dtype, mode="r+", shape=shape)
                # Rows are read at random: without this a page fault reads ahead up to the
                # device's read_ahead_kb (8 MiB here), i.e. a whole chunk for one row.
                mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
                self._maps[(name, c)] = mm
            return mm

    def _by_chunk(self, rows: np.ndarray):
        """(chunk, positions in ``rows``, rows within that chunk) for each chunk touched."""
        chunk_of = rows // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[order], return_index=True)
        for c, pos in zip(chunks, np.split(order, starts[1:]), strict=True):
            yield int(c), pos, rows[pos] - int(c) * self.chunk_rows

    def _prefault(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``_by_chunk`` of the (sorted) rows, after asking the kernel to read every page
        they touch in every array now (``MADV_WILLNEED``, one call per run of adjacent
        pages): a row not in the page cache waits on the disk, and one page fault at a
        time leaves the disk's queue empty. Measured here, 600 random rows of 400 cold
        4 MiB chunk files: 49.5-67.3 ms one fault at a time, 91.9 ms on 16 threads (the
        copies hold the GIL), 7.1-7.8 ms with this advice first."""
        parts = list(self._by_chunk(rows))
        for c, _, within in parts:
            for name in self.arrays:
                mm = self._map(name, c)
                row_bytes = mm.strides[0]
                first = within * row_bytes // mmap.PAGESIZE
                last = ((within + 1) * row_bytes - 1) // mmap.PAGESIZE
                gap = first[1:] > last[:-1] + 1 + WILLNEED_GAP_PAGES  # a run ends there
                starts = first[np.concatenate([[True], gap])] * mmap.PAGESIZE
                stops = np.minimum((last[np.concatenate([gap, [True]])] + 1) * mmap.PAGESIZE,
                                   mm.nbytes)  # fmt: skip
                for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                    mm._mmap.madvise(mmap.MADV_WILLNEED, a, b - a)  # type: ignore[attr-defined]
        return parts

    # -- rows -----------------------------------------------------------------------
    def _field(self, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of field ``name`` as a (strided) view of its chunk map."""
        array, part = self.fields[name]
        mm = self._map(array, c)
        return mm if part is None else mm[:, part]

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The values and each optimizer state of the given local rows (sorted, unique)."""
        self._check_filled()
        if not self.mapped:
            got = {name: arr.oindex[rows] for name, arr in self.arrays.items()}
            return {
                name: got[a] if part is None else np.ascontiguousarray(got[a][:, part])
                for name, (a, part) in self.fields.items()
            }
        out = {}
        for name, (a, part) in self.fields.items():
            arr = self.arrays[a]
            shape = arr.shape[1:] if part is None else arr.shape[2:]
            out[name] = np.empty((rows.size, *shape), dtype=arr.dtype)
        for c, pos, within in self._prefault(rows):
            for name in self.fields:  # each part gathered straight from the map
                out[name][pos] = self._field(name, c)[within]
        return out

    def write(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Write the values and each optimizer state (``read``'s keys) of local rows."""
        self._check_filled()
        if not self.mapped:
            packed = np.stack([data[n] for n in self.packed], axis=1)
            for name, arr in self.arrays.items():
                arr.oindex[rows] = packed if name == PACKED else data[name]
            return
        for c, pos, within in self._prefault(rows):  # a write reads the page first
            for name in self.fields:
                self._field(name, c)[within] = data[name][pos]

    def bytes_on_disk(self) -> int:
        """Size of the region's chunk files (values and optimizer state)."""
        if not self.mapped:
            return sum(int(a.nbytes_stored()) for a in self.arrays.values())
        return sum(
            self._chunk_file(a, c).stat().st_size
            for a in self.arrays.values()
            for c in range(a.cdata_shape[0])
        )

    def sync(self) -> None:
        """Push written rows to the files on disk (they are visible to readers at once)."""
        with self._maps_lock:
            maps = list(self._maps.values())
        for mm in maps:
            mm.flush()
