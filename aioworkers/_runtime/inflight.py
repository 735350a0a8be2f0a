"""The one shared table of deliveries this worker holds."""

from __future__ import annotations

import asyncio

import anyio

from ..brokers.base import Delivery


class InFlight:
    """Deliveries from fetch until settled, each with the cancel scope of its run.

    The scheduler adds, settle removes, the lease loop reads a snapshot and cancels runs
    whose lease was lost; shutdown cancels what is left after the grace period.
    """

    def __init__(self) -> None:
        self._scopes: dict[Delivery, anyio.CancelScope] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._scopes)

    def add(self, delivery: Delivery) -> anyio.CancelScope:
        # The scope exists before the run starts, so a cancel can land before it begins.
        scope = self._scopes[delivery] = anyio.CancelScope()
        self._empty.clear()
        return scope

    def remove(self, delivery: Delivery) -> None:
        self._scopes.pop(delivery, None)
        if not self._scopes:
            self._empty.set()

    def snapshot(self) -> list[Delivery]:
        return list(self._scopes)

    def cancel(self, delivery: Delivery) -> None:
        scope = self._scopes.get(delivery)
        if scope is not None:
            scope.cancel()

    def cancel_all(self) -> None:
        for scope in self._scopes.values():
            scope.cancel()

    async def wait_empty(self) -> None:
        await self._empty.wait()
