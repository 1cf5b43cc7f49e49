"""The run's desk: the one actor through which the driver and its Ray Train workers talk.

The lead worker's records reach the run folder through it, the driver's request to stop
(SIGTERM, Ctrl-C) reaches the lead worker through it, and it keeps the run's ``Ledger``
(where a new attempt starts after a failure). It lives beside the driver, on the
driver's node, with no CPU of its own. These were three actors, each a Python process
(two of Ray's queues and the ledger): together about 6 CPU s of each run's start on the
project's 2-core machine (1.32, 3.56 and 1.05 CPU s measured), where one does the work.

Every call but ``take`` runs in the actor's default group, one at a time and in the
order each caller sent them; ``take``, the driver's wait for records, has a group of its
own, so a wait never holds up a worker's ``put``.
"""

from __future__ import annotations

import threading
from typing import Any

from memdist.config import RunConfig
from memdist.recovery import Attempt, Ledger

TAKE = "take"  # the concurrency group of ``Desk.take``


class Desk:
    """Records on their way to the driver, the stop request, and the ledger (a Ray actor)."""

    def __init__(self, resume: str | None) -> None:
        self._ledger = Ledger(resume)
        self._records: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        self._stop = False

    def put(self, record: dict[str, Any]) -> None:
        """A record for the driver (in the order each worker puts them)."""
        with self._arrived:
            self._records.append(record)
            self._arrived.notify_all()

    def take(self, timeout_s: float) -> list[dict[str, Any]]:
        """The records put since the last take, waiting up to ``timeout_s`` for one."""
        with self._arrived:
            self._arrived.wait_for(lambda: self._records, timeout_s)
            out, self._records = self._records, []
        return out

    def stop(self) -> None:
        """The driver asks the run to end after its current step."""
        self._stop = True

    def stopping(self) -> bool:
        return self._stop

    def join(self, rank: int) -> Attempt:
        return self._ledger.join(rank)

    def saved(self, uri: str, step: int) -> None:
        self._ledger.saved(uri, step)

    def failed(self, attempt: int, rank: int, text: str) -> None:
        self._ledger.failed(attempt, rank, text)

    def history(self) -> list[str]:
        return self._ledger.history()


class Outbox:
    """A worker's records on their way to the desk, in the order put: each is sent once
    the one before it has arrived, so a step does not wait for its own record's round
    trip (the next record does, a step later). ``flush`` waits for the last."""

    def __init__(self, desk: Any) -> None:
        self.desk = desk
        self._last: Any = None  # the put in flight

    def put(self, record: dict[str, Any]) -> None:
        self.flush()
        self._last = self.desk.put.remote(record)

    def flush(self) -> None:
        import ray

        if self._last is not None:
            last, self._last = self._last, None
            ray.get(last)


def start_desk(cfg: RunConfig, scheduling_strategy: Any) -> Any:
    """The run's desk, placed by ``scheduling_strategy`` (the driver's node)."""
    import ray

    actor = ray.remote(num_cpus=0, concurrency_groups={TAKE: 1})(Desk)  # type: ignore[call-overload]
    return actor.options(scheduling_strategy=scheduling_strategy).remote(
        cfg.train.checkpoint.resume
    )


def take(desk: Any, timeout_s: float) -> list[dict[str, Any]]:
    """``Desk.take`` on ``desk``, in its own group."""
    import ray

    return ray.get(desk.take.options(concurrency_group=TAKE).remote(timeout_s))
