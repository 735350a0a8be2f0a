"""The one shared table of deliveries this worker holds."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from ..brokers.base import Delivery


class Run:
    """The task running one delivery, and whether the runtime asked to cancel it."""

    __slots__ = (
        "by_user",
        "cancel_requested",
        "cancel_taken",
        "claim",
        "job_id",
        "lost",
        "settling",
        "slot",
        "started",
        "task",
    )

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.started = False  # set by the task's first step
        self.cancel_requested = False
        self.cancel_taken = False  # its one cancellation was taken back (see catch_cancel)
        self.lost = False  # the lease is gone: settle nothing
        # The run has its outcome and is settling it: the settle's own broker call says
        # whether the lease is still ours, and there is no handler left to stop.
        self.settling = False
        # (key, owner) of the idempotency claim held while the handler runs; the lease
        # loop extends it with the delivery's lease.
        self.claim: tuple[str, str] | None = None
        # (key, owner) of the concurrency slot (a store lease) held while it runs: kept
        # by the same beat, and lost like a claim (limits.py).
        self.slot: tuple[str, str] | None = None
        # The job's id once decoded (the lease beat reads its cancel mark), and whether a
        # user cancelled it (`aioworkers.JobHandle.cancel`): acked as cancelled, not released.
        self.job_id: str | None = None
        self.by_user = False

    def cancel(self) -> None:
        if self.cancel_requested or self.settling:
            return  # once: a second cancel could interrupt the settle that follows
        # The flag tells the executor this cancellation is ours (release the job), not one
        # from outside; set before the task has started, it stops the handler from starting.
        self.cancel_requested = True
        # A task cancelled before its first step never enters its coroutine, so nothing
        # would settle the delivery or free its slot: until then the flag alone must do.
        if self.task is not None and self.started:
            self.task.cancel()

    def catch_cancel(self) -> Run:
        """``with run.catch_cancel():`` ends the block quietly on the runtime's own single
        cancellation of this run (`cancel`), taken back (`cancel_taken` then says so), and
        lets any other propagate: a cancel from outside, or a second one on top of ours
        (shutdown cancelling again, e.g. a handler still unwinding the first one, or a
        settle that cannot finish), which nothing may swallow. The run itself is the
        context manager: the hot path allocates nothing for it."""
        return self

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
            return False
        current = asyncio.current_task()
        if not self.cancel_requested or self.cancel_taken or current is None:
            return False
        if current.cancelling() > 1:
            return False
        self.cancel_taken = True
        current.uncancel()
        return True


class InFlight:
    """Deliveries from fetch until settled, each with its `Run`.

    The scheduler adds, settle removes, the lease loop reads a snapshot and cancels runs
    whose lease was lost; shutdown cancels what is left after the grace period.
    """

    def __init__(self) -> None:
        self._runs: dict[Delivery, Run] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, delivery: Delivery) -> Run:
        if not self._runs:
            self._empty.clear()
        run = self._runs[delivery] = Run()
        return run

    def remove(self, delivery: Delivery) -> None:
        runs = self._runs
        runs.pop(delivery, None)
        if not runs:
            self._empty.set()

    def snapshot(self) -> list[Delivery]:
        return list(self._runs)

    def claims(self) -> dict[tuple[str, str], Delivery]:
        """The idempotency claims held now, ``(key, owner) -> delivery``."""
        return {run.claim: d for d, run in self._runs.items() if run.claim is not None}

    def slots(self) -> dict[tuple[str, str], Delivery]:
        """The concurrency slots held now, ``(key, owner) -> delivery``."""
        return {run.slot: d for d, run in self._runs.items() if run.slot is not None}

    def lose(self, delivery: Delivery, claim: tuple[str, str] | None = None) -> bool:
        """The lease of ``delivery`` was reported lost: cancel its run and settle nothing.
        Returns whether that is news: False for a delivery settled meanwhile (a heartbeat
        crossing its ack), or settling (its settle asks the broker itself).

        With ``claim``, it is that idempotency claim (or concurrency slot) that was lost,
        and only a run that still holds it is cancelled: one that has just completed or
        released it is fine.
        """
        run = self._runs.get(delivery)
        if run is None or run.settling:
            return False
        if claim is not None and claim not in (run.claim, run.slot):
            return False
        run.lost = True
        run.cancel()
        return True

    def job_ids(self) -> dict[str, Delivery]:
        """The jobs running now, ``id -> delivery`` (whose cancel marks the beat reads)."""
        return {run.job_id: d for d, run in self._runs.items() if run.job_id is not None}

    def cancel_by_user(self, delivery: Delivery) -> bool:
        """A user cancelled the job of ``delivery``: stop its run (at the handler's next
        await); it is then acked as cancelled. False if it is settling or gone."""
        run = self._runs.get(delivery)
        if run is None or run.settling or run.cancel_requested or run.job_id is None:
            return False
        run.by_user = True
        run.cancel()
        return True

    def cancel_all(self) -> None:
        for run in self._runs.values():
            run.cancel()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks of the runs that have started (a task cancelled before its first step
        would never release its delivery; `Run.cancel` stops those before they start)."""
        return [run.task for run in self._runs.values() if run.task is not None and run.started]

    def forget(self) -> list[Delivery]:
        """Drop every delivery still held (left to its lease) and return them."""
        left = list(self._runs)
        self._runs.clear()
        self._empty.set()
        return left

    async def wait_empty(self) -> None:
        await self._empty.wait()
