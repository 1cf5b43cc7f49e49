"""Data-parallel workers under Ray Train sharing memory shards, against one process.

Every run goes through ``memdist.train.train`` as ``memdist train`` does: real Ray
Train workers (gloo), real DeepSpeed ZeRO engines, shard actors on a local Ray
instance. N workers x M shards at global batch B must train the same model as one
process with a local table at batch B.
"""

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from memdist.config import load_config
from memdist.errors import WorkerError
from memdist.train import train

STEPS = 20


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    # The cluster defines the shard resource: shard actors must ask for it.
    ray.init(address="local", num_cpus=4, resources={"memdist_shard": 2}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()


def cfg_of(*extra):
    """The debug model; both Adams get an eps well above roundoff (see ``tiny`` in
    test_sharded.py): with eps=1e-8 they turn the workers' other summation order into
    differences of a good share of the tolerance, differently on every CPU."""
    return load_config("small", [
        "model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.memory.layers=[1]",
        "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.k_dim=16",
        "model.memory.value_lr=0.01", "model.memory.value_eps=1e-4", "optim.eps=1e-6",
        "data.n_people=20", "data.seq_len=16",
        "optim.warmup_steps=2", f"train.steps={STEPS}", "train.log_every=1", "eval.max_qa=6",
        "eval.max_new_tokens=3", "eval.ppl_batches=1", "eval.batch_size=4", "train.threads=1",
        *extra,
    ])  # fmt: skip


def outcome(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    final = json.loads((run_dir / "final.json").read_text())
    return (
        losses,
        final,
        load_file(run_dir / "values.safetensors"),
        load_file(run_dir / "model.safetensors"),
    )


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One process, a local table, global batch 8."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(cfg_of("shards.count=0", "data.batch_size=8"), run_dir, progress=False)
    return outcome(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["train.zero_stage=3", "shards.plan=column", "data.batch_size=4"],
        ["train.zero_stage=2", "shards.plan=row", "data.batch_size=2", "train.grad_accum=2"],
        [
            "train.zero_stage=1",
            "shards.plan=row",
            "data.batch_size=4",
            "shards.transport=collective",
        ],
    ],
    ids=["zero3-column", "zero2-grad-accum-2x2", "zero1-row-collective"],
)
def test_two_workers_two_shards_match_one_process(ray_local, reference, tmp_path, extra):
    """(ZeRO-2 with row shards: test_value_grad_clip_is_exact_across_workers_and_shards.)"""
    cfg = cfg_of("cluster.workers=2", "shards.count=2", *extra)
    train(cfg, tmp_path, progress=False)
    matches_one_process(tmp_path, reference)


def matches_one_process(run_dir, reference):
    """The run in ``run_dir`` trained the model of the one-process ``reference`` run."""
    ref_losses, ref_final, ref_values, ref_model = reference
    losses, final, values, model = outcome(run_dir)
    assert len(losses) == STEPS and ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert values.keys() == ref_values.keys()
    for key in ref_values:  # rows and optimizer state of the memory
        torch.testing.assert_close(values[key], ref_values[key], rtol=1e-4, atol=1e-6)
    for key in ref_model:  # the backbone, gathered from ZeRO partitions
        torch.testing.assert_close(model[key], ref_model[key], rtol=1e-4, atol=1e-5)
    # Evaluation ran on both workers, each on its slice, synchronised by torchmetrics.
    assert final["workers"] == 2 and final["tokens"] == ref_final["tokens"]
    assert final["ppl"] == pytest.approx(ref_final["ppl"], rel=1e-4)
    assert final["key_usage"] == pytest.approx(ref_final["key_usage"], rel=1e-6)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["memory_wait_share"] <= 1 for r in records if r["kind"] == "train")


