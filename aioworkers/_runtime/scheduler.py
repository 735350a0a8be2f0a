"""Capacity: start a job whenever a slot is free; fetchers reserve slots before they fetch."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from ..brokers.base import Delivery
from .inflight import InFlight, Run

Start = Callable[[Delivery, Run], None]


class Scheduler:
    """At most ``capacity`` deliveries held at once: running, buffered, or being fetched.

    A fetcher reserves slots (`reserve`) before it asks the broker for that many, and
    hands back what the fetch did not fill (`submit`, `unreserve`). Fetchers on several
    queues so never fetch for the same free slot: what the worker cannot start stays with
    the broker, for other workers. Fetchers wait for room in turn, first come first served,
    so a busy queue cannot keep the others from ever getting a slot.
    """

    def __init__(self, capacity: int, inflight: InFlight, start: Start) -> None:
        self.capacity = capacity
        self.running = 0
        self.reserved = 0
        self._inflight = inflight
        self._start = start
        self._buffer: deque[tuple[Delivery, Run]] = deque()
        # Fetchers waiting for room, and how much each wants, first come first served.
        self._turns: deque[tuple[asyncio.Future[int], int]] = deque()
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def room(self) -> int:
        """Free slots that no run, buffered delivery or fetch under way has taken."""
        return self.capacity - self.running - self.reserved - len(self._buffer)

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

    def submit(self, deliveries: Sequence[Delivery], reserved: int) -> bool:
        """Hold these deliveries (from now on their leases are kept) in the ``reserved``
        slots fetched for, and start what fits; the slots left unfilled are free again.

        Returns False, holding nothing, once closed: the caller releases them.
        """
        self.reserved -= reserved
        if self._closed:
            return False
        for delivery in deliveries:
            self._buffer.append((delivery, self._inflight.add(delivery)))
        self._dispatch()
        self._next_turn()
        return True

    def done(self) -> None:
        """A job finished and was settled: its slot is free."""
        self.running -= 1
        self._dispatch()
        self._next_turn()

    def _dispatch(self) -> None:
        while self._buffer and self.running < self.capacity:
            self.running += 1
            self._start(*self._buffer.popleft())

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
