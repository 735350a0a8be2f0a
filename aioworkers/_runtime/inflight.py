"""The one shared table of deliveries this worker holds."""

from __future__ import annotations

import asyncio

from ..brokers.base import Delivery


class Run:
    """The task running one delivery, and whether the runtime asked to cancel it."""

    __slots__ = ("cancel_requested", "claim", "lost", "started", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.started = False  # set by the task's first step
        self.cancel_requested = False
        self.lost = False  # the lease is gone: settle nothing
        # (key, owner) of the idempotency claim held while the handler runs; the lease
        # loop extends it with the delivery's lease.
        self.claim: tuple[str, str] | None = None

    def cancel(self) -> None:
        if self.cancel_requested:
            return  # once: a second cancel could interrupt the settle that follows
        # The flag tells the executor this cancellation is ours (release the job), not one
        # from outside; set before the task has started, it stops the handler from starting.
        self.cancel_requested = True
        # A task cancelled before its first step never enters its coroutine, so nothing
        # would settle the delivery or free its slot: until then the flag alone must do.
        if self.task is not None and self.started:
            self.task.cancel()


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
        run = self._runs[delivery] = Run()
        self._empty.clear()
        return run

    def remove(self, delivery: Delivery) -> None:
        self._runs.pop(delivery, None)
        if not self._runs:
            self._empty.set()

    def snapshot(self) -> list[Delivery]:
        return list(self._runs)

    def claims(self) -> dict[tuple[str, str], Delivery]:
        """The idempotency claims held now, ``(key, owner) -> delivery``."""
        return {run.claim: d for d, run in self._runs.items() if run.claim is not None}

    def lose(self, delivery: Delivery, claim: tuple[str, str] | None = None) -> None:
        """The lease of ``delivery`` was lost: cancel its run and settle nothing.

        With ``claim``, it is that idempotency claim that was lost, and only a run that
        still holds it is cancelled: one that has just completed or released it is fine.
        """
        run = self._runs.get(delivery)
        if run is not None and (claim is None or run.claim == claim):
            run.lost = True
            run.cancel()

    def cancel_all(self) -> None:
        for run in self._runs.values():
            run.cancel()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [run.task for run in self._runs.values() if run.task is not None]

    async def wait_empty(self) -> None:
        await self._empty.wait()