@pytest.mark.slow
def test_value_grad_clip_is_exact_across_workers_and_shards(ray_local, reference, tmp_path):
    """The values' gradient norm is over the whole table: two workers' gradients summed,
    both row shards' parts added, then one factor for all. It must clip (the norm logged
    by the unclipped run is above it at every step) and train what one process trains."""
    clip = "model.memory.value_grad_clip=2e-4"
    one = tmp_path / "one"
    train(cfg_of("shards.count=0", "data.batch_size=8", clip), one, progress=False)
    clipped = outcome(one)
    records = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    norms = [r["value_grad_norm"] for r in records if r["kind"] == "train"]
    assert len(norms) == STEPS and min(norms) > 2e-4  # every step was clipped
    assert clipped[0] != reference[0]  # and clipping changed the training
    two = tmp_path / "two"
    cfg = cfg_of("cluster.workers=2", "shards.count=2", "shards.plan=row", "data.batch_size=4",
                 "train.zero_stage=2", clip)  # fmt: skip
    train(cfg, two, progress=False)
    matches_one_process(two, clipped)  # losses, rows, backbone, evaluation
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    two_norms = [r["value_grad_norm"] for r in records if r["kind"] == "train"]
    torch.testing.assert_close(torch.tensor(two_norms), torch.tensor(norms), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_two_workers_prefetching_into_zarr_backed_shards_change_nothing(ray_local, tmp_path):
    """Both workers hint their next micro-batch's rows (ZeRO-3: the hint's forward gathers
    parameters on both) to shards caching half their region: the same training as
    in-memory shards."""
    common = ["cluster.workers=2", "shards.count=2", "shards.plan=row", "train.zero_stage=3",
              "data.batch_size=2", "model.memory.n_keys=64", "train.steps=8"]  # fmt: skip
    train(cfg_of(*common), tmp_path / "memory", progress=False)
    cached = [*common, "shards.budget_mb=0.375", "shards.prefetch=true"]  # 1024 of 2048 rows
    train(cfg_of(*cached), tmp_path / "cached", progress=False)
    ref_losses, _, ref_values, _ = outcome(tmp_path / "memory")
    losses, _, values, _ = outcome(tmp_path / "cached")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for key in ref_values:
        torch.testing.assert_close(values[key], ref_values[key], rtol=1e-6, atol=1e-7)
    records = [
        json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r for r in records if r["kind"] == "train"][-1]["rows_prefetched"] > 0
    stats = [s for r in records if r["kind"] == "shards" for s in r["stats"]]
    assert all(s["cached"] for s in stats) and sum(s["prefetch_hits"] for s in stats) > 0


@pytest.mark.slow
def test_a_crashed_worker_fails_the_run_with_a_clear_error(ray_local, tmp_path):
    cfg = cfg_of(
        "cluster.workers=2", "shards.count=2", "data.batch_size=4", "train.steps=100000",
        "shards.timeout_s=20",
    )  # fmt: skip
    errors = []

    def run():
        try:
            train(cfg, tmp_path, progress=False)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until training is under way
        if metrics.is_file() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.5)
    assert ray.available_resources().get("memdist_shard", 0) == 0  # both shards hold one
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    pids = {r["worker"]: r["pid"] for r in records if r.get("role") == "worker"}
    assert sorted(pids) == [0, 1], (errors, metrics.read_text()[:3000])
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hung after a worker died"
    assert len(errors) == 1 and isinstance(errors[0], WorkerError), errors
    assert "2 workers failed" in str(errors[0])
    assert not (tmp_path / "final.json").exists()


def test_the_trainer_keeps_ray_trains_callbacks_but_the_placement_group_cleaner(ray_local):
    """The cleaner's asks can go to another cluster's state API, and runs waited 12 s for
    it after their workers were done (see ``trainer_class``). The test fails if Ray
    renames the method the trainer overrides, or the callback it drops."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks import BackendSetupCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from memdist.workers import trainer_class

    trainer = trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    kinds = {type(c) for c in trainer._create_default_callbacks()}
    assert BackendSetupCallback in kinds and PlacementGroupCleanerCallback not in kinds


def test_the_run_desk_hands_over_records_in_order_while_the_driver_waits(ray_local):
    """The desk (one actor for the records, the stop request and the ledger): a ``put``
    is served while the driver's ``take`` waits (its own concurrency group), a worker's
    records come in the order put, and the ledger's answers come through it."""
    from memdist.desk import Outbox, start_desk, take
    from memdist.workers import driver_node

    desk = start_desk(load_config("small"), driver_node())
    t0 = time.monotonic()
    waiting = desk.take.options(concurrency_group="take").remote(30.0)
    time.sleep(0.5)
    outbox = Outbox(desk)  # as a worker sends them: each once the one before arrived
    for s in range(5):
        outbox.put({"kind": "tick", "step": s})
    outbox.flush()
    got = ray.get(waiting, timeout=30)
    assert time.monotonic() - t0 < 20  # the put woke the wait; it did not run out
    assert [r["step"] for r in got + take(desk, 0.0)] == [0, 1, 2, 3, 4]
    assert take(desk, 0.2) == []
    assert ray.get(desk.stopping.remote()) is False
    desk.stop.remote()
    assert ray.get(desk.stopping.remote()) is True
    attempt = ray.get(desk.join.remote(0))
    assert (attempt.number, attempt.resume) == (0, None)
    desk.saved.remote("file:///ckpt/step-000004", 4)
    desk.failed.remote(0, 1, "ShardError: shard 1 died")
    again = ray.get(desk.join.remote(0))
    assert (again.number, again.resume, again.step) == (1, "file:///ckpt/step-000004", 4)
    assert again.cause == "worker 1: ShardError: shard 1 died"
    ray.kill(desk)
