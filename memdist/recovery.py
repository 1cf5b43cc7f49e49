"""Recovering a run from failures: what each attempt of the Ray Train workers starts from.

Ray does the restarting: Ray Train's ``FailureConfig`` starts a new group of workers when
one dies or raises, and Ray restarts a shard actor that died (``max_restarts``), on another
node when its node is gone. What Ray cannot know is where the run stands, so a ``Ledger``
(in the run's desk, ``memdist.desk``, beside the driver) keeps it: the last complete
checkpoint of this run, and why each attempt ended. A new attempt's workers ask the ledger
where to start; all of them get the same checkpoint, which also sends every shard back to it
(``Trainer._restore`` loads the tables), so workers and shards hold the same step again. The
steps after the checkpoint are trained again: the final model is that of a run resumed from
there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memdist.config import RunConfig
from memdist.errors import WorkerError


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one worker of attempt ``number`` (0: the first) starts from."""

    number: int
    resume: str | None  # the checkpoint to go back to (or the run's own --resume)
    step: int | None  # its step, when this run saved it
    cause: str | None  # why the previous attempt ended


class Ledger:
    """Where the run stands, for the attempts that follow a failure."""

    def __init__(self, resume: str | None) -> None:
        self.resume = resume
        self.step: int | None = None
        self.joins: dict[int, int] = {}  # rank -> attempts it joined
        self.seen: list[dict[str, list[int]]] = []  # per attempt: error -> workers that saw it

    def join(self, rank: int) -> Attempt:
        number = self.joins.get(rank, 0)
        self.joins[rank] = number + 1
        while len(self.seen) < number:  # the attempt before ended without a word
            self.seen.append({})
        cause = self.history()[number - 1] if number else None
        return Attempt(number, self.resume, self.step, cause)

    def saved(self, uri: str, step: int) -> None:
        """A checkpoint of this run is complete (its manifest written)."""
        if self.step is None or step > self.step:
            self.resume, self.step = uri, step

    def failed(self, attempt: int, rank: int, text: str) -> None:
        """Why attempt ``attempt`` ended, as worker ``rank`` saw it."""
        while len(self.seen) <= attempt:
            self.seen.append({})
        self.seen[attempt].setdefault(text, []).append(rank)

    def history(self) -> list[str]:
        """Why each attempt so far ended; a killed process reports nothing itself."""
        return [
            "; ".join(f"worker{'s' if len(r) > 1 else ''} {', '.join(map(str, sorted(r)))}: {t}"
                      for t, r in seen.items()) or "a worker or its node died"
            for seen in self.seen
        ]  # fmt: skip


def attempt_config(cfg: RunConfig, attempt: Attempt) -> RunConfig:
    """The config attempt ``attempt`` trains with: after a failure, resuming from the
    ledger's checkpoint; with none to go back to, the run fails naming what died."""
    if attempt.number == 0:
        return cfg
    if attempt.resume is None:
        raise WorkerError(
            f"{attempt.cause}; there is no checkpoint to go back to (the first is saved at "
            f"step {cfg.train.checkpoint.every}, train.checkpoint.every), so the run cannot "
            "recover"
        )
    ckpt = dataclasses.replace(cfg.train.checkpoint, resume=attempt.resume)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint=ckpt))


def describe(exc: BaseException) -> str:
    """One line naming what failed (a shard's or a worker's error, without Ray's traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class RecoveryClock:
    """The driver's view of recoveries: a ``recovery`` record (sent by the new attempt's
    lead) is held until the attempt's first step, then logged with how long the run
    stood still (from the last step before the failure) and how many steps it redoes."""

    def __init__(self) -> None:
        import time

        self._now = time.monotonic
        self.last_step, self.last_time = 0, self._now()
        self.pending: dict[str, Any] | None = None

    def see(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The records to log for ``record``, in order."""
        kind = record["kind"]
        if kind == "recovery":
            self.pending = record
            return []
        out = [record]
        if kind == "tick":
            if self.pending is not None:
                done, self.pending = self.pending, None
                redone = self.last_step - (done["from_step"] or 0)
                done.update(failed_after_step=self.last_step, steps_redone=redone,
                            seconds=round(self._now() - self.last_time, 3))  # fmt: skip
                out.insert(0, done)
            self.last_step, self.last_time = record["step"], self._now()
        return out
