"""The fetch loop: ask the broker for no more deliveries than there are free slots."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio

from ..brokers.base import Broker
from ..errors import BrokerUnavailable
from ..retry import next_delay
from ..telemetry import WorkerTelemetry
from .scheduler import Scheduler

log = logging.getLogger("aioworkers")


class Fetcher:
    """One per queue. Stops when ``quiet()``, or in burst mode once ``drained()``."""

    def __init__(
        self,
        broker: Broker,
        queue: str,
        scheduler: Scheduler,
        *,
        wait: float,
        quiet: Callable[[], bool],
        drained: Callable[[], Awaitable[bool]] | None,
        telemetry: WorkerTelemetry | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.scheduler = scheduler
        self.wait = wait
        self.quiet = quiet
        self.drained = drained
        self.telemetry = telemetry

    async def run(self) -> None:
        await self._fetch_until_done()
        # Deliveries a push-based broker already holds for us go to other workers now,
        # not when this process exits.
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.stop_fetching(self.queue)

    async def _fetch_until_done(self) -> None:
        failures = 0
        idle = True
        while not self.quiet():
            if idle and self.drained is not None and await self.drained():
                return
            room = await self.scheduler.wait_for_room()
            if room == 0:
                continue
            try:
                got = await self.broker.fetch(self.queue, max_messages=room, wait=self.wait)
            except BrokerUnavailable as exc:
                failures += 1
                delay = next_delay(failures, base=0.2, cap=10.0)
                log.warning("fetch from %r failed, retrying in %.1fs: %s", self.queue, delay, exc)
                await anyio.sleep(delay)
                continue
            failures = 0
            idle = not got
            if got and self.telemetry is not None:
                self.telemetry.fetched(self.queue, len(got))
            if got and not self.scheduler.submit(got):
                # Went quiet while waiting: hand them to another worker at once. If the
                # broker is down, their leases run out and it redelivers them.
                with contextlib.suppress(BrokerUnavailable):
                    await self.broker.release(got)
