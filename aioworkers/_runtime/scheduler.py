"""Capacity: how many deliveries this worker may hold at once."""

from __future__ import annotations

import asyncio


class Slots:
    """A counting limit that hands out as many slots as are free (fetch up to that many).

    Unlike a semaphore, `take` grabs a batch, so one fetch can fill all free capacity.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Event()
        self._closed = False

    @property
    def free(self) -> int:
        return self.capacity - self.used

    async def take(self, most: int) -> int:
        """Wait for a free slot, then take up to ``most``; 0 once closed."""
        while self.free <= 0 and not self._closed:
            self._freed.clear()
            await self._freed.wait()
        if self._closed:
            return 0
        n = min(most, self.free)
        self.used += n
        return n

    def give(self, n: int = 1) -> None:
        self.used -= n
        self._freed.set()

    def close(self) -> None:
        """Wake and refuse every waiter: the worker is going quiet."""
        self._closed = True
        self._freed.set()
