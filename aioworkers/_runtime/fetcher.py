"""The fetch loop: ask the broker for no more deliveries than the slots reserved for them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio

from ..brokers.base import Broker, Screened, ScreensCancelMarks
from ..errors import BrokerUnavailable
from ..telemetry.worker import WorkerTelemetry
from .backoff import Backoff
from .clock import SYSTEM_CLOCK, Clock
from .jobs import Jobs
from .scheduler import Scheduler

log = logging.getLogger("aioworkers")


class Fetcher:
    """One per queue. Stops when ``quiet()``, or in burst mode once ``drained()``.

    Slots are reserved before each fetch (see `Scheduler`). With one queue, a fetch
    reserves every free slot and long-polls for up to ``wait``, as nothing else needs the
    slots. With several, a long poll on an empty queue must not hold the slots another
    queue could fill meanwhile, so a fetcher reserves wide only while its queue has shown
    work, and then asks without waiting (``wait=0``); once its queue came back empty it
    long-polls for one message, holding one slot. When the free slots are too few for every
    other queue to have one (fewer slots than queues), that long poll is cut to
    ``wait / queues``: the queues take turns, a round over all of them takes about one
    ``wait`` (as many fetches a second as ``queues`` long polls would make), and a queue
    with work waits at most about one ``wait`` for a slot, never forever.
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        scheduler: Scheduler,
        jobs: Jobs,
        *,
        wait: float,
        lease: float,
        quiet: Callable[[], bool],
        drained: Callable[[], Awaitable[bool]] | None,
        telemetry: WorkerTelemetry | None = None,
        queues: int = 1,
        clock: Clock = SYSTEM_CLOCK,
        screening: ScreensCancelMarks | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.scheduler = scheduler
        self.jobs = jobs
        self.wait = wait
        self.lease = lease
        self.quiet = quiet
        self.drained = drained
        self.telemetry = telemetry
        self.queues = queues
        self.clock = clock
        self.screening = screening  # ``broker``, when it reads cancel marks as it fetches
        self._hungry = True  # the last fetch brought work: the queue may hold more
        self._pausing: anyio.CancelScope | None = None

    def interrupt(self) -> None:
        """End a backoff pause now (the worker went quiet): a worker told to stop while
        its broker is down must not wait out the pause first. A fetch in progress is left
        to finish, so nothing it took is stranded."""
        if self._pausing is not None:
            self._pausing.cancel()

    async def run(self) -> None:
        try:
            await self._fetch_until_done()
        finally:
            # Deliveries a push-based broker already holds for us go to other workers now,
            # not when this process exits.
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.stop_fetching(self.queue)

    async def _reserve(self) -> tuple[int, float]:
        """Reserve slots for the next fetch; returns how many, and how long it may wait."""
        if self.queues == 1:
            return await self.scheduler.reserve(self.scheduler.capacity), self.wait
        if self._hungry:
            return await self.scheduler.reserve(self.scheduler.capacity), 0.0
        reserved = await self.scheduler.reserve(1)
        if self.scheduler.room < self.queues - 1:
            return reserved, self.wait / self.queues
        return reserved, self.wait

    async def _fetch_until_done(self) -> None:
        # Not `backoff()`: the slots are given back between tries, and a quiet worker stops.
        pauses = Backoff(self.clock, first=0.2, cap=10.0)
        idle = True
        while not self.quiet():
            if idle and self.drained is not None and await self.drained():
                return
            reserved, wait = await self._reserve()
            if reserved == 0:
                continue
            screened: list[Screened | None] | None = None
            try:
                if self.screening is not None:  # the cancel marks read as it fetches
                    got, screened = await self.screening.fetch_screened(
                        self.queue, max_messages=reserved, wait=wait, lease=self.lease
                    )
                else:
                    got = await self.broker.fetch(
                        self.queue, max_messages=reserved, wait=wait, lease=self.lease
                    )
            except BrokerUnavailable as exc:
                self.scheduler.unreserve(reserved)
                delay = pauses.delay()
                log.warning("fetch from %r failed, retrying in %.2fs: %s", self.queue, delay, exc)
                with anyio.CancelScope() as self._pausing:
                    await pauses.pause(delay)
                self._pausing = None
                continue
            except BaseException:
                self.scheduler.unreserve(reserved)
                raise
            pauses.reset()
            idle = not got
            self._hungry = bool(got)
            if got and self.telemetry is not None:
                self.telemetry.fetched(self.queue, len(got))
            await self.jobs.screen(got, screened)  # their cancel marks, if not read yet
            if not self.jobs.admit(got, reserved) and got:
                # Went quiet while waiting: hand them to another worker at once. If the
                # broker is down, their leases run out and it redelivers them.
                await self.jobs.unscreen(got)
                with contextlib.suppress(BrokerUnavailable):
                    await self.broker.release(got)


async def queues_empty(broker: Broker, queues: list[str], *, delayed: bool = True) -> bool:
    """Nothing ready or in flight (and, with ``delayed``, nothing delayed) on any of
    ``queues`` (burst mode's end); False if the broker cannot tell now."""
    try:
        for queue in queues:
            depth = await broker.depth(queue)
            if depth.ready or depth.in_flight or (delayed and depth.delayed):
                return False
    except BrokerUnavailable:
        return False
    return True


async def delayed_jobs(broker: Broker, queues: list[str]) -> int | None:
    """How many jobs wait for their time on ``queues`` (None if the broker cannot tell)."""
    try:
        return sum([(await broker.depth(queue)).delayed for queue in queues])
    except BrokerUnavailable:
        return None
