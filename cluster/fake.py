"""A cluster on one machine: Ray's fake multi-node provider behind a real head.

``FakeCluster`` starts ``ray start --head`` with an autoscaling config whose provider is
``fake_multinode`` (``configs/local-fake.yaml`` by default): when demand appears, the
autoscaler starts "nodes" as local Ray processes and removes them when idle. Token
authentication is on, with the token at ``token_path``. Used by the autoscaler tests
and ``benchmarks/bench_cluster.py``; handy for trying a cluster run without a cloud.
Port 6379 is fixed: the fake nodes join the head there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from memdist.cluster.launcher import CONFIG_DIR, ensure_token, ray_cli

PORT = 6379
NODE_MARK = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # how the provider names a fake node's processes


class FakeCluster:
    def __init__(self, workdir: Path, *, config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.config = config or yaml.safe_load((CONFIG_DIR / "local-fake.yaml").read_text())
        self.address = f"127.0.0.1:{PORT}"
        token = self.workdir / "token"
        self.env = {**(env or os.environ), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "RAY_FAKE_CLUSTER": "1",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "5"}  # fmt: skip
        self.head: subprocess.Popen | None = None

    def __enter__(self) -> FakeCluster:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", PORT)) == 0:
                raise RuntimeError(f"port {PORT} is taken: the fake provider's nodes need it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "autoscaler.yaml"
        path.write_text(yaml.safe_dump(self.config))
        saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
        os.environ["RAY_AUTH_TOKEN_PATH"] = self.env["RAY_AUTH_TOKEN_PATH"]
        try:
            ensure_token()
        finally:
            os.environ.pop("RAY_AUTH_TOKEN_PATH")
            if saved is not None:
                os.environ["RAY_AUTH_TOKEN_PATH"] = saved
        self.head = subprocess.Popen(
            [ray_cli(), "start", "--head", f"--port={PORT}", "--num-cpus=2", "--block",
             "--include-dashboard=false", "--disable-usage-stats",
             f"--autoscaling-config={path}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.nodes("memory_node")  # returns once the autoscaler reports
        return self

    def __exit__(self, *exc: object) -> None:
        """Every process of this cluster goes at once: the head's (they carry its token
        path), the fake nodes' (their mark); a graceful stop takes half a minute."""
        token = self.env["RAY_AUTH_TOKEN_PATH"]
        for proc in _processes():
            env = _environ(proc)
            if NODE_MARK in env or env.get("RAY_AUTH_TOKEN_PATH") == token:
                proc.kill()
        if self.head is not None:
            self.head.wait(timeout=60)
        # `ray start` recorded the head as this machine's current cluster: it is gone now
        # (a plain `ray.init()` would look for it there).
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{PORT}"):
            current.unlink()

    def nodes(self, node_type: str, timeout_s: float = 60.0) -> int:
        """Active nodes of ``node_type``, as ``ray status`` reports them."""
        deadline = time.monotonic() + timeout_s
        while "Active:" not in (out := subprocess.run(
            [ray_cli(), "status", "--address", self.address], env=self.env,
            capture_output=True, text=True, timeout=60,
        ).stdout):  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"the autoscaler did not report within {timeout_s:g} s")
            time.sleep(1)
        active = out.split("Active:")[1].split("Pending:")[0]
        return sum(int(line.split()[0]) for line in active.splitlines() if node_type in line)


def kill_node(node_id: str) -> set[int]:
    """SIGKILL every process of one fake node (its raylet, workers and actors): the node is
    gone as a machine would be. Returns their pids."""
    victims = [p for p in _processes() if _environ(p).get(NODE_MARK) == node_id]
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    return {proc.pid for proc in victims}


def _processes() -> list[psutil.Process]:
    return list(psutil.process_iter())


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
