"""Saving a region of a value table while training goes on.

A ``RegionSave`` takes its snapshot when it is created, under the rows' lock, and
then writes in a thread of its own while steps keep changing the rows:

- a **full** save records copy-on-write: a step that changes rows the save has not
  written yet first hands their old values to the ``Snapshot``, and the writer puts
  them back into each block it reads, so the region on disk is the region of the
  step the save began at, whatever ran meanwhile;
- an **incremental** save copies only the rows changed since the previous save began
  (``SparseRows.changed``), which is the whole snapshot, and writes them with their
  global row numbers (``memdist.storage.table_store.save_delta_to``).

Either way the rows' ``changed`` marks restart when the save begins, and come back if
it fails, so the next incremental save still carries them. Progress (rows written of
rows to write, bytes) can be read at any time, for a progress bar in the driver.

Letters: U rows of a block or a delta.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from memdist.errors import CheckpointError
from memdist.storage import table_store


class Snapshot:
    """Old values of the rows steps changed while a full save is under way, for rows the
    save had not yet read (``cursor`` and beyond)."""

    def __init__(self, region_rows: int) -> None:
        self.cursor = 0
        self.kept_mask = np.zeros(region_rows, dtype=bool)
        self.kept: list[tuple[np.ndarray, dict[str, torch.Tensor]]] = []

    def keep(self, local_U: np.ndarray, gather: Any) -> None:
        """Called by a step before it changes region rows ``local_U``; ``gather(sel)``
        copies the old state of the entries ``sel`` of ``local_U``."""
        want = (local_U >= self.cursor) & ~self.kept_mask[local_U]
        if want.any():
            sel = np.flatnonzero(want)
            self.kept.append((local_U[sel], gather(torch.from_numpy(sel))))
            self.kept_mask[local_U[sel]] = True

    def restore(self, lo: int, hi: int, part: dict[str, torch.Tensor]) -> None:
        """Put the kept old values of rows ``[lo, hi)`` into ``part`` (read just now) and
        move the cursor past them: later steps need keep nothing below ``hi``."""
        for rows, data in self.kept:
            inside = (rows >= lo) & (rows < hi)
            if inside.any():
                at = torch.from_numpy(rows[inside] - lo)
                sel = torch.from_numpy(np.flatnonzero(inside))
                for name, t in part.items():
                    t[at] = data[name][sel].to(t)
        self.cursor = hi
        self.kept = [(r, d) for r, d in self.kept if r.max(initial=-1) >= hi]


class RegionSave:
    """One region's save, begun at construction and written in a background thread.
    ``rows`` is the region's ``memdist.values.SparseRows`` (or a row cache over zarr)."""

    def __init__(self, rows: Any, target: Any, prefix: str, region: table_store.Region,
                 *, changed_only: bool) -> None:  # fmt: skip
        self.region, self.changed_only = region, changed_only
        self.rows_total, self.rows_done, self.started = 0, 0, time.perf_counter()
        self.objects: table_store.Objects | None = None
        self.error: BaseException | None = None
        with rows.lock:
            if rows.snapshot is not None:
                raise CheckpointError(
                    f"region {region.shard}: a save is already under way; wait for it first"
                )
            rows.flush()
            self._taken = rows.changed.copy()
            rows.changed[:] = False
            if changed_only:
                local_U = np.flatnonzero(self._taken)
                data = rows.read_row_indices(local_U)
                self.rows_total = int(local_U.size)
                job = lambda: table_store.save_delta_to(  # noqa: E731
                    target, prefix, region, local_U + region.row_start, data
                )
            else:
                snapshot = rows.snapshot = Snapshot(rows.region_rows)
                self.rows_total = region.rows

                def read(lo: int, hi: int) -> dict[str, torch.Tensor]:
                    with rows.lock:
                        part = rows.read_rows(lo, hi)
                        snapshot.restore(lo, hi, part)
                    self.rows_done = hi
                    return part

                job = lambda: table_store.save_region_to(target, prefix, region, read)  # noqa: E731
        self._rows = rows
        self._thread = threading.Thread(
            target=self._run, args=(job,), name=f"memdist-save-region{region.shard}", daemon=True
        )
        self._thread.start()

    def _run(self, job: Any) -> None:
        try:
            self.objects = job()
            self.rows_done = self.rows_total
        except BaseException as exc:  # reported by result()
            self.error = exc
            with self._rows.lock:
                self._rows.changed |= self._taken  # the next incremental save carries them
        finally:
            with self._rows.lock:
                self._rows.snapshot = None

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def progress(self) -> dict[str, Any]:
        """Rows written of rows to write, whether it is done and what it wrote."""
        done = self.done
        return {
            "shard": self.region.shard,
            "rows_done": self.rows_done,
            "rows_total": self.rows_total,
            "bytes": sum(o["size"] for o in (self.objects or {}).values()),
            "done": done,
            "seconds": time.perf_counter() - self.started,
        }

    def result(self, timeout_s: float | None = None) -> table_store.Objects:
        """The objects written (key -> size, SHA-256) once the save is durable."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise CheckpointError(
                f"region {self.region.shard}: the save did not finish within {timeout_s} s"
            )
        if self.error is not None:
            raise CheckpointError(
                f"region {self.region.shard}: the save failed: {self.error}"
            ) from self.error
        assert self.objects is not None
        return self.objects
