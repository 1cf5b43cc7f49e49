"""The training loop in-process: determinism by seed, user Parquet data, time budget."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memdist.config import load_config
from memdist.data.prepare import prepare_data
from memdist.errors import CheckpointError, DataError
from memdist.train import train

TINY = [
    "shards.count=0", "model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.memory.layers=[1]",
    "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.k_dim=16",
    "data.n_people=20", "data.seq_len=32", "data.batch_size=4", "train.steps=6",
    "train.log_every=1", "optim.warmup_steps=2", "eval.max_qa=5", "eval.max_new_tokens=3",
]  # fmt: skip


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]


@pytest.mark.slow
def test_same_seed_same_run_different_seed_different_run(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'data'}"
    cfg = load_config("small", [*TINY, cache])
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    c = train(load_config("small", [*TINY, cache, "train.seed=1"]), tmp_path / "c", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    assert a["qa_em"] == b["qa_em"] and a["ppl"] == b["ppl"]
    assert losses(tmp_path / "a")[-1] < losses(tmp_path / "a")[0]
    assert c["step"] == 6


def test_user_parquet_source_and_qa_file(tmp_path):
    texts = [f"Q: What is {i} plus one?\nA: {i + 1}\n" for i in range(200)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "train.parquet")
    pq.write_table(
        pa.table({"prompt": ["Q: What is 5 plus one?\nA:"], "answer": ["6"]}),
        tmp_path / "qa.parquet",
    )
    cfg = load_config(
        "small",
        [*TINY, f"data.source={tmp_path / 'train.parquet'}", "data.text_column=body",
         f"data.qa_eval={tmp_path / 'qa.parquet'}"],
    )  # fmt: skip
    stream, evals = prepare_data(cfg)
    x, y = next(iter(stream))
    assert x.shape == (4, 32)
    assert [q.answer for q in evals.qa] == ["6"] and evals.chance_em is None
    assert evals.ppl_texts[0] == texts[0]
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["step"] == 6 and "qa_chance_em" not in result


def test_missing_user_qa_file_is_a_data_error(tmp_path):
    pq.write_table(pa.table({"text": ["hello world"] * 10}), tmp_path / "t.parquet")
    cfg = load_config(
        "small",
        [*TINY, f"data.source={tmp_path / 't.parquet'}", f"data.qa_eval={tmp_path / 'x.pq'}"],
    )
    with pytest.raises(DataError, match="data.qa_eval=.*x.pq' does not exist"):
        prepare_data(cfg)


def test_time_budget_stops_early(tmp_path):
    cfg = load_config(
        "small",
        [*TINY, "train.steps=100000", "train.max_minutes=0.002", f"data.cache_dir={tmp_path}"],
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert 1 <= result["step"] < 100000


def test_prefetch_in_the_loop_changes_no_loss(tmp_path):
    """``shards.prefetch`` in ``memdist train``'s own loop (one step read ahead, the first
    step hinted too): the same losses, and the shards read the hinted rows ahead. Also
    where the zarr arrays go: the run folder, or ``shards.store_dir``."""
    cache = f"data.cache_dir={tmp_path / 'data'}"
    # 4096 rows in 2 in-process shards, each caching half of its region over zarr.
    sharded = [*TINY, cache, "model.memory.n_keys=64", "data.batch_size=2", "shards.count=2",
               "shards.transport=inprocess", "shards.plan=row", "shards.budget_mb=0.375"]  # fmt: skip
    train(load_config("small", sharded), tmp_path / "plain", progress=False)
    hinted = [*sharded, "shards.prefetch=true", f"shards.store_dir={tmp_path / 'disk'}"]
    train(load_config("small", hinted), tmp_path / "hinted", progress=False)
    assert losses(tmp_path / "hinted") == losses(tmp_path / "plain")
    # The zarr arrays went to shards.store_dir, in a folder named like the run's.
    assert (tmp_path / "plain" / "shards" / "table0" / "shard1" / "rows").is_dir()
    assert (tmp_path / "disk" / "hinted" / "table0" / "shard1" / "rows").is_dir()
    assert not (tmp_path / "hinted" / "shards").exists()
    records = [
        json.loads(x) for x in (tmp_path / "hinted" / "metrics.jsonl").read_text().splitlines()
    ]
    prefetched = [r["rows_prefetched"] for r in records if r["kind"] == "train"]
    assert prefetched == sorted(prefetched) and prefetched[-1] > 0
    stats = [s for r in records if r["kind"] == "shards" for s in r["stats"]]
    assert all(s["cached"] for s in stats)
    assert sum(s["prefetch_hits"] for s in stats) > 0


def test_a_run_folder_holds_one_run_unless_overwritten(tmp_path):
    """A second run into the same folder is refused before anything starts or is written;
    ``overwrite=True`` empties the folder first, so it holds only the second run."""
    cache = f"data.cache_dir={tmp_path / 'data'}"
    run = tmp_path / "run"
    run.mkdir()  # an existing, empty folder is fine
    first = load_config("small", [*TINY, cache, "train.steps=2"])
    train(first, run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert "metrics.jsonl" in before
    second = load_config("small", [*TINY, cache, "train.steps=3", "shards.count=2",
                                    "shards.transport=inprocess"])  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        train(second, run, progress=False)
    assert repr(str(run)) in str(info.value) and "--overwrite" in str(info.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched, no shards/
    (run / "notes.txt").write_text("left over from the first run")
    result = train(second, run, progress=False, overwrite=True)
    assert result["step"] == 3 and not (run / "notes.txt").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["shards"] for r in records if r["kind"] == "start"] == [2]
    assert json.loads((run / "final.json").read_text())["step"] == 3
    assert (tmp_path / "data").is_dir()  # only the run folder's contents were removed
