"""The store conformance kit itself: it fails stores that break the rules it is about."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from aioworkers.store import JobFinish, JobStatus, MemoryStore
from aioworkers.store.memory import finished
from aioworkers.testing._store_processes import most_at_once
from aioworkers.testing.store_conformance import STORE_CHECKS, StoreCase, StoreConformance


class _OverTheLimit(MemoryStore):
    """Grants one lease more than the limit."""

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        return await super().acquire_lease(key, owner, limit=limit + 1, lease=lease)


class _LastFinishWins(MemoryStore):
    """Ends a job again when it has already ended."""

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]:
        before: list[JobStatus | None] = []
        for f in finishes:
            old = await self.get_job(f.id)
            before.append(None if old is None else old.status)
            await self.put_job(finished(old, f), ttl=f.ttl)
        return before


class _SlotNotAtomic(MemoryStore):
    """Reads, then writes after an await (a round trip): two claims can both win."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed: set[tuple[str, str]] = set()

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool:
        taken = (name, slot) in self.claimed
        await asyncio.sleep(0)
        if taken:
            return False
        self.claimed.add((name, slot))
        return True


class _NeverWakes(MemoryStore):
    """A wait that only looks again every ten seconds."""

    async def wait_job(self, job_id: str, *, timeout: float | None) -> object:  # type: ignore[override]  # noqa: ASYNC109
        while True:
            record = await self.get_job(job_id)
            if record is None or record.final:
                return record
            await asyncio.sleep(10)


def _suite(store: MemoryStore) -> StoreConformance:
    class Suite(StoreConformance):
        def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
            @asynccontextmanager
            async def case() -> AsyncIterator[StoreCase]:
                yield StoreCase(store, timeout=5)  # type: ignore[arg-type]

            return case()

    return Suite()


def _check(name: str) -> object:
    (found,) = [c for c in STORE_CHECKS if c.name == name]
    return found


@pytest.mark.parametrize(
    ("store", "check"),
    [
        (_OverTheLimit(), "leases_up_to_the_limit"),
        (_OverTheLimit(), "racing_acquires_never_pass_the_limit"),
        (_LastFinishWins(), "a_finish_ends_a_job_once"),
        (_SlotNotAtomic(), "racing_slot_claims_have_one_winner"),
        (_NeverWakes(), "a_wait_wakes_every_waiter_when_the_job_ends"),
    ],
    ids=["over-limit", "over-limit-racing", "last-finish-wins", "slot-not-atomic", "no-wake"],
)
def test_the_kit_fails_a_store_that_breaks_its_rule(store: MemoryStore, check: str) -> None:
    suite = _suite(store)
    with pytest.raises((AssertionError, TimeoutError)):
        suite.run_check(_check(check))  # type: ignore[arg-type]
    # The same check passes on the reference store.
    _suite(MemoryStore()).run_check(_check(check))  # type: ignore[arg-type]


def test_the_most_spans_at_once() -> None:
    assert most_at_once([]) == 0
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1  # touching: one after the other
    assert most_at_once([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3
