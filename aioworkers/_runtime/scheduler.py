"""Capacity: start a job whenever a slot is free; ask fetchers for no more than that."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from ..brokers.base import Delivery
from .inflight import InFlight, Run

Start = Callable[[Delivery, Run], None]


class Scheduler:
    """At most ``capacity`` jobs run at once; fetched deliveries wait in a small buffer.

    Fetchers ask for `room` (free slots not already spoken for by the buffer) without
    reserving it, so a fetcher blocked on an empty queue holds no capacity another
    queue could use. Two fetchers may both fill the same room; the surplus waits here,
    leased and extended like any delivery held, and no fetch happens until it has started.
    """

    def __init__(self, capacity: int, inflight: InFlight, start: Start) -> None:
        self.capacity = capacity
        self.running = 0
        self._inflight = inflight
        self._start = start
        self._buffer: deque[tuple[Delivery, Run]] = deque()
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def room(self) -> int:
        return self.capacity - self.running - len(self._buffer)

    async def wait_for_room(self) -> int:
        """Wait until a slot is free and unclaimed; returns how many (0 once closed)."""
        while self.room <= 0 and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        return 0 if self._closed else self.room

    def submit(self, deliveries: Sequence[Delivery]) -> bool:
        """Hold these deliveries (from now on their leases are kept) and start what fits.

        Returns False, holding nothing, once closed: the caller releases them.
        """
        if self._closed:
            return False
        for delivery in deliveries:
            self._buffer.append((delivery, self._inflight.add(delivery)))
        self._dispatch()
        return True

    def done(self) -> None:
        """A job finished and was settled: its slot is free."""
        self.running -= 1
        self._dispatch()
        self._changed.set()

    def _dispatch(self) -> None:
        while self._buffer and self.running < self.capacity:
            self.running += 1
            self._start(*self._buffer.popleft())

    def close(self) -> list[Delivery]:
        """Stop handing out room; returns the buffered, never-started deliveries (still in
        InFlight) for the caller to release."""
        self._closed = True
        self._changed.set()
        unstarted = [delivery for delivery, _ in self._buffer]
        self._buffer.clear()
        return unstarted
