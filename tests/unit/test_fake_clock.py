"""`FakeClock`: time moves only on `advance`, sleepers wake in deadline order, each seeing
its own deadline, and cancelled sleepers are forgotten. No test here sleeps in real time."""

from __future__ import annotations

import anyio
import pytest

from aioworkers.testing import FakeClock


async def test_time_stands_still_until_advanced() -> None:
    clock = FakeClock(monotonic=10.0, time=1_000_000.0)
    assert (clock.monotonic(), clock.time()) == (10.0, 1_000_000.0)
    await anyio.sleep(0.01)
    assert clock.monotonic() == 10.0
    await clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (12.5, 1_000_002.5)
    await clock.advance(0)
    assert clock.monotonic() == 12.5


def test_defaults_are_not_zero_and_need_no_event_loop() -> None:
    clock = FakeClock()
    assert clock.monotonic() == 1000.0
    assert clock.time() == 1_700_000_000.0
    assert repr(clock) == "<FakeClock monotonic=1000 sleepers=0>"


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
async def test_advance_refuses_negative_and_nan(seconds: float) -> None:
    with pytest.raises(ValueError, match="cannot advance"):
        await FakeClock().advance(seconds)


async def test_sleepers_wake_in_deadline_order_each_at_its_deadline() -> None:
    clock = FakeClock(monotonic=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    async with anyio.create_task_group() as tg:
        # Started in an order unlike their deadlines; "b" and "b2" tie and keep their order.
        for name, seconds in [("c", 3.0), ("b", 2.0), ("a", 1.0), ("b2", 2.0), ("late", 9.0)]:
            tg.start_soon(sleeper, name, seconds)
        await clock.wait_for_sleepers(5)
        assert clock.sleepers == [1.0, 2.0, 2.0, 3.0, 9.0]

        await clock.advance(0.5)
        assert woke == []
        await clock.advance(2.5)
        assert woke == [("a", 1.0), ("b", 2.0), ("b2", 2.0), ("c", 3.0)]
        assert clock.monotonic() == 3.0
        assert clock.sleepers == [9.0]
        await clock.advance(6.0)
    assert woke[-1] == ("late", 9.0)
    assert clock.sleepers == []


async def test_a_loop_that_sleeps_again_is_woken_again_within_one_advance() -> None:
    clock = FakeClock(monotonic=0.0)
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            await clock.sleep(1.0)
            ticks.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        await clock.wait_for_sleepers()
        await clock.advance(3.5)
        assert ticks == [1.0, 2.0, 3.0]
        assert clock.sleepers == [4.0]
        tg.cancel_scope.cancel()


async def test_a_woken_task_runs_on_before_the_next_sleeper_wakes() -> None:
    # The first sleeper starts work that the second must see done when it wakes.
    clock = FakeClock(monotonic=0.0)
    order: list[str] = []
    done = anyio.Event()

    async def first() -> None:
        await clock.sleep(1.0)
        order.append("first woke")
        done.set()

    async def helper() -> None:
        await done.wait()
        order.append("helper ran")

    async def second() -> None:
        await clock.sleep(2.0)
        order.append("second woke")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(helper)
        tg.start_soon(second)
        await clock.wait_for_sleepers(2)
        await clock.advance(2.0)
    assert order == ["first woke", "helper ran", "second woke"]


async def test_a_cancelled_sleeper_is_forgotten() -> None:
    clock = FakeClock(monotonic=0.0)
    woke: list[str] = []

    async def sleeper(name: str) -> None:
        await clock.sleep(1.0)
        woke.append(name)

    async with anyio.create_task_group() as outer:
        outer.start_soon(sleeper, "kept")
        async with anyio.create_task_group() as inner:
            inner.start_soon(sleeper, "cancelled")
            await clock.wait_for_sleepers(2)
            inner.cancel_scope.cancel()
        assert clock.sleepers == [1.0]
        await clock.advance(1.0)
    assert woke == ["kept"]


async def test_sleep_of_zero_or_less_only_yields() -> None:
    clock = FakeClock()
    await clock.sleep(0)
    await clock.sleep(-1)
    assert clock.sleepers == []


async def test_wait_for_sleepers_times_out_in_real_time() -> None:
    with pytest.raises(TimeoutError):
        await FakeClock().wait_for_sleepers(within=0.01)


async def test_works_as_an_anyio_timeout_source_for_code_under_test() -> None:
    # The shape a runtime loop takes: wait for an event or the clock, whichever comes first.
    clock = FakeClock(monotonic=0.0)
    event = anyio.Event()
    results: list[str] = []

    async def wait_or_time_out() -> None:
        async with anyio.create_task_group() as tg:

            async def timer() -> None:
                await clock.sleep(5.0)
                results.append("timed out")
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            await event.wait()
            results.append("event")
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_or_time_out)
        await clock.wait_for_sleepers()
        await clock.advance(4.9)
        assert results == []
        await clock.advance(0.1)
    assert results == ["timed out"]
