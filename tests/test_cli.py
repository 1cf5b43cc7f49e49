"""The command line contract, end to end in a subprocess: train, eval, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "--set",
    "shards.count=0",
    "--set",
    "model.dim=32",
    "--set",
    "model.n_heads=2",
    "--set",
    "model.n_layers=2",
    "--set",
    "model.memory.layers=[1]",
    "--set",
    "model.memory.n_keys=16",
    "--set",
    "model.memory.knn=4",
    "--set",
    "model.memory.k_dim=16",
    "--set",
    "data.n_people=20",
    "--set",
    "data.seq_len=32",
    "--set",
    "data.batch_size=4",
    "--set",
    "train.steps=8",
    "--set",
    "train.log_every=2",
    "--set",
    "train.eval_every=4",
    "--set",
    "optim.warmup_steps=2",
    "--set",
    "eval.max_qa=8",
    "--set",
    "eval.max_new_tokens=4",
]


def clean_env(**extra: str) -> dict[str, str]:
    # A fresh process: not the rendezvous of this test process's own gloo group.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    return {**env, "DS_ACCELERATOR": "cpu", **extra}


# A test head stops at once on SIGTERM: by default it drains first, for up to 30 s, and
# after a training run it waited out all 30 (test_train_joins_a_running_ray_cluster).
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def token_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A fresh process's environment for a Ray cluster with token authentication on, and
    a token of this test's own (made here, in tmp_path)."""
    from memdist.cluster.launcher import ensure_token

    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"), **extra)
    os.environ["RAY_AUTH_TOKEN_PATH"] = env["RAY_AUTH_TOKEN_PATH"]
    try:
        ensure_token()
    finally:
        del os.environ["RAY_AUTH_TOKEN_PATH"]
    return env


