"""A shard region's rows and optimizer state persisted as zarr arrays on local disk.

Each shard has its own zarr group (``<root>/shard{s}``) holding ``values`` (rows x
cols) and one array per optimizer state, all chunked by ``chunk_rows`` rows (about
4 MiB of values per chunk, uncompressed), so no two shards ever write the same chunk.
A new group is filled with the table's initial values chunk by chunk, never
materialising the whole region in memory.

Rows are read and written through memory maps of the chunk files. The arrays are
plain zarr v3 (raw little-endian chunks, every chunk written), so any zarr reader
opens them; but zarr's own orthogonal indexing reads and rewrites whole chunks, and a
row cache gathers a few hundred scattered rows at a time: measured here, 300 random
rows of a 131072 x 128 region took 19.5 ms to read and 112 ms to write through zarr
(4 MiB chunks; 67 and 155 ms with 256 KiB chunks), while a memory map touches only
their pages. Arrays this module did not lay out so (compressed, big-endian, not on a
local disk) are read and written through zarr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.storage import LocalStore

from memdist.errors import CheckpointError, ConfigError

# Values and optimizer state are dense floats that do not compress, so chunks are raw.
CHUNK_BYTES = 4 * 2**20
MAX_MAPS = 4096  # open chunk maps per region (Linux allows about 65530 per process)
WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}  # zeros are a file too


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
    ) -> None:
        """``state_spec`` maps a state name to (trailing shape, dtype). With ``init_rows(r0,
        r1)`` (the initial values of local rows ``[r0, r1)``) a new region is created and
        ``path`` must not hold one yet; without it an existing region is opened."""
        self.path = Path(path)
        self.rows, self.cols = rows, cols
        if chunk_rows is None:  # about CHUNK_BYTES of values per chunk
            chunk_rows = max(1024, CHUNK_BYTES // (4 * cols))
        self.chunk_rows = max(1, min(chunk_rows, rows))
        specs = {"values": ((cols,), "float32"), **state_spec}
        exists = (self.path / "zarr.json").is_file()
        if exists and init_rows is not None:
            raise ConfigError(
                f"{self.path} already holds a zarr region (another run's rows?); a new table "
                "starts from its initial values: remove it or choose another shards.store_dir"
            )
        self.group = zarr.open_group(str(self.path), mode="a")
        self.arrays: dict[str, Any] = {}
        for name, (trailing, dtype) in specs.items():
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
                for r0 in range(0, rows, self.chunk_rows):
                    r1 = min(rows, r0 + self.chunk_rows)
                    if name == "values" and init_rows is not None:
                        arr[r0:r1] = np.asarray(init_rows(r0, r1), dtype=np.float32)
                    else:
                        arr[r0:r1] = 0
            self.arrays[name] = arr
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self.mapped = all(self._mappable(a) for a in self.arrays.values())

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
        mm = self._maps.get((name, c))
        if mm is None:
            if len(self._maps) >= MAX_MAPS:  # a process may hold only so many mappings
                self.sync()
                self._maps.clear()
            arr = self.arrays[name]
            shape = (self.chunk_rows, *arr.shape[1:])  # edge chunks are stored whole
            dtype = np.dtype(arr.dtype).newbyteorder("<")
            mm = np.memmap(self._chunk_file(arr, c), dtype=dtype, mode="r+", shape=shape)
            self._maps[(name, c)] = mm
        return mm

    def _by_chunk(self, rows: np.ndarray):
        """(chunk, positions in ``rows``, rows within that chunk) for each chunk touched."""
        chunk_of = rows // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[order], return_index=True)
        for c, pos in zip(chunks, np.split(order, starts[1:]), strict=True):
            yield int(c), pos, rows[pos] - int(c) * self.chunk_rows

    # -- rows -----------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every array's entries for the given local rows (sorted, unique)."""
        if not self.mapped:
            return {name: arr.oindex[rows] for name, arr in self.arrays.items()}
        out = {
            name: np.empty((rows.size, *arr.shape[1:]), dtype=arr.dtype)
            for name, arr in self.arrays.items()
        }
        for c, pos, within in self._by_chunk(rows):
            for name in self.arrays:
                out[name][pos] = self._map(name, c)[within]
        return out

    def write(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> None:
        if not self.mapped:
            for name, arr in self.arrays.items():
                arr.oindex[rows] = data[name]
            return
        for c, pos, within in self._by_chunk(rows):
            for name in self.arrays:
                self._map(name, c)[within] = data[name][pos]

    def sync(self) -> None:
        """Push written rows to the files on disk (they are visible to readers at once)."""
        for mm in self._maps.values():
            mm.flush()
