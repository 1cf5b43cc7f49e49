"""Sharding plans: regions cover the table exactly, auto picks the cheaper plan, errors."""

import pytest

from memdist.cluster.plan import cache_rows_for, choose_plan, make_plan, step_traffic_bytes
from memdist.errors import ConfigError


@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("rows, dim, shards", [(10, 7, 3), (4096, 128, 4), (2**33 + 3, 64, 5)])
def test_regions_tile_the_table(kind, rows, dim, shards):
    plan = make_plan(kind, rows, dim, shards)
    assert plan.shards == shards and plan.num_rows == rows
    if kind == "row":
        assert [r.row_start for r in plan.regions][0] == 0 and plan.regions[-1].row_stop == rows
        for a, b in zip(plan.regions, plan.regions[1:], strict=False):
            assert a.row_stop == b.row_start
        assert all(r.cols == dim for r in plan.regions)
        assert max(r.rows for r in plan.regions) - min(r.rows for r in plan.regions) <= 1
    else:
        assert sum(r.cols for r in plan.regions) == dim
        assert all(r.rows == rows for r in plan.regions)
    assert f"over {shards} shards" in plan.describe()


def test_tables_beyond_2_to_the_32_rows_are_addressable():
    plan = make_plan("row", 2**34, 16, 2)
    assert plan.regions[1].row_start == 2**33 and plan.regions[1].row_stop == 2**34


def test_auto_picks_the_plan_that_moves_fewer_bytes():
    kw = dict(tokens=2048, bag=64)
    for shards, dim in ((2, 128), (8, 1024), (4, 16)):
        plan = choose_plan("auto", 4096, dim, shards, **kw)
        other = "row" if plan.kind == "column" else "column"
        assert step_traffic_bytes(plan.kind, shards, 2048, 64, dim) <= step_traffic_bytes(
            other, shards, 2048, 64, dim
        )
    # More shards than columns: only row-wise is possible.
    assert choose_plan("auto", 4096, 4, 8, **kw).kind == "row"
    assert choose_plan("column", 4096, 128, 2, **kw).kind == "column"


def test_budget_decides_the_row_cache():
    plan = make_plan("row", 4096, 32, 2)
    region = plan.regions[0]
    full = region.rows * 32 * 4 * 3
    assert cache_rows_for(region, None, 2.0) is None
    assert cache_rows_for(region, full, 2.0) is None
    assert cache_rows_for(region, full // 4, 2.0) == region.rows // 4


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: make_plan("row", 3, 8, 4), "shards=4 exceeds the table's 3 rows"),
        (lambda: make_plan("column", 100, 2, 3), "shards=3 exceeds the row width v_dim=2"),
        (lambda: make_plan("row", 100, 8, 0), "shards=0 must be >= 1"),
        (lambda: choose_plan("diagonal", 100, 8, 2, tokens=1, bag=1), "plan='diagonal'"),
        (lambda: choose_plan("row", 4096, 32, 2, tokens=64, bag=16, budget_bytes=1000),
         "budget of 1000 bytes holds 2 rows, fewer than the 1024 rows"),
    ],
)  # fmt: skip
def test_plan_errors_name_the_value(call, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        call()
