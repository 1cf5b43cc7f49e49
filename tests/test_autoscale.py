"""The autoscaler starts memory nodes for a run's shards, a run survives losing one of
them, and they go away when idle: Ray's fake multi-node provider, real Ray processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from memdist.cluster.fake import FakeCluster, kill_node
from memdist.cluster.launcher import CONFIG_DIR, ray_cli
from tests.test_cli import NO_DRAIN, clean_env, last_json, memdist, token_env
from tests.test_recovery import RUN, done_after, records, start, wait_for


@pytest.fixture
def fake_cluster(tmp_path):
    """A head whose autoscaler (the fake provider) starts memory nodes on demand; token
    authentication on, with a token of this test's own."""
    with FakeCluster(tmp_path / "cluster", env=clean_env()) as cluster:
        yield cluster


@pytest.mark.slow
def test_shards_get_memory_nodes_that_survive_a_lost_node_and_go_when_idle(fake_cluster, tmp_path):
    cluster = fake_cluster
    env = cluster.env
    assert cluster.nodes("memory_node") == 0
    run, data = tmp_path / "run", ["--set", f"data.cache_dir={tmp_path / 'd'}"]
    args = [*RUN, *data, "--workers", "1", "--set", "train.steps=40",
            "--set", "shards.memory_nodes=true", "--set", "shards.timeout_s=30"]  # fmt: skip
    t0 = time.monotonic()
    proc = start(tmp_path, *args, "--address", cluster.address, "--max-failures", "1",
                 "--checkpoint-dir", str(tmp_path / "ck"), "--run-dir", str(run),
                 env=env)  # fmt: skip
    try:
        first = wait_for(run, proc, lambda rs: [r for r in rs if r["kind"] == "train"],
                         "a first step")  # fmt: skip
        scaled_s = time.monotonic() - t0
        recs = records(run)
        shards = {r["shard"]: r for r in recs if r["kind"] == "placement" and r["role"] == "shard"}
        nodes = {s: r["node"] for s, r in shards.items()}
        (worker_node,) = [r["node"] for r in recs if r["kind"] == "placement"
                          and r["role"] == "worker"]  # fmt: skip
        # Each shard on its own memory node, started for it; the worker elsewhere.
        assert len(set(nodes.values())) == 2 and worker_node not in nodes.values()
        assert cluster.nodes("memory_node") == 2 and first
        wait_for(run, proc, done_after(0, 3), "a checkpoint")
        t_kill = time.monotonic()
        assert shards[1]["pid"] in kill_node(nodes[1])  # the node, its raylet and the shard
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "err").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert last_json((tmp_path / "out").read_text())["step"] == 40
    recs = records(run)
    (recovery,) = [r for r in recs if r["kind"] == "recovery"]
    assert recovery["steps_redone"] >= 0 and recovery["from_step"] >= 3
    print(
        f"memory nodes up and first step: {scaled_s:.1f} s; from the lost node to training "
        f"again: {time.monotonic() - t_kill:.1f} s (recovery record: {recovery})"
    )
    # Training went on from the checkpoint as the first attempt had from there: every step
    # trained again has the loss it had (a whole resumed run is compared in test_recovery).
    losses = [{r["step"]: r["loss"] for r in recs if r["kind"] == "train" and
               r.get("attempt", 0) == attempt} for attempt in (0, 1)]  # fmt: skip
    assert sorted(losses[1]) == list(range(recovery["from_step"] + 1, 41))
    redone = sorted(set(losses[0]) & set(losses[1]))
    assert redone == list(range(recovery["from_step"] + 1, recovery["failed_after_step"] + 1))
    assert {s: losses[1][s] for s in redone} == {s: losses[0][s] for s in redone}
    # Idle memory nodes go away after the idle timeout.
    deadline = time.monotonic() + 90
    while cluster.nodes("memory_node"):
        assert time.monotonic() < deadline, "idle memory nodes were not removed"
        time.sleep(2)


def test_every_shipped_cluster_file_passes_rays_validation():
    from memdist.cluster.launcher import check_config, shipped_configs

    assert {"aws", "gcp", "local-fake"} <= set(shipped_configs())
    for name in shipped_configs():
        config = check_config(CONFIG_DIR / f"{name}.yaml")
        types = config["available_node_types"]
        assert any(t["resources"].get("memdist_shard") for t in types.values()), name
        text = (CONFIG_DIR / f"{name}.yaml").read_text()
        assert "aws_secret_access_key" not in text.lower() and "private_key" not in text
        if name != "local-fake":  # token auth on, dashboard on loopback only
            assert "RAY_AUTH_MODE=token ray start --head" in text
            assert "--dashboard-host=127.0.0.1" in text


def test_a_broken_cluster_file_is_refused_naming_the_problem(tmp_path):
    from memdist.cluster.launcher import check_config
    from memdist.errors import ConfigError

    config = yaml.safe_load((CONFIG_DIR / "aws.yaml").read_text())
    config["available_node_types"]["memory_node"]["resources"] = "lots"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="fails Ray's validation.*'lots' is not of type 'object'"):
        check_config(bad)
    del config["available_node_types"]["memory_node"]
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="no node type with the 'memdist_shard' resource"):
        check_config(bad)
    result = memdist("cluster", "up", str(tmp_path / "nope.yaml"), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "neither a file nor a shipped config" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cluster_submit_runs_a_training_job_on_a_head_with_token_auth(tmp_path):
    """`memdist cluster submit` against `ray start --head` (token auth on): the job's logs
    stream back and its exit status is the command's; a wrong token is refused."""
    port, dash = free_port(), free_port()
    agent = free_port()  # not the default 52365, which another head's agent may hold
    env = token_env(tmp_path)
    token = tmp_path / "token"
    head = subprocess.Popen(
        [ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={agent}"],
        env={**env, **NO_DRAIN}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while memdist("cluster", "status", f"127.0.0.1:{port}", cwd=tmp_path, env=env,
                      check=False).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, "the head did not start"
            time.sleep(1)
        run = tmp_path / "run"
        result = memdist(
            "cluster", "submit", api, "--", "memdist", "train", *RUN[: RUN.index("--workers")],
            "--set", "train.steps=4", "--set", f"data.cache_dir={tmp_path / 'd'}",
            "--run-dir", str(run), "--no-progress", cwd=tmp_path, env=env,
        )  # fmt: skip
        assert "submitted raysubmit_" in result.stderr
        assert last_json(result.stdout)["step"] == 4  # the job's own output, streamed back
        assert (run / "final.json").is_file()
        placed = [r for r in records(run) if r["kind"] == "placement"]  # on the head's cluster
        assert len(placed) == 2 and all(r["role"] == "shard" for r in placed)
        token_text = token.read_text().strip()
        assert token_text not in result.stdout + result.stderr
        assert all(token_text not in p.read_text(errors="ignore") for p in run.rglob("*")
                   if p.is_file())  # fmt: skip
        failed = memdist("cluster", "submit", api, "--", sys.executable, "-c",
                         "raise SystemExit(3)", cwd=tmp_path, env=env, check=False)  # fmt: skip
        assert failed.returncode == 3
        wrong = memdist("cluster", "submit", api, "--", "true", cwd=tmp_path, check=False,
                        env={**env, "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_TOKEN": "0" * 32})  # fmt: skip
        assert wrong.returncode == 2 and "refused this machine's token" in wrong.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
