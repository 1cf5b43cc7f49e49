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
from memdist.errors import CheckpointError
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
        (
            "folder",
            [
                "cluster.workers=2",
                "cluster.cpus_per_worker=0.5",
                "shards.count=2",
                "shards.plan=row",
                "data.batch_size=2",
                "train.zero_stage=3",
            ],
        ),
    ],  # fmt: skip
    ids=["local-table-folder", "ray-shards-s3", "2workers-2shards-zero3-folder"],
)
def test_resume_continues_exactly(ray_local, tmp_path, s3_endpoint, target, layout):
    ck, reach = where(target, tmp_path, s3_endpoint, "ck")
    train(cfg_of(*layout, *reach, f"train.checkpoint.dir={ck}", "train.checkpoint.every=6"),
          tmp_path / "whole", progress=False)  # fmt: skip
    again = cfg_of(*layout, *reach, f"train.checkpoint.dir={ck}-2",
                   f"train.checkpoint.resume={ck}/step-000006")  # fmt: skip
    final = train(again, tmp_path / "resumed", progress=False)
    whole = losses(tmp_path / "whole")
    assert len(whole) == STEPS and final["step"] == STEPS
    assert losses(tmp_path / "resumed") == whole[6:]  # fp32, same layout: equal, not close
    a = load_file(tmp_path / "whole" / "values.safetensors")
    b = load_file(tmp_path / "resumed" / "values.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert final["tokens"] == json.loads((tmp_path / "whole" / "final.json").read_text())["tokens"]


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
