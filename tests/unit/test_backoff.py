"""`backoff` (the one retry helper for broker and store calls) and the clock-driven timeouts
of the shutdown path, on a fake clock."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from aioworkers import BrokerUnavailable
from aioworkers._runtime.backoff import Backoff, backoff
from aioworkers._runtime.clock import SYSTEM_CLOCK, move_on_after
from aioworkers._runtime.shutdown import Deadlines
from aioworkers.idempotency import StoreUnavailable
from aioworkers.testing import FakeClock


class Flaky:
    """Fails ``times`` times with ``error``, then returns how often it was called."""

    def __init__(self, times: int, error: BaseException) -> None:
        self.times = times
        self.error = error
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return self.calls


def test_pauses_double_from_first_to_cap_each_in_its_upper_half() -> None:
    low = Backoff(SYSTEM_CLOCK, first=0.1, cap=0.5, rand=lambda: 0.0)
    high = Backoff(SYSTEM_CLOCK, first=0.1, cap=0.5, rand=lambda: 1.0)
    assert [low.delay() for _ in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25])
    assert [high.delay() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    high.reset()
    assert high.delay() == pytest.approx(0.1)


@pytest.mark.parametrize("error", [BrokerUnavailable("down"), StoreUnavailable("down")])
async def test_a_transient_error_is_retried_on_the_clock(error: BaseException) -> None:
    clock = FakeClock()
    call = Flaky(3, error)
    task = asyncio.create_task(backoff(call, what="test", clock=clock))
    await clock.wait_for_sleepers(1)
    assert call.calls == 1
    await clock.advance(10)
    assert await task == 4
    # Three pauses of at most 0.05 + 0.1 + 0.2 seconds of the clock.
    assert clock.monotonic() - 1000 == 10


async def test_other_errors_are_not_retried() -> None:
    call = Flaky(1, ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        await backoff(call, what="test", clock=FakeClock())
    assert call.calls == 1


async def test_retry_on_narrows_what_is_retried() -> None:
    call = Flaky(1, StoreUnavailable("down"))
    with pytest.raises(StoreUnavailable):
        await backoff(call, what="test", clock=FakeClock(), retry_on=(BrokerUnavailable,))


async def test_the_last_error_is_raised_once_the_next_pause_would_pass_the_deadline() -> None:
    clock = FakeClock()
    call = Flaky(100, BrokerUnavailable("down"))
    task = asyncio.create_task(
        backoff(call, what="test", clock=clock, deadline=clock.monotonic() + 0.3)
    )
    for _ in range(10):
        await clock.advance(0.05)
    with pytest.raises(BrokerUnavailable):
        await task
    # Calls at 0, after a pause of 0.025-0.05 and another of 0.05-0.1; then the next pause
    # (0.1-0.2, then 0.2-0.4) ends past 0.3 s, at the latest after one more call.
    assert 3 <= call.calls <= 4


async def test_move_on_after_ends_the_block_when_the_clock_says() -> None:
    clock = FakeClock()
    ended = asyncio.Event()

    async def wait() -> None:
        with move_on_after(clock, 2.0) as scope:
            await asyncio.Event().wait()
        assert scope.cancelled_caught
        ended.set()

    task = asyncio.create_task(wait())
    await clock.wait_for_sleepers(1)
    await clock.advance(1.9)
    assert not ended.is_set()
    await clock.advance(0.1)
    await asyncio.wait_for(task, 1)


async def test_a_hurried_deadline_ends_open_windows_and_caps_later_ones() -> None:
    clock = FakeClock()
    deadlines = Deadlines(clock)
    ended: list[float] = []

    async def wait(seconds: float) -> None:
        with deadlines.window(seconds):
            await anyio.sleep_forever()
        ended.append(clock.monotonic() - 1000)

    first = asyncio.create_task(wait(30))
    await clock.wait_for_sleepers(1)
    await clock.advance(1)
    deadlines.hurry(2)  # every wait ends by 3 s
    await clock.advance(1)
    second = asyncio.create_task(wait(30))
    await clock.advance(5)
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert ended == [3, 3]
