"""`FakeClock`: a `Clock` whose time moves only when a test advances it."""

from __future__ import annotations

import heapq
import itertools
import math

import anyio
import anyio.lowlevel

# Checkpoints granted after each wake-up, so that what a woken task sets off (an event it
# sets, a task it starts, the next sleep it registers) runs before time moves on.
_SETTLE_CHECKPOINTS = 20


class _Sleeper:
    __slots__ = ("cancelled", "deadline", "resumed", "seq", "woken")

    def __init__(self, deadline: float, seq: int) -> None:
        self.deadline = deadline
        self.seq = seq
        self.woken = anyio.Event()
        self.resumed = False
        self.cancelled = False

    def __lt__(self, other: _Sleeper) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class FakeClock:
    """A ``Clock`` (``sleep``, ``monotonic``, ``time``) for tests: nothing sleeps in real time.

    ``await clock.advance(seconds)`` moves time forward and wakes every sleeper due by then,
    earliest first (ties in the order they went to sleep); each sees ``monotonic()`` equal to
    its own deadline and runs up to its next await before the next one wakes, so a loop that
    sleeps again within the advanced span is woken again in the same call.
    ``await clock.wait_for_sleepers(n)`` waits (in real time) until ``n`` tasks sleep on it:
    the way to know that the code under test has reached its next timer.

    ``monotonic`` starts at 1000 (not 0, so that no "unset" check mistakes it), ``time`` at a
    fixed epoch second unless given; both move together.
    """

    def __init__(self, *, monotonic: float = 1000.0, time: float = 1_700_000_000.0) -> None:
        self._now = monotonic
        self._wall_offset = time - monotonic
        self._heap: list[_Sleeper] = []
        self._seq = itertools.count()
        # Created on first use: an anyio Event needs a running event loop.
        self._changed: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<FakeClock monotonic={self._now:g} sleepers={len(self.sleepers)}>"

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    @property
    def sleepers(self) -> list[float]:
        """The deadlines of the tasks asleep on this clock, earliest first."""
        return sorted(s.deadline for s in self._heap if not s.cancelled)

    async def sleep(self, seconds: float) -> None:
        """Sleep until the clock has advanced by ``seconds``; ``seconds <= 0`` only yields."""
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        if math.isnan(seconds):
            raise ValueError("cannot sleep for NaN seconds")
        sleeper = _Sleeper(self._now + seconds, next(self._seq))
        heapq.heappush(self._heap, sleeper)
        self._notify()
        try:
            await sleeper.woken.wait()
        finally:
            sleeper.resumed = True
            if not sleeper.woken.is_set():
                # Cancelled while asleep: dropped lazily by `_next_due`.
                sleeper.cancelled = True
                self._notify()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking the sleepers due by then in order."""
        if not seconds >= 0:
            raise ValueError(f"cannot advance a clock by {seconds!r} seconds")
        target = self._now + seconds
        while (sleeper := self._next_due(target)) is not None:
            self._now = max(self._now, sleeper.deadline)
            sleeper.woken.set()
            # A woken task runs at the loop's pace: wait until it has left `sleep`.
            while not sleeper.resumed:
                await anyio.lowlevel.checkpoint()
            await _settle()
        self._now = target
        await _settle()

    async def wait_for_sleepers(self, count: int = 1, *, within: float = 5.0) -> None:
        """Return once at least ``count`` tasks sleep on this clock; `TimeoutError` if that
        takes more than ``within`` real seconds."""
        with anyio.fail_after(within):
            while len(self.sleepers) < count:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    def _next_due(self, target: float) -> _Sleeper | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        if self._heap and self._heap[0].deadline <= target:
            return heapq.heappop(self._heap)
        return None

    def _notify(self) -> None:
        # Waiters hold the event; dropping it after setting wakes each of them once.
        if self._changed is not None:
            self._changed.set()
            self._changed = None


async def _settle() -> None:
    for _ in range(_SETTLE_CHECKPOINTS):
        await anyio.lowlevel.checkpoint()
