"""``memdist cluster up|down|status``: Ray's cluster launcher over memdist's cluster files.

A CONFIG is a cluster file (YAML) or the name of one shipped in ``memdist/cluster/configs``
(``aws``, ``gcp``, ``local-fake``). ``up`` and ``down`` run Ray's own ``ray up`` / ``ray
down``; ``status`` runs ``ray status`` on the head (through the launcher for a CONFIG,
directly for an ADDRESS such as ``127.0.0.1:6379``).

Token authentication stays on: before ``up``, a token is made in ``~/.ray/auth_token``
when there is none (Ray's own generator); the cluster files copy it to every node, and
``memdist cluster submit`` presents it. Its value is never printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from memdist.cluster.actors import SHARD_RESOURCE
from memdist.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(config: str) -> Path:
    """The cluster file ``config`` names: a path, or a shipped config's name."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{config}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"cluster config {config!r} is neither a file nor a shipped config "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def is_address(target: str) -> bool:
    """Whether ``target`` names a running cluster (``host:port``, or a URL such as the job
    API's ``http://host:8265``), not a cluster file."""
    if "://" in target:
        return True
    host, _, port = target.rpartition(":")
    return bool(host) and port.isdigit() and not Path(target).exists()


def check_config(path: Path) -> dict:
    """Load a cluster file and check it with Ray's own validation (the launcher's
    schema, after Ray fills the provider's defaults), plus memdist's one rule: some
    node type advertises the ``memdist_shard`` resource. Raises ConfigError naming
    the file and the problem."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster config {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict) or "provider" not in config:
        raise ConfigError(f"cluster config {str(path)!r} has no provider section")
    try:
        prepared = (
            config
            if config["provider"].get("type") == "fake_multinode"
            else (prepare_config(dict(config)))
        )  # the fake provider has no defaults file to fill from: write it whole
        validate_config(prepared)
    except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"cluster config {str(path)!r} fails Ray's validation: {first}") from exc
    memory = [n for n, t in config.get("available_node_types", {}).items()
              if SHARD_RESOURCE in (t.get("resources") or {})]  # fmt: skip
    if not memory:
        raise ConfigError(
            f"cluster config {str(path)!r} has no node type with the {SHARD_RESOURCE!r} "
            "resource: shards would share the workers' nodes (add it to a memory node type)"
        )
    return config


def ensure_token() -> Path:
    """Make sure this machine holds a Ray token (``~/.ray/auth_token`` unless
    ``RAY_AUTH_TOKEN_PATH`` says otherwise); returns its path, never its value."""
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_TOKEN" not in os.environ and not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the owner's only
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
    return path


def ray_cli() -> str:
    """The ``ray`` command of this Python environment."""
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _run(args: list[str]) -> int:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return subprocess.run([ray_cli(), *args], env=env).returncode


def up(config: str, *, yes: bool = True) -> int:
    path = config_path(config)
    check_config(path)
    ensure_token()
    return _run(["up", str(path), *(["-y"] if yes else [])])


def down(config: str, *, yes: bool = True) -> int:
    path = config_path(config)
    return _run(["down", str(path), *(["-y"] if yes else [])])


def status(target: str) -> int:
    if is_address(target):
        return _run(["status", "--address", target.split("://")[-1]])
    return _run(["exec", str(config_path(target)), "RAY_AUTH_MODE=token ray status"])
