"""The scheduler loop (`aioworkers._runtime.cron.Periodic`) on a FakeClock and a memory
store: several loops share a store as several workers share one, and time moves only when
the test moves it, so a day of slots takes milliseconds."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import pytest

from aioworkers._runtime.cron import Periodic
from aioworkers.periodic import RUN, SCHEDULE_HEADER, SLOT_HEADER, Schedule
from aioworkers.store.base import JobFinish
from aioworkers.store.memory import MemoryStore
from aioworkers.task import Call
from aioworkers.testing import FakeClock

T0 = 1_700_000_000  # FakeClock's default wall time: a multiple of 10 seconds
PARIS = ZoneInfo("Europe/Paris")


class Ledger:
    """Stands in for the app's enqueue: records every call it gets."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def enqueue(self, call: Call) -> str:
        self.calls.append(call)
        return f"job-{len(self.calls)}"

    @property
    def slots(self) -> list[int]:
        return [int((c.headers or {})[SLOT_HEADER]) for c in self.calls]


@asynccontextmanager
async def running(clock: FakeClock, *loops: Periodic) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for loop in loops:
            tg.start_soon(loop.run)
        await clock.wait_for_sleepers(sum(len(loop.schedules) for loop in loops))
        yield
        tg.cancel_scope.cancel()


def loop(schedule: Schedule, store: MemoryStore, ledger: Ledger, clock: FakeClock) -> Periodic:
    return Periodic([schedule], store, ledger.enqueue, clock)


async def test_two_workers_fire_each_slot_exactly_once() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tick = Schedule(name="tick", task="tick", every=10, args=(1,))
    a, b = Ledger(), Ledger()
    async with running(clock, loop(tick, store, a, clock), loop(tick, store, b, clock)):
        await clock.advance(100)
    fired = sorted(a.slots + b.slots)
    assert fired == [(T0 + 10 * i) * 1000 for i in range(1, 11)]
    call = (a.calls + b.calls)[0]
    assert (call.task, call.args, (call.headers or {})[SCHEDULE_HEADER]) == ("tick", (1,), "tick")


async def test_a_worker_gone_does_not_stop_the_others() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tick = Schedule(name="tick", task="tick", every=10)
    a, b = Ledger(), Ledger()
    async with running(clock, loop(tick, store, b, clock)):
        async with running(clock, loop(tick, store, a, clock)):
            await clock.advance(30)
        await clock.advance(30)  # a is gone: b fires alone
    assert sorted(a.slots + b.slots) == [(T0 + 10 * i) * 1000 for i in range(1, 7)]


