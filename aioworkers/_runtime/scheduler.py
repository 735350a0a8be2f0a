"""Capacity: which delivery may start, and when; fetchers reserve slots before they fetch.

The scheduler starts nothing itself: `submit` and `done` return the deliveries that may
start now, and `jobs.Jobs` starts them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from ..brokers.base import Delivery
from .inflight import InFlight, Run

Ready = tuple[Delivery, Run]


class Scheduler:
    """At most ``capacity`` deliveries held at once: running, buffered, or being fetched;
    with a ``limit``, at most that many started in all (then `exhausted` is set).

    A fetcher reserves slots (`reserve`) before it asks the broker for that many, and
    hands back what the fetch did not fill (`submit`, `unreserve`). Fetchers on several
    queues so never fetch for the same free slot: what the worker cannot start stays with
    the broker, for other workers. Fetchers wait for room in turn, first come first served,
    so a busy queue cannot keep the others from ever getting a slot.
    """

    def __init__(self, capacity: int, inflight: InFlight, limit: int | None = None) -> None:
        self.capacity = capacity
        self.limit = limit
        self.started = 0
        self.running = 0
        self.reserved = 0
        self.exhausted = asyncio.Event()  # set once ``limit`` deliveries have started
        self._inflight = inflight
        self._buffer: deque[Ready] = deque()
        # Fetchers waiting for room, and how much each wants, first come first served.
        self._turns: deque[tuple[asyncio.Future[int], int]] = deque()
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def room(self) -> int:
        """Free slots that no run, buffered delivery or fetch under way has taken."""
        taken = self.reserved + len(self._buffer)
        free = self.capacity - self.running - taken
        if self.limit is not None:
            # Nothing is fetched that the limit would not let start.
            free = min(free, self.limit - self.started - taken)
        return free

    async def reserve(self, most: int) -> int:
        """Wait for a free slot (in turn with other fetchers) and reserve up to ``most``;
        returns how many (0 once closed). Every slot reserved goes back through `submit`
        or `unreserve`."""
        if self._closed:
            return 0
        if self.room > 0 and not self._turns:
            return self._take(most)
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (turn, most)
        self._turns.append(entry)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.unreserve(turn.result())  # granted as it was cancelled: give it back
            elif entry in self._turns:
                self._turns.remove(entry)
            raise

    def unreserve(self, n: int) -> None:
        """Give back ``n`` reserved slots that no delivery filled."""
        self.reserved -= n
        self._next_turn()

    def submit(self, deliveries: Sequence[Delivery], reserved: int) -> list[Ready] | None:
        """Hold these deliveries (from now on their leases are kept) in the ``reserved``
        slots fetched for; returns those to start now (the rest wait in the buffer). The
        slots left unfilled are free again.

        Returns None, holding nothing, once closed: the caller releases them.
        """
        self.reserved -= reserved
        if self._closed:
            return None
        add = self._inflight.add
        held = [(delivery, add(delivery)) for delivery in deliveries]
        # What may start now, in order: the buffer first, then these.
        free = self.capacity - self.running
        if self.limit is not None:
            free = min(free, self.limit - self.started)
        if not self._buffer and len(held) <= free:  # the usual batch: no buffering
            ready = held
            self._count_started(len(held))
        else:
            self._buffer.extend(held)
            ready = []
            while (one := self._next()) is not None:
                ready.append(one)
        if self._turns:
            self._next_turn()
        return ready

    def done(self, n: int = 1) -> list[Ready]:
        """``n`` jobs finished and were settled: their slots are free. Returns the buffered
        deliveries to start in them."""
        self.running -= n
        ready: list[Ready] = []
        if self._buffer:
            while len(ready) < n and (one := self._next()) is not None:
                ready.append(one)
        if self._turns:
            self._next_turn()
        return ready

    def _count_started(self, n: int) -> None:
        self.running += n
        self.started += n
        if self.started == self.limit:
            self.exhausted.set()

    def _next(self) -> Ready | None:
        if not self._buffer or self.running >= self.capacity or self.started == self.limit:
            return None
        self._count_started(1)
        return self._buffer.popleft()

    def _take(self, most: int) -> int:
        n = min(most, self.room)
        self.reserved += n
        return n

    def _next_turn(self) -> None:
        # The room is reserved here, for the fetchers in line, not when each one wakes up:
        # a fetcher that just gave slots back must not take them again before its turn.
        while self._turns and (self._closed or self.room > 0):
            turn, most = self._turns.popleft()
            if not turn.done():
                turn.set_result(0 if self._closed else self._take(most))

    def close(self) -> list[Delivery]:
        """Stop handing out room; returns the buffered, never-started deliveries (still in
        InFlight) for the caller to release."""
        self._closed = True
        self._next_turn()
        unstarted = [delivery for delivery, _ in self._buffer]
        self._buffer.clear()
        return unstarted
