"""Sharding plans: which shard owns which region of a value table.

- ``row``: shard s owns a contiguous range of rows and all columns. A lookup sends
  each shard the whole bag; it returns the pooled partial sum of its own rows, so
  output traffic is shards x tokens x D.
- ``column``: shard s owns a slice of the columns of every row (the paper's scheme).
  Every shard gets every index and returns its slice of the pooled output, so output
  traffic is tokens x D, input traffic shards x tokens x K.

``make_plan`` builds either; ``choose_plan`` (``auto``) picks the one that moves
fewer bytes per step among the plans that can run the value optimizer exactly, after
checking that a shard's region fits its memory budget. Row-wise Adagrad keeps one
accumulator per row fed by the mean square of the row's whole gradient, which no
column shard sees: the column plan is never chosen for it, and asking for it is an
error that says so.
Indices are int64 throughout: tables of 2**32 rows and more are addressable.
"""

from __future__ import annotations

from dataclasses import dataclass

from memdist.errors import ConfigError

PLANS = ("row", "column", "auto")
# Value optimizers a column plan cannot run exactly, and why.
COLUMN_INEXACT = {
    "adagrad": "row-wise Adagrad scales a row by the mean square of its whole gradient, "
    "and a column shard sees only its slice of the row",
}


@dataclass(frozen=True, slots=True)
class ShardRegion:
    """Rows ``[row_start, row_stop)`` x columns ``[col_start, col_stop)`` of one table."""

    shard: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def cols(self) -> int:
        return self.col_stop - self.col_start


@dataclass(frozen=True, slots=True)
class ShardingPlan:
    kind: str
    num_rows: int
    dim: int
    regions: tuple[ShardRegion, ...]

    @property
    def shards(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        parts = [
            f"shard {r.shard}: rows [{r.row_start}, {r.row_stop}) cols [{r.col_start}, {r.col_stop})"
            for r in self.regions
        ]
        return (
            f"{self.kind}-wise plan of {self.num_rows} x {self.dim} over {self.shards} shards: "
            + "; ".join(parts)
        )


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``[0, total)``, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def make_plan(kind: str, num_rows: int, dim: int, shards: int) -> ShardingPlan:
    if shards < 1:
        raise ConfigError(f"shards={shards} must be >= 1")
    if kind == "row":
        if shards > num_rows:
            raise ConfigError(f"row-wise plan: shards={shards} exceeds the table's {num_rows} rows")
        regions = tuple(
            ShardRegion(s, r0, r1, 0, dim) for s, (r0, r1) in enumerate(_split(num_rows, shards))
        )
    elif kind == "column":
        if shards > dim:
            raise ConfigError(
                f"column-wise plan: shards={shards} exceeds the row width v_dim={dim}"
            )
        regions = tuple(
            ShardRegion(s, 0, num_rows, c0, c1) for s, (c0, c1) in enumerate(_split(dim, shards))
        )
    else:
        raise ConfigError(
            f"plan={kind!r} must be 'row' or 'column' here (auto goes through choose_plan)"
        )
    return ShardingPlan(kind, num_rows, dim, regions)


def step_traffic_bytes(kind: str, shards: int, tokens: int, bag: int, dim: int) -> int:
    """Bytes a lookup and its backward move per step (fp32 payloads, int32 indices; the
    shards keep a lookup's indices and scores for its backward, so they travel once)."""
    entries = tokens * bag * (4 + 4)  # indices and scores
    if kind == "row":
        # each shard gets its own entries (and where its bags begin), returns a
        # full-width partial sum, gets the full dy and returns its entries' score gradients
        return (
            entries + shards * (tokens + 1) * 4 + 2 * shards * tokens * dim * 4 + tokens * bag * 4
        )
    # every shard gets every entry and returns its column slice and partial score
    # gradients for every entry; gets its slice of dy
    return shards * (entries + tokens * bag * 4) + 2 * tokens * dim * 4


def region_bytes(rows: int, cols: int, state_floats_per_value: float) -> int:
    return int(rows * cols * 4 * (1 + state_floats_per_value))


def cache_rows_for(
    region: ShardRegion, budget_bytes: int | None, state_floats: float
) -> int | None:
    """Rows a shard keeps in memory: None (all of them) when its region fits the budget."""
    if budget_bytes is None or region_bytes(region.rows, region.cols, state_floats) <= budget_bytes:
        return None
    return budget_bytes // region_bytes(1, region.cols, state_floats)


def choose_plan(
    kind: str,
    num_rows: int,
    dim: int,
    shards: int,
    *,
    tokens: int,
    bag: int,
    budget_bytes: int | None = None,
    state_floats_per_value: float = 2.0,
    optimizer: str = "adam",
) -> ShardingPlan:
    """The requested plan, or for ``auto`` the one moving fewer bytes per step among
    those that run ``optimizer`` exactly."""
    if kind not in PLANS:
        raise ConfigError(f"plan={kind!r} must be one of {PLANS}")
    if kind == "column" and optimizer in COLUMN_INEXACT:
        raise ConfigError(
            f"shards.plan='column' with model.memory.value_optimizer={optimizer!r} is not "
            f"supported: {COLUMN_INEXACT[optimizer]}; use shards.plan=row or auto, or "
            "another value optimizer"
        )
    candidates = ["row", "column"] if kind == "auto" else [kind]
    if kind == "auto" and (shards > dim or optimizer in COLUMN_INEXACT):
        candidates = ["row"]
    plans = [make_plan(k, num_rows, dim, shards) for k in candidates]
    if budget_bytes is not None:
        # A region over budget is kept in zarr behind a row cache; the cache must at
        # least hold one request's rows.
        for p in plans:
            row_bytes = region_bytes(1, p.regions[0].cols, state_floats_per_value)
            if budget_bytes < row_bytes * min(tokens * bag, p.regions[0].rows):
                raise ConfigError(
                    f"per-shard memory budget of {budget_bytes} bytes holds "
                    f"{budget_bytes // row_bytes} rows, fewer than the {tokens * bag} rows one "
                    f"step may read ({p.kind}-wise): raise shards.budget_mb or use more shards"
                )
    return min(plans, key=lambda p: step_traffic_bytes(p.kind, shards, tokens, bag, dim))
