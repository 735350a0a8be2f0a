"""The memory store's own: every table stays bounded however many entries lapse, the old
bare-callable clock still works, and a wait retries a store error until its timeout."""

from __future__ import annotations

import pytest

from aioworkers.store import JobFinish, JobRecord, MemoryStore, StoreUnavailable
from aioworkers.testing import FakeClock


async def test_every_table_stays_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for round_ in range(6):
        for n in range(1000):
            name = f"{round_}:{n}"
            await store.put_job(JobRecord(name, "t", "q", "queued"), ttl=10)
            await store.mark_cancelled(f"c{name}", ttl=10)
            await store.claim_slot("s", name, ttl=10)
            await store.acquire_lease(f"l{name}", "a", limit=1, lease=10)
            await store.take(f"b{name}", rate=1, per=10)
        await clock.advance(10)  # every entry of this round has lapsed, never read again
    tables = (store._jobs, store._marks, store._leases, store._buckets)
    assert all(len(table) <= 2 * 2048 for table in tables), [len(t) for t in tables]


async def test_a_bare_monotonic_callable_is_still_a_clock() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    assert await store.claim("k", "a", lease=10) == "claimed"
    assert await store.claim_slot("s", "1", ttl=10) is True
    now[0] += 10
    assert await store.claim("k", "b", lease=10) == "claimed"
    assert await store.claim_slot("s", "1", ttl=10) is True


class _Flaky(MemoryStore):
    """``failures`` reads of a record fail before the store answers again."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def get_job(self, job_id: str) -> JobRecord | None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("injected")
        return await super().get_job(job_id)


async def test_a_wait_retries_a_store_that_is_unavailable_for_a_while() -> None:
    store = _Flaky(failures=3)
    await store.put_job(JobRecord("j", "t", "q", "succeeded"), ttl=60)
    record = await store.wait_job("j", timeout=10)
    assert record is not None
    assert record.status == "succeeded"
    assert store.failures == 0


async def test_a_wait_on_a_store_that_stays_away_ends_at_its_timeout() -> None:
    store = _Flaky(failures=10**6)
    with pytest.raises(TimeoutError) as info:
        await store.wait_job("j", timeout=0.3)
    assert isinstance(info.value.__cause__, StoreUnavailable)


async def test_a_wait_sees_an_end_between_two_failed_reads() -> None:
    store = _Flaky(failures=2)
    await store.put_job(JobRecord("j", "t", "q", "running"), ttl=60)
    await store.finish_jobs([JobFinish("j", "cancelled", ttl=60, finished_at=1.0)])
    record = await store.wait_job("j", timeout=10)
    assert record is not None
    assert record.status == "cancelled"