async def down_and_back(catchup: float, down: float, every: float = 10) -> tuple[Ledger, Periodic]:
    """A worker fires the first slot, all workers are down for ``down`` seconds, then one
    with ``catchup`` starts."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    first = Ledger()
    async with running(clock, loop(Schedule(name="t", task="t", every=every), store, first, clock)):
        await clock.advance(every)
    assert first.slots == [(T0 + every) * 1000]
    await clock.advance(down)
    back = Ledger()
    schedule = Schedule(name="t", task="t", every=every, catchup=catchup)
    again = loop(schedule, store, back, clock)
    async with running(clock, again):
        pass
    return back, again


async def test_catchup_fires_the_missed_slots_within_it_oldest_first() -> None:
    back, again = await down_and_back(catchup=25, down=50)
    # Now T0+60; (T0+35, T0+60] fires; T0+20 and T0+30 are older: missed.
    assert back.slots == [(T0 + s) * 1000 for s in (40, 50, 60)]
    assert again.counts[("t", "missed")] == 2
    assert again.counts[("t", "fired")] == 3


async def test_no_catchup_fires_nothing_missed_and_counts_it() -> None:
    back, again = await down_and_back(catchup=0, down=50)
    assert back.slots == []
    assert again.counts[("t", "missed")] == 5


async def test_catchup_is_capped_at_the_newest_slots() -> None:
    back, again = await down_and_back(catchup=1000, down=500, every=1)
    assert len(back.slots) == 100
    assert back.slots == [(T0 + s) * 1000 for s in range(402, 502)]
    assert again.counts[("t", "missed")] == 400


async def test_catchup_does_not_fire_what_a_live_worker_fired() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tick = Schedule(name="t", task="t", every=10, catchup=600)
    a, b = Ledger(), Ledger()
    async with running(clock, loop(tick, store, a, clock)):
        await clock.advance(50)
        async with running(clock, loop(tick, store, b, clock)):
            await clock.advance(20)
    assert b.slots.count((T0 + 70) * 1000) + a.slots.count((T0 + 70) * 1000) == 1
    assert sorted(a.slots + b.slots) == [(T0 + 10 * i) * 1000 for i in range(1, 8)]


async def fire_over(cron: str, start: datetime, hours: float) -> list[datetime]:
    clock = FakeClock(time=start.timestamp())
    ledger = Ledger()
    schedule = Schedule(name="c", task="c", cron=cron, tz="Europe/Paris")
    async with running(clock, loop(schedule, MemoryStore(clock=clock), ledger, clock)):
        await clock.advance(hours * 3600)
    return [datetime.fromtimestamp(s / 1000, PARIS) for s in ledger.slots]


async def test_cron_over_spring_forward_skips_the_missing_local_time() -> None:
    fired = await fire_over("30 * * * *", datetime(2026, 3, 29, 0, 0, tzinfo=PARIS), 5)
    # 02:30 does not exist on 2026-03-29 in Paris (02:00 -> 03:00).
    assert [(t.hour, t.minute) for t in fired] == [(0, 30), (1, 30), (3, 30), (4, 30), (5, 30)]
    assert all(b.timestamp() - a.timestamp() <= 3600 for a, b in itertools.pairwise(fired))


async def test_cron_over_fall_back_fires_the_repeated_local_time_once() -> None:
    fired = await fire_over("30 * * * *", datetime(2026, 10, 25, 0, 0, tzinfo=PARIS), 5)
    # 02:30 happens twice on 2026-10-25 (03:00 -> 02:00): the first one fires.
    local = [(t.hour, t.minute) for t in fired]
    assert local == [(0, 30), (1, 30), (2, 30), (3, 30)]
    assert fired[2].utcoffset() != fired[3].utcoffset()


async def test_daily_cron_across_both_transitions() -> None:
    fired = await fire_over("30 2 * * *", datetime(2026, 3, 28, 12, 0, tzinfo=PARIS), 48)
    assert [t.day for t in fired] == [30]  # none on the 29th: 02:30 did not exist
    fired = await fire_over("30 2 * * *", datetime(2026, 10, 24, 12, 0, tzinfo=PARIS), 48)
    assert [(t.day, t.hour) for t in fired] == [(25, 2), (26, 2)]


async def test_overlap_skip_waits_for_the_run_to_end() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tick = Schedule(name="s", task="s", every=10, overlap="skip")
    ledger = Ledger()
    periodic = loop(tick, store, ledger, clock)
    async with running(clock, periodic):
        await clock.advance(30)  # fired at 10; 20 and 30 skipped: its run is queued
        assert ledger.slots == [(T0 + 10) * 1000]
        end = JobFinish(id=RUN + "s", status="succeeded", ttl=60, finished_at=clock.time())
        await store.finish_jobs([end])
        await clock.advance(10)
    assert ledger.slots == [(T0 + 10) * 1000, (T0 + 40) * 1000]
    assert periodic.counts[("s", "skipped")] == 2


async def test_two_definitions_under_one_name_log_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    ours = Schedule(name="x", task="x", every=10)
    theirs = Schedule(name="x", task="x", every=20)
    a, b = Ledger(), Ledger()
    with caplog.at_level(logging.INFO, logger="aioworkers.periodic"):
        async with running(clock, loop(ours, store, a, clock), loop(theirs, store, b, clock)):
            await clock.advance(60)
    # No slot fires twice: the claim is per (name, slot) whatever computed it.
    fired = a.slots + b.slots
    assert len(fired) == len(set(fired))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "registered differently" in errors[0].getMessage()


async def test_a_changed_expression_takes_effect_at_the_next_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    old, new = Ledger(), Ledger()
    async with running(clock, loop(Schedule(name="x", task="x", every=10), store, old, clock)):
        await clock.advance(10)
    with caplog.at_level(logging.INFO, logger="aioworkers.periodic"):
        async with running(clock, loop(Schedule(name="x", task="x", every=15), store, new, clock)):
            await clock.advance(30)
    # Slots of every=15 are the multiples of 15 s since the epoch.
    assert new.slots == [(T0 // 15 + k) * 15 * 1000 for k in (2, 3)]
    assert any("changed" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_slot_that_fails_to_enqueue_does_not_stop_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    ledger = Ledger()
    failures = [ValueError("job 'x' is 2000000 bytes, over max_message_size")]

    async def enqueue(call: Call) -> str:
        if failures:
            raise failures.pop()
        return await ledger.enqueue(call)

    periodic = Periodic([Schedule(name="x", task="x", every=10)], store, enqueue, clock)
    async with running(clock, periodic):
        await clock.advance(20)
    assert ledger.slots == [(T0 + 20) * 1000]
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
