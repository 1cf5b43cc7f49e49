"""``memdist cluster submit|logs|stop``: runs as Ray jobs, through Ray's job API.

``submit TARGET -- memdist train ...`` sends the command to the cluster's job API and
streams its logs here until it ends; the exit status is the job's (0 when it
succeeded). TARGET is the job API's address (``http://127.0.0.1:8265``) or a cluster
file: then ``ray dashboard CONFIG`` forwards the head's job API (which listens on the
head's loopback only) to a local port over SSH for as long as the command runs.

The job runs the memdist installed on the cluster, or with ``--working-dir`` the given
folder, uploaded by Ray (its ``runtime_env``). Requests carry the Ray token of this
machine (``~/.ray/auth_token``), as Ray's job client does when token mode is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from memdist.cluster.launcher import config_path, is_address, ray_cli
from memdist.errors import ConfigError, WorkerError

EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
JOB_PORT = 8265  # where Ray's job API listens on the head


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def job_api(target: str, *, wait_s: float = 60.0) -> Iterator[str]:
    """The job API's URL for TARGET; for a cluster file, a tunnel open while in use."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if is_address(target):
        yield target if "://" in target else f"http://{target}"
        return
    port = _free_port()
    tunnel = subprocess.Popen(
        [ray_cli(), "dashboard", str(config_path(target)), "--port", str(port),
         "--remote-port", str(JOB_PORT)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + wait_s
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if tunnel.poll() is not None or time.monotonic() > deadline:
                raise WorkerError(
                    f"could not reach the job API of the cluster in {target!r} through "
                    f"`ray dashboard` (exit {tunnel.poll()}, waited {wait_s:g} s): is it up?"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=30)


def _client(url: str, wait_s: float = 60.0) -> Any:
    """A job client for ``url``, waiting up to ``wait_s`` for a head that is still starting
    (its job API comes up some seconds after the cluster itself)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return JobSubmissionClient(url)
        except AuthenticationError as exc:
            raise WorkerError(
                f"the Ray job API at {url} refused this machine's token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token must hold the cluster's token)"
            ) from exc
        except (ConnectionError, RuntimeError) as exc:
            if not isinstance(exc, ConnectionError) or time.monotonic() > deadline:
                raise WorkerError(
                    f"no Ray job API answers at {url} (waited {wait_s:g} s): {exc}"
                ) from exc
            time.sleep(1)


def follow(client: Any, job_id: str, out: Any = None) -> int:
    """Stream job ``job_id``'s logs to ``out`` until it ends; its exit status (the
    command's own exit code when Ray reports it; 1 for another failure, 130 stopped)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    while (state := str(client.get_job_status(job_id)).split(".")[-1]) not in EXIT:
        time.sleep(0.5)  # the log stream can end a moment before the status does
    code = client.get_job_info(job_id).driver_exit_code
    return EXIT[state] if state != "FAILED" or not code else int(code)


def submit(target: str, command: list[str], *, working_dir: str | None = None,
           wait: bool = True) -> int:  # fmt: skip
    """Run ``command`` (e.g. ``memdist train ...``) as a job; its exit status when waited for."""
    if not command:
        raise ConfigError("memdist cluster submit needs a command after --, e.g. -- memdist train")
    runtime_env = {"working_dir": working_dir} if working_dir else None
    with job_api(target) as url:
        client = _client(url)
        job_id = _submit(client, shlex.join(command), runtime_env)
        print(f"memdist: submitted {job_id} to {url}", file=sys.stderr, flush=True)
        return follow(client, job_id) if wait else 0


def _submit(client: Any, entrypoint: str, runtime_env: dict | None, wait_s: float = 180.0) -> str:
    """Submit, waiting while the head's job agent is still starting (Ray answers 5xx then;
    on a busy head that can take a minute or more)."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))
        except RuntimeError as exc:
            if "status code 5" not in str(exc) or time.monotonic() > deadline:
                raise WorkerError(f"the cluster refused the job: {exc}") from exc
            if not told:
                print("memdist: waiting for the head's job agent to start", file=sys.stderr)
                told = True
            time.sleep(1)


def logs(target: str, job_id: str, *, follow_logs: bool = False) -> int:
    with job_api(target) as url:
        client = _client(url)
        if follow_logs:
            return follow(client, job_id)
        sys.stdout.write(client.get_job_logs(job_id))
        return 0


def stop(target: str, job_id: str) -> int:
    with job_api(target) as url:
        stopped = _client(url).stop_job(job_id)
        print(f"memdist: {'stopped' if stopped else 'not running'}: {job_id}", file=sys.stderr)
        return 0