def memdist(
    *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = env or clean_env()
    result = subprocess.run(
        [sys.executable, "-m", "memdist.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"memdist {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_then_eval_a_run_folder(tmp_path):
    run = tmp_path / "run"
    cache = ["--set", f"data.cache_dir={tmp_path / 'data'}"]
    out = last_json(
        memdist("train", *TINY, *cache, "--run-dir", str(run), "--no-progress", cwd=tmp_path).stdout
    )
    for key in ("step", "loss", "qa_em", "qa_f1", "tokens_per_s", "ppl", "key_usage", "key_kl"):
        assert key in out, key
    assert out["step"] == 8 and out["tokens_per_s"] > 0 and 0 <= out["qa_em"] <= 1
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "final.json",
        "model.safetensors",
        "values.safetensors",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert "model.memory.n_keys" not in (run / "config.yaml").read_text()
    assert "n_keys: 16" in (run / "config.yaml").read_text()

    again = last_json(memdist("eval", str(run), cwd=tmp_path).stdout)
    for key in ("qa_em", "qa_f1", "ppl", "key_usage"):
        assert again[key] == pytest.approx(out[key], rel=1e-6), key
    assert again["step"] == 8


def test_bad_override_is_a_clear_error(tmp_path):
    result = memdist("train", "--set", "model.memory.knn=999", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "knn=999 must be between 1 and n_keys=64" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_of_missing_or_corrupt_run(tmp_path):
    result = memdist("eval", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "is not a run folder" in result.stderr


@pytest.mark.slow
def test_corrupt_weights_are_reported(tmp_path):
    run = tmp_path / "run"
    memdist(
        "train",
        *TINY,
        "--set",
        "train.steps=2",
        "--set",
        "train.eval_every=0",
        "--set",
        f"data.cache_dir={tmp_path / 'data'}",
        "--run-dir",
        str(run),
        "--no-progress",
        cwd=tmp_path,
    )
    (run / "values.safetensors").write_bytes(b"not a safetensors file")
    result = memdist("eval", str(run), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "values.safetensors" in result.stderr
    assert "corrupt" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["inprocess", "ray", "collective"])
def test_train_with_shards(tmp_path, transport):
    run = tmp_path / "run"
    result = memdist(
        "train", *TINY, "--set", "train.eval_every=0", "--set", f"data.cache_dir={tmp_path / 'd'}",
        "--shards", "2", "--plan", "row", "--transport", transport, "--run-dir", str(run),
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    out = last_json(result.stdout)
    assert out["step"] == 8 and out["tokens_per_s"] > 0
    assert "row-wise plan of 256 x 32 over 2 shards" in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (start,) = [r for r in records if r["kind"] == "start"]
    assert start["shards"] == 2
    assert [t.split(" over")[0] for t in start["tables"]] == ["row-wise plan of 256 x 32"]
    placed = [(r["shard"], r["threads"]) for r in records if r["kind"] == "placement"]
    # Where each shard actor runs; off memory nodes (here the worker's) on one thread.
    assert placed == ([] if transport == "inprocess" else [(0, 1), (1, 1)])
    (shards,) = [r for r in records if r["kind"] == "shards"]  # their counters at the end
    assert [s["steps"] for s in shards["stats"]] == [8, 8]
    # The run folder's weights were gathered from the shards and evaluate locally.
    again = last_json(memdist("eval", str(run), cwd=tmp_path).stdout)
    assert again["qa_em"] == pytest.approx(out["qa_em"]) and again["ppl"] == pytest.approx(
        out["ppl"]
    )


@pytest.mark.slow
def test_train_joins_a_running_ray_cluster(tmp_path):
    """--address: 2 workers and 2 collective shards on a cluster started by `ray start`."""
    import shutil
    import signal
    import socket
    import tempfile
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = token_env(tmp_path)  # the test cluster requires a token
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=4", "--block",
         "--include-dashboard=false", "--disable-usage-stats"],
        env={**env, **NO_DRAIN}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        run = tmp_path / "run"
        result = memdist(
            "train", *TINY, "--set", f"data.cache_dir={tmp_path / 'd'}", "--set", "shards.count=2",
            "--workers", "2", "--transport", "collective", "--address", f"127.0.0.1:{port}",
            "--run-dir", str(run), "--no-progress", cwd=tmp_path, env=env,
        )  # fmt: skip
        out = last_json(result.stdout)
        assert out["step"] == 8 and out["workers"] == 2
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        placed = sorted((r["role"], r.get("worker", r.get("shard"))) for r in records
                        if r["kind"] == "placement")  # fmt: skip
        assert placed == [("shard", 0), ("shard", 1), ("worker", 0), ("worker", 1)]
        head.send_signal(signal.SIGTERM)  # --block: the head drains and stops its processes
        head.wait(timeout=90)
        # With no --address a run starts its own instance, even though `ray start` left
        # the dead cluster recorded as this machine's current one.
        result = memdist(
            "train", *TINY, "--set", f"data.cache_dir={tmp_path / 'd'}", "--set", "train.steps=2",
            "--shards", "2", "--run-dir", str(tmp_path / "local"), "--no-progress",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert last_json(result.stdout)["step"] == 2
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            head.wait(timeout=90)
        # `ray start` recorded this cluster as the machine's current one; it is gone now.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def used_run_folder(run: Path) -> dict[str, bytes]:
    """A folder as an earlier run left it (written by hand: no training needed)."""
    (run / "shards" / "table0").mkdir(parents=True)
    (run / "config.yaml").write_text("name: earlier\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 99, "tokens": 99, "loss": 1.0}\n')
    (run / "final.json").write_text('{"step": 99}\n')
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_train_refuses_a_run_folder_that_is_not_empty(tmp_path):
    run = tmp_path / "run"
    before = used_run_folder(run)
    result = memdist("train", *TINY, "--run-dir", str(run), "--no-progress", cwd=tmp_path,
                     check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run folder {str(run)!r} is not empty" in result.stderr
    assert "--overwrite to empty this folder first" in result.stderr
    after = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_train_overwrite_empties_the_run_folder_first(tmp_path):
    run = tmp_path / "run"
    used_run_folder(run)
    (tmp_path / "beside.txt").write_text("not in the run folder")
    result = memdist(
        "train", *TINY, "--set", "train.steps=2", "--set", "train.eval_every=0",
        "--set", f"data.cache_dir={tmp_path / 'data'}", "--run-dir", str(run), "--overwrite",
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert last_json(result.stdout)["step"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2]
    assert not (run / "shards").exists() and "name: small" in (run / "config.yaml").read_text()
    assert json.loads((run / "final.json").read_text())["step"] == 2
    assert (tmp_path / "beside.txt").is_file()
