"""The fetch loop: ask the broker for as many deliveries as there are free slots."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio

from ..brokers.base import Broker, Delivery
from ..errors import BrokerUnavailable
from ..retry import next_delay
from .scheduler import Slots

log = logging.getLogger("aioworkers")

Start = Callable[[Delivery], None]


class Fetcher:
    """One per queue. Stops when ``quiet`` is set, or in burst mode once ``drained()``."""

    def __init__(
        self,
        broker: Broker,
        queue: str,
        slots: Slots,
        *,
        wait: float,
        quiet: Callable[[], bool],
        drained: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.slots = slots
        self.wait = wait
        self.quiet = quiet
        self.drained = drained

    async def run(self, start: Start) -> None:
        failures = 0
        idle = True
        while not self.quiet():
            if idle and self.drained is not None and await self.drained():
                return
            n = await self.slots.take(self.slots.capacity)
            if n == 0:
                continue
            try:
                got = await self.broker.fetch(self.queue, max_messages=n, wait=self.wait)
            except BrokerUnavailable as exc:
                self.slots.give(n)
                failures += 1
                delay = next_delay(failures, base=0.2, cap=10.0)
                log.warning("fetch from %r failed, retrying in %.1fs: %s", self.queue, delay, exc)
                await anyio.sleep(delay)
                continue
            failures = 0
            self.slots.give(n - len(got))
            idle = not got
            if got and self.quiet():
                # Went quiet while waiting: hand them to another worker at once.
                self.slots.give(len(got))
                # If the broker is down, their leases run out and it redelivers them.
                with contextlib.suppress(BrokerUnavailable):
                    await self.broker.release(got)
                return
            for delivery in got:
                start(delivery)
