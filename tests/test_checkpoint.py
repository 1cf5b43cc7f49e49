"""Checkpoints of whole runs: save, resume exactly, reshard, and refuse what is broken.

Every run goes through ``memdist.train.train`` (or the CLI) with real DeepSpeed, real
shard servers (Ray actors where named) and real targets: a folder, and an S3 bucket
on moto's server on loopback (boto3 over HTTP, as zarr and s3fs test themselves).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import zarr
from safetensors.torch import load_file

from memdist.cli import main as cli
from memdist.config import load_config
from memdist.errors import CheckpointError, ConfigError
from memdist.train import train

BUCKET = "memdist-runs"
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def aws_env(tmp_path_factory):
    """Fake credentials (set before Ray starts, so shard actors inherit them), nothing
    read from this machine's ~/.aws or an instance role."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                           "AWS_CONFIG_FILE": str(empty)}.items():  # fmt: skip
            mp.setenv(var, value)
        yield


@pytest.fixture(scope="module")
def s3(aws_env):
    """An S3 endpoint on loopback with one bucket; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def cfg_of(*extra):
    """The debug model; Adam eps above roundoff, as in the parity tests (test_sharded)."""
    return load_config("small", [
        "shards.count=0", "model.dim=32", "model.n_heads=2", "model.n_layers=2",
        "model.memory.layers=[1]", "model.memory.n_keys=16", "model.memory.knn=4",
        "model.memory.k_dim=16", "model.memory.value_lr=0.01", "model.memory.value_eps=1e-4",
        "optim.eps=1e-6", "data.n_people=20", "data.seq_len=16", "data.batch_size=4",
        "optim.warmup_steps=2", f"train.steps={STEPS}", "train.log_every=1", "eval.max_qa=4",
        "eval.max_new_tokens=2", "eval.ppl_batches=1", "train.threads=1", *extra,
    ])  # fmt: skip


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def where(kind, tmp_path, s3_endpoint, name):
    """A checkpoint folder URI and the overrides that reach it."""
    if kind == "folder":
        return str(tmp_path / name), []
    return f"s3://{BUCKET}/{tmp_path.name}/{name}", [f"train.checkpoint.endpoint_url={s3_endpoint}"]


@pytest.fixture
def s3_endpoint(request):
    return request.getfixturevalue("s3") if "s3" in request.node.name else None


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, layout",
    [
        ("folder", ["shards.count=0"]),
        ("s3", ["shards.count=2", "shards.plan=row", "shards.transport=ray"]),
    ],  # fmt: skip
    ids=["local-table-folder", "ray-shards-s3"],
)
def test_resume_continues_exactly(ray_local, tmp_path, s3_endpoint, target, layout):
    ck, reach = where(target, tmp_path, s3_endpoint, "ck")
    train(cfg_of(*layout, *reach, f"train.checkpoint.dir={ck}", "train.checkpoint.every=6"),
          tmp_path / "whole", progress=False)  # fmt: skip
    resumes_exactly(tmp_path / "whole", ck, [*layout, *reach], tmp_path / "resumed")


def resumes_exactly(whole, ck, overrides, resumed):
    """A run resumed from ``ck``'s step 6 with the same layout ends as ``whole`` did."""
    again = cfg_of(*overrides, f"train.checkpoint.dir={ck}-2",
                   f"train.checkpoint.resume={ck}/step-000006")  # fmt: skip
    final = train(again, resumed, progress=False)
    assert len(losses(whole)) == STEPS and final["step"] == STEPS
    assert losses(resumed) == losses(whole)[6:]  # fp32, same layout: equal, not close
    a = load_file(whole / "values.safetensors")
    b = load_file(resumed / "values.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert final["tokens"] == json.loads((whole / "final.json").read_text())["tokens"]


TWO_WORKERS = ["cluster.workers=2", "cluster.cpus_per_worker=0.5", "shards.count=2",
               "shards.plan=row", "data.batch_size=2", "train.zero_stage=3"]  # fmt: skip


@pytest.fixture(scope="module")
def two_workers_run(ray_local, tmp_path_factory):
    """2 workers x 2 row shards under ZeRO-3 (partitioned parameters and optimizer
    state), a checkpoint every 6 steps; returns the run folder and the checkpoints'."""
    root = tmp_path_factory.mktemp("two-workers")
    train(cfg_of(*TWO_WORKERS, f"train.checkpoint.dir={root / 'ck'}", "train.checkpoint.every=6"),
          root / "whole", progress=False)  # fmt: skip
    return root / "whole", root / "ck"


@pytest.mark.slow
def test_two_workers_resume_exactly(two_workers_run, tmp_path):
    whole, ck = two_workers_run
    resumes_exactly(whole, ck, TWO_WORKERS, tmp_path / "resumed")


@pytest.mark.slow
def test_a_zero3_checkpoint_is_refused_under_another_stage(two_workers_run, tmp_path):
    """DeepSpeed cannot load a ZeRO-3 checkpoint into a ZeRO-2 engine (it fails deep in a
    worker, on files it does not find): the run is refused before anything starts."""
    _, ck = two_workers_run
    one = ["shards.count=2", "shards.plan=row", "data.batch_size=4", "train.zero_stage=2",
           f"train.checkpoint.resume={ck}/step-000006"]  # fmt: skip
    with pytest.raises(CheckpointError, match="saved under ZeRO stage 3.*train.zero_stage=2"):
        train(cfg_of(*one), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, loaded",
    [
        (["shards.count=2", "shards.plan=row"], ["shards.count=3", "shards.plan=column"]),
        (["shards.count=3", "shards.plan=column"], ["shards.count=0"]),
        (["shards.count=0"], ["shards.count=2", "shards.plan=row"]),
    ],  # fmt: skip
    ids=["2row-to-3column", "3column-to-local", "local-to-2row"],
)
def test_resharding_on_load(tmp_path, saved, loaded):
    """A table saved from M shards under one plan loads into M' shards under another:
    the steps after the resume are those of the run that never stopped (to 1e-5: the
    summation order of the new layout differs)."""
    inproc = ["shards.transport=inprocess"]
    ck = tmp_path / "ck"
    train(cfg_of(*saved, *inproc, f"train.checkpoint.dir={ck}", "train.checkpoint.every=6"),
          tmp_path / "whole", progress=False)  # fmt: skip
    train(cfg_of(*loaded, *inproc, f"train.checkpoint.resume={ck}/step-000006"),
          tmp_path / "resumed", progress=False)  # fmt: skip
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert len(resumed) == STEPS - 6
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole[6:]), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One finished run with two checkpoints (steps 6 and 12) in a folder."""
    root = tmp_path_factory.mktemp("saved")
    cfg = cfg_of("shards.count=2", "shards.plan=column", "shards.transport=inprocess",
                 f"train.checkpoint.dir={root / 'ck'}", "train.checkpoint.every=6")  # fmt: skip
    train(cfg, root / "run", progress=False)
    return root


def test_checkpoints_are_listed_and_verified(saved, capsys):
    assert cli(["checkpoint", "ls", str(saved / "ck")]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(c["step"], c["complete"]) for c in listed] == [(6, True), (12, True)]
    assert all(c["bytes"] > 0 for c in listed)
    assert cli(["checkpoint", "verify", str(saved / "ck" / "step-000012")]) == 0
    manifest = json.loads((saved / "ck" / "step-000012" / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["config"]["model"]["dim"] == 32
    assert any(k.startswith("backbone/") for k in manifest["objects"])
    assert "trainer.json" in manifest["objects"]


def test_a_saved_table_opens_with_plain_zarr(saved):
    """No memdist needed to read the values: a zarr group, a sub-group per region."""
    group = zarr.open_group(str(saved / "ck" / "step-000012" / "tables" / "table0"), mode="r")
    assert group.attrs["num_rows"] == 256 and group.attrs["plan"] == "column"
    halves = [group[f"region{i}"]["weight"][:] for i in range(2)]
    assert [h.shape for h in halves] == [(256, 16), (256, 16)]
    values = load_file(saved / "run" / "values.safetensors")["table0.weight"]
    assert torch.equal(torch.from_numpy(zarr_concat(halves)), values)


def zarr_concat(parts):
    import numpy as np

    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("truncate", "does not match its checksum"),
        ("delete", "is missing"),
        ("manifest", "not a complete checkpoint"),
    ],  # fmt: skip
)
def test_damaged_checkpoints_are_refused_by_name(saved, tmp_path, damage, named, capsys):
    import shutil

    ck = tmp_path / "step-000006"
    shutil.copytree(saved / "ck" / "step-000006", ck)
    chunk = next(p for p in sorted((ck / "tables").rglob("c/*/*")) if p.is_file())
    key = chunk.relative_to(ck).as_posix()
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-3])
    elif damage == "delete":
        chunk.unlink()
    else:
        (ck / "manifest.json").unlink()
    cfg = cfg_of("shards.count=2", "shards.plan=row", "shards.transport=inprocess",
                 f"train.checkpoint.resume={ck}")  # fmt: skip
    with pytest.raises(CheckpointError, match=named) as err:
        train(cfg, tmp_path / "run", progress=False)
    if damage != "manifest":
        assert key in str(err.value)
    code = cli(["checkpoint", "verify", str(ck)]) if damage != "manifest" else None
    if code is not None:
        assert code == 1 and key in capsys.readouterr().out


def test_an_unwritable_checkpoint_target_fails_before_training(s3, tmp_path):
    t0 = time.monotonic()
    cfg = cfg_of("train.checkpoint.dir=s3://no-such-bucket/runs",
                 f"train.checkpoint.endpoint_url={s3}")  # fmt: skip
    with pytest.raises(CheckpointError, match="no-such-bucket"):
        train(cfg, tmp_path / "run", progress=False)
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_keep_holds_the_newest_checkpoints(tmp_path):
    ck = tmp_path / "ck"
    train(cfg_of(f"train.checkpoint.dir={ck}", "train.checkpoint.every=3",
                 "train.checkpoint.keep=2"), tmp_path / "run", progress=False)  # fmt: skip
    assert sorted(p.name for p in ck.iterdir()) == ["step-000009", "step-000012"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["--shards", "0"],
        ["--workers", "2", "--shards", "2", "--set", "cluster.cpus_per_worker=0.5"],
    ],  # fmt: skip
    ids=["one-process", "two-workers"],
)
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, layout):
    """A spot instance's notice to the driver: the run (its Ray Train workers too) ends
    after the current step with a checkpoint of that step."""
    run, ck = tmp_path / "run", tmp_path / "ck"
    args = [sys.executable, "-m", "memdist.cli", "train", "small", "--no-progress",
            "--run-dir", str(run), "--checkpoint-dir", str(ck), *layout,
            "--set", "train.steps=100000", "--set", "train.log_every=1",
            "--set", "eval.max_qa=2", "--set", "eval.ppl_batches=1", "--set", "data.n_people=20",
            "--set", "model.memory.n_keys=16", "--set", "model.memory.knn=4"]  # fmt: skip
    # A process of its own: not the rendezvous of this test process's DeepSpeed group.
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    deadline = time.monotonic() + 240
    while '"train"' not in _read(run / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    final = json.loads(out.strip().splitlines()[-1])
    assert 1 <= final["step"] < 100000
    assert "interrupted" in err
    assert (ck / f"step-{final['step']:06d}" / "manifest.json").is_file()


def _read(path):
    return path.read_text() if path.is_file() else ""


def test_export_eval_and_generate_read_what_the_shards_hold(saved, tmp_path, capsys):
    """The exported folder (no Ray, no DeepSpeed) gives the same next-token logits as the
    model read through shard servers, and ``memdist eval``/``generate`` run on both."""
    from memdist.assembly import build_model
    from memdist.checkpoint import load_weights
    from memdist.from_checkpoint import generate, load_model
    from memdist.runlog import load_run_config

    ck = str(saved / "ck" / "step-000012")
    out = tmp_path / "exported"
    assert cli(["checkpoint", "export", ck, str(out)]) == 0
    cfg = load_run_config(out)
    model, tables = build_model(cfg, torch.device("cpu"))
    load_weights(out, model, tables)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with load_model(ck, max_table_mb=0) as sharded:  # over budget: in shard servers
        assert sharded.group is not None and "column-wise" in sharded.tables[0].describe()
        expect = sharded.model(tokens)
        text = generate(sharded.model, "Q: Where", max_new_tokens=5)
    torch.testing.assert_close(model.eval()(tokens), expect, rtol=1e-6, atol=1e-6)
    capsys.readouterr()
    assert cli(["generate", ck, "--prompt", "Q: Where", "--max-new-tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["completion"] == text
    assert cli(["eval", ck]) == 0
    from_ck = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert cli(["eval", str(out)]) == 0
    from_export = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert from_ck["eval_loss"] == pytest.approx(from_export["eval_loss"], rel=1e-6)


def test_export_refuses_a_table_over_the_budget(tmp_path):
    ck = tmp_path / "ck"
    train(cfg_of(f"train.checkpoint.dir={ck}", "train.steps=2"), tmp_path / "run",
          progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"over the 0\.01 MB one process may hold"):
        from memdist.from_checkpoint import export

        export(str(ck / "step-000002"), tmp_path / "out", max_table_mb=0.01)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["shards.count=0"], ["shards.count=2", "shards.plan=column", "shards.transport=ray"]],
    ids=["local-table", "ray-column-shards"],
)
def test_incremental_checkpoints_resume_exactly_and_keep_their_chain(
    ray_local, tmp_path, layout, capsys
):
    """Saves at 3 (full), 6 and 9 (changed rows only), 12 (full again: full_every=9);
    resuming from 9 loads 3, then 6 and 9 over it, and continues as the run did."""
    ck = tmp_path / "ck"
    every = ["train.checkpoint.every=3", "train.checkpoint.full_every=9", "train.checkpoint.keep=2"]
    train(cfg_of(*layout, f"train.checkpoint.dir={ck}", *every), tmp_path / "whole", progress=False)
    # keep=2 holds 9 and 12, and 3 and 6 because 9 builds on them.
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{s:06d}" for s in (3, 6, 9, 12)]
    capsys.readouterr()
    assert cli(["checkpoint", "ls", str(ck)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["kind"], r["parent"]) for r in listed] == [
        (3, "full", None), (6, "incremental", "step-000003"),
        (9, "incremental", "step-000006"), (12, "full", None),
    ]  # fmt: skip
    done = {r["step"]: r for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl")
            .read_text().splitlines()) if r["kind"] == "checkpoint_done"}  # fmt: skip
    assert sorted(done) == [3, 6, 9, 12]
    assert done[6]["save"] == "incremental" and done[3]["save"] == "full"
    assert done[6]["table_bytes"] < done[3]["table_bytes"]  # only the rows steps 4-6 changed
    assert cli(["checkpoint", "verify", str(ck / "step-000009")]) == 0
    final = train(cfg_of(*layout, f"train.checkpoint.resume={ck}/step-000009"),
                  tmp_path / "resumed", progress=False)  # fmt: skip
    assert final["step"] == STEPS
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")[9:]
    a = load_file(tmp_path / "whole" / "values.safetensors")
    b = load_file(tmp_path / "resumed" / "values.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The chain is checked link by link: a damaged base fails the checkpoint built on it.
    (ck / "step-000003" / "tables" / "table0" / "zarr.json").write_text("{}")
    capsys.readouterr()
    assert cli(["checkpoint", "verify", str(ck / "step-000009")]) == 1
    assert "step-000003/tables/table0/zarr.json" in capsys.readouterr().out


@pytest.mark.slow
def test_an_s3_outage_fails_saves_not_the_run_and_leaves_only_whole_checkpoints(tmp_path, aws_env):
    """The S3 endpoint goes away after the first checkpoint (during the saves that follow)
    and comes back once a save has failed; when a later save is complete the run gets a
    SIGTERM. Training went on throughout, the checkpoints left are each complete and
    verify (the failed ones are gone), and the run resumes from the latest."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    from memdist.storage import manifest as mf
    from memdist.storage.targets import open_target

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    metrics = tmp_path / "run" / "metrics.jsonl"
    servers, seen = [server], []

    def logged(kind):
        if not metrics.is_file():
            return []
        return [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == kind]

    def until(what, deadline):
        while not what():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def outage():
        deadline = time.monotonic() + 240
        client = boto3.client("s3", endpoint_url=endpoint)
        key = "ck/step-000004/manifest.json"
        until(lambda: client.list_objects_v2(Bucket="outage", Prefix=key)["KeyCount"], deadline)
        servers[0].stop()  # moto keeps the buckets in this process: a restart finds them
        seen.append("stopped")
        until(lambda: logged("checkpoint_failed"), deadline)
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()
        seen.append("restarted")
        failed = logged("checkpoint_failed")[-1]["step"]
        until(lambda: any(r["step"] > failed for r in logged("checkpoint_done")), deadline)
        seen.append("saved again")
        os.kill(os.getpid(), signal.SIGTERM)  # the run stops after this step, with a save

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    ck = "s3://outage/ck"
    reach = [f"train.checkpoint.endpoint_url={endpoint}", "train.checkpoint.keep=100",
             "train.checkpoint.s3_max_attempts=2"]  # fmt: skip
    try:
        final = train(cfg_of(f"train.checkpoint.dir={ck}", "train.checkpoint.every=4",
                             "train.steps=100000", "train.max_minutes=5", *reach),
                      tmp_path / "run", progress=False)  # fmt: skip
        watcher.join(timeout=60)
        assert seen == ["stopped", "restarted", "saved again"]
        failed = [r["step"] for r in logged("checkpoint_failed")]
        assert all("after 2 attempts" in r["error"] for r in logged("checkpoint_failed"))
        done = [r["step"] for r in logged("checkpoint_done")]
        assert failed and done[0] == 4 and done[-1] == final["step"] > failed[-1]
        assert not set(failed) & set(done)
        root = open_target(ck, endpoint_url=endpoint)
        listed = mf.list_checkpoints(root)
        assert [i.step for i in listed] == done  # the failed saves left nothing behind
        for info in listed:
            mf.verify_or_raise(root.child(info.key))
        resumed = train(cfg_of("train.checkpoint.resume=latest", f"train.checkpoint.dir={ck}",
                               f"train.steps={final['step'] + 2}", *reach),
                        tmp_path / "resumed", progress=False)  # fmt: skip
        assert resumed["step"] == final["step"] + 2
    finally:
        servers[-1].stop()


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_worker_count_and_shard_layout(ray_local, tmp_path):
    """2 workers x 2 row shards under ZeRO-2 -> 1 worker x 3 column shards: DeepSpeed's
    universal checkpoint moves the partitioned optimizer state, the same global batches
    follow, and the losses are those of the run that went on (summation order differs)."""
    whole, ck = tmp_path / "whole", tmp_path / "ck"
    two = ["cluster.workers=2", "cluster.cpus_per_worker=0.5", "shards.count=2",
           "shards.plan=row", "data.batch_size=2", "train.zero_stage=2"]  # fmt: skip
    train(cfg_of(*two, f"train.checkpoint.dir={ck}", "train.checkpoint.every=6"), whole,
          progress=False)  # fmt: skip
    one = ["shards.count=3", "shards.plan=column", "train.zero_stage=2"]
    with pytest.raises(CheckpointError, match="saved under ZeRO stage 2.*train.zero_stage=3"):
        train(cfg_of(*two[:-1], "train.zero_stage=3", f"train.checkpoint.resume={ck}/step-000006"),
              tmp_path / "to-zero3", progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="global batches of 4 rows"):
        train(cfg_of(*one, "data.batch_size=2", f"train.checkpoint.resume={ck}/step-000006"),
              tmp_path / "wrong-batch", progress=False)  # fmt: skip
    train(cfg_of(*one, "data.batch_size=4", f"train.checkpoint.resume={ck}/step-000006"),
          tmp_path / "resumed", progress=False)  # fmt: skip
    assert losses(tmp_path / "resumed") == pytest.approx(losses(whole)[6:], rel=1e-5)


def test_a_table_too_large_to_gather_stays_in_the_checkpoints(tmp_path, monkeypatch):
    """Over the driver's gather budget the run folder keeps the backbone only, and a run
    without checkpoints is refused before it starts (its tables would be lost)."""
    import memdist.train as driver

    monkeypatch.setattr(driver, "GATHER_VALUES_MB", 0.01)  # the debug table is 0.03 MB
    with pytest.raises(ConfigError, match="set train.checkpoint.dir"):
        train(cfg_of(), tmp_path / "no-checkpoints", progress=False)
    assert not (tmp_path / "no-checkpoints").exists()
    ck = tmp_path / "ck"
    train(cfg_of(f"train.checkpoint.dir={ck}", "train.steps=4"), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "values.safetensors").exists()
    assert [p.name for p in ck.iterdir()] == ["step-000004"]
    # A benchmark may let the tables go, explicitly: no checkpoints, no values file.
    train(cfg_of("train.save_tables=false", "train.steps=2"), tmp_path / "let-go", progress=False)
    assert (tmp_path / "let-go" / "model.safetensors").is_file()
    assert not (tmp_path / "let-go" / "values.safetensors").exists()
