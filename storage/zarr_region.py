"""A shard region's rows and optimizer state persisted as zarr arrays on local disk.

Each shard has its own zarr group (``<root>/shard{s}``) holding ``values`` (rows x
cols) and one array per optimizer state, all chunked by ``chunk_rows`` rows (about
4 MiB of values per chunk, uncompressed), so no two shards ever write the same chunk. A new group is filled with the table's
initial values chunk by chunk, never materialising the whole region in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from memdist.errors import CheckpointError

# A row cache reads and writes scattered rows, and zarr reads and rewrites whole chunks:
# a few large chunks cost far less per miss than many small ones (measured on the cache
# benchmark: 256-row chunks 72x the in-memory shard, 4096-row 11x, 16384-row 8x).
# Values and optimizer state are dense floats that do not compress, so chunks are raw.
CHUNK_BYTES = 4 * 2**20


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
        """``state_spec`` maps a state name to (trailing shape, dtype); ``init_rows(r0, r1)``
        returns the initial values of local rows ``[r0, r1)`` for a new region."""
        self.path = Path(path)
        self.rows, self.cols = rows, cols
        if chunk_rows is None:  # about CHUNK_BYTES of values per chunk
            chunk_rows = max(1024, CHUNK_BYTES // (4 * cols))
        self.chunk_rows = max(1, min(chunk_rows, rows))
        specs = {"values": ((cols,), "float32"), **state_spec}
        exists = (self.path / "zarr.json").is_file()
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
                    fill_value=0, compressors=None,
                )  # fmt: skip
                if name == "values" and init_rows is not None:
                    for r0 in range(0, rows, self.chunk_rows):
                        r1 = min(rows, r0 + self.chunk_rows)
                        arr[r0:r1] = np.asarray(init_rows(r0, r1), dtype=np.float32)
            self.arrays[name] = arr

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every array's entries for the given local rows (sorted, unique)."""
        return {name: arr.oindex[rows] for name, arr in self.arrays.items()}

    def write(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> None:
        for name, arr in self.arrays.items():
            arr.oindex[rows] = data[name]
