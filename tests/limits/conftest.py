"""Fixtures for the flow-control tests: an app on the memory broker and a memory store
that run on one `FakeClock` with the worker (so leases, tokens and throttles are exact)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import pytest

from aioworkers import App
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.store import MemoryStore
from aioworkers.testing import FakeClock

VISIBILITY = 3.0


class CountingStore(MemoryStore):
    """A memory store that counts the calls the limits and unique keys make."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.calls: Counter[str] = Counter()

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        self.calls["acquire_lease"] += 1
        return await super().acquire_lease(key, owner, limit=limit, lease=lease)

    async def release_lease(self, key: str, owner: str) -> bool:
        self.calls["release_lease"] += 1
        return await super().release_lease(key, owner)

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float:
        self.calls["take"] += 1
        return await super().take(key, rate=rate, per=per, now=now)

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        self.calls["cancelled"] += 1
        return await super().cancelled(job_ids)

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None:
        self.calls["hold_unique"] += 1
        return await super().hold_unique(key, job_id, ttl=ttl)

    async def free_unique(self, key: str, job_id: str) -> bool:
        self.calls["free_unique"] += 1
        return await super().free_unique(key, job_id)

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        self.calls["extend_leases"] += 1
        return await super().extend_leases(held, lease=lease)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> CountingStore:
    return CountingStore(clock)


@pytest.fixture
def app(clock: FakeClock, store: CountingStore) -> App:
    broker = MemoryBroker(visibility_timeout=VISIBILITY, clock=clock)
    return App(broker, store=store, visibility_timeout=VISIBILITY)
