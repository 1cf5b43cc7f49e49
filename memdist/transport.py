"""Transports: how a worker's requests reach memory shards and their replies come back.

One interface: ``submit(shard, method, *args) -> handle`` issues a request without
waiting; ``wait(handles, what) -> results`` collects replies in order, within a
bounded time, and raises ``ShardError`` naming the shard that failed or stayed
silent. Requests to all shards are issued before any is awaited, so shards work
concurrently.

- ``InProcessTransport``: shard servers in this process (one machine, tests).
- ``RayTransport``: shard servers in Ray actors; arguments and replies travel
  through Ray's object store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from memdist.errors import ShardError


class Transport(Protocol):
    shards: int

    def submit(self, shard: int, method: str, *args: Any) -> Any: ...

    def wait(self, handles: Sequence[Any], what: str) -> list[Any]: ...


class InProcessTransport:
    """Calls shard servers directly; replies are ready at once."""

    def __init__(self, servers: Sequence[Any]) -> None:
        self.servers = list(servers)
        self.shards = len(self.servers)

    def submit(self, shard: int, method: str, *args: Any) -> Any:
        try:
            return ("ok", getattr(self.servers[shard], method)(*args))
        except Exception as exc:  # kept and raised at wait(), like a remote failure
            return ("error", shard, exc)

    def wait(self, handles: Sequence[Any], what: str) -> list[Any]:
        out = []
        for h in handles:
            if h[0] == "error":
                _, shard, exc = h
                raise ShardError(f"memory shard {shard} failed during {what}: {exc}") from exc
            out.append(h[1])
        return out


class RayTransport:
    """Shard servers in Ray actors; each wait is bounded by ``timeout_s``."""

    def __init__(self, actors: Sequence[Any], timeout_s: float = 60.0) -> None:
        self.actors = list(actors)
        self.shards = len(self.actors)
        self.timeout_s = timeout_s

    def submit(self, shard: int, method: str, *args: Any) -> Any:
        return (shard, getattr(self.actors[shard], method).remote(*args))

    def wait(self, handles: Sequence[Any], what: str) -> list[Any]:
        import ray

        refs = [ref for _, ref in handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        ready_set = set(ready)
        out = []
        for shard, ref in handles:
            if ref not in ready_set:
                raise ShardError(
                    f"memory shard {shard} did not answer {what} within {self.timeout_s:g} s "
                    "(shard timeout); it may be dead or overloaded"
                )
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:
                raise ShardError(f"memory shard {shard} died during {what}: {exc}") from exc
            except ray.exceptions.RayTaskError as exc:
                raise ShardError(f"memory shard {shard} failed during {what}: {exc}") from exc
        return out
