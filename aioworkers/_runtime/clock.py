"""Time, injected: the runtime sleeps and reads the time only through a `Clock`, so tests
drive it (`aioworkers.testing.FakeClock`) instead of waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import anyio


class Clock(Protocol):
    """``sleep``, ``monotonic`` and ``time``, as the runtime uses them."""

    async def sleep(self, seconds: float) -> None: ...

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clock: `anyio.sleep`, `time.monotonic`, `time.time`."""

    __slots__ = ()

    # The functions themselves, not methods calling them: read on every job.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"

    async def sleep(self, seconds: float) -> None:
        # A deadline already past is "now", not an error (anyio refuses a negative delay).
        await anyio.sleep(max(0.0, seconds))


SYSTEM_CLOCK: Clock = SystemClock()


class Timeout:
    """A cancel scope that the clock ends: `start` (again, to move its end) arms it to be
    cancelled ``seconds`` from now, unless it has ended by then."""

    __slots__ = ("_clock", "_timer", "end", "scope")

    def __init__(self, clock: Clock, scope: anyio.CancelScope) -> None:
        self._clock = clock
        self.scope = scope
        self.end = float("inf")
        self._timer: asyncio.Task[None] | None = None

    def start(self, seconds: float) -> None:
        self.stop()
        self.end = self._clock.monotonic() + seconds
        self._timer = asyncio.get_running_loop().create_task(self._expire())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _expire(self) -> None:
        # From `end`, not from when this task first runs: the clock may move before that.
        # Past already (a zero timeout, or a loop too busy to run this task in time): at once.
        await self._clock.sleep(max(0.0, self.end - self._clock.monotonic()))
        self.scope.cancel()


@contextmanager
def move_on_after(clock: Clock, seconds: float) -> Iterator[anyio.CancelScope]:
    """`anyio.move_on_after` on ``clock``: the block inside is cancelled after ``seconds``
    of that clock (for the shutdown path's waits, not the hot path: it costs a task)."""
    with anyio.CancelScope() as scope:
        timeout = Timeout(clock, scope)
        timeout.start(seconds)
        try:
            yield scope
        finally:
            timeout.stop()
