"""Strict queue priority: one fetch loop over the worker's queues in order.

With ``priority="strict"`` the free slots are offered to the first queue first; the next
queue gets only what the earlier ones could not fill, in the same round. (The default,
"fair", runs one `Fetcher` per queue, each taking turns for slots.) Slots are reserved
before a round, as the fair fetchers do, so nothing is fetched that cannot start.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from ..errors import BrokerUnavailable, ConfigError
from .backoff import Backoff
from .fetcher import Fetcher

log = logging.getLogger("aioworkers")

Priority = Literal["fair", "strict"]
PRIORITIES: tuple[Priority, ...] = ("fair", "strict")


@runtime_checkable
class Prefetching(Protocol):
    """A broker that has messages pushed to the worker ahead of its fetches (RabbitMQ),
    whose prefetch per queue can be set before it consumes."""

    def set_prefetch(self, queue: str, count: int) -> None: ...


def check_priority(priority: str) -> Priority:
    for known in PRIORITIES:
        if priority == known:
            return known
    raise ConfigError(f'priority must be "fair" or "strict", got {priority!r}')


class StrictFetcher:
    """Fetches for every queue of ``fetchers`` (one `Fetcher` per queue, in priority
    order, sharing one scheduler), always asking the earlier queues first.

    Each round reserves the free slots, then asks each queue in order without waiting for
    as many as are still free. After a round that found nothing, the next round long-polls
    one queue for ``wait / queues`` (a different one each time), so an idle worker makes
    about as many calls as one long poll, and work arriving on any queue waits at most
    about one ``wait``.
    """

    def __init__(self, fetchers: Sequence[Fetcher]) -> None:
        if not fetchers:
            raise ConfigError("a worker needs at least one queue")
        self._fetchers = list(fetchers)
        self._first = fetchers[0]
        self._turn = 0  # the queue whose turn it is to long-poll after an empty round
        capacity = self._first.scheduler.capacity
        for fetcher in self._fetchers:
            if isinstance(fetcher.broker, Prefetching):
                # A push broker sends the next message of a queue only once one is acked:
                # a slot freed then would find the earlier queue's buffer empty and take a
                # later queue's message. So every queue but the last has a slot's worth
                # more delivered ahead; the last is bounded to the slots.
                ahead = capacity if fetcher is not self._fetchers[-1] else 0
                fetcher.broker.set_prefetch(fetcher.queue, capacity + ahead)

    async def run(self) -> None:
        try:
            await self._fetch_until_done()
        finally:
            for fetcher in self._fetchers:
                with contextlib.suppress(BrokerUnavailable):
                    await fetcher.broker.stop_fetching(fetcher.queue)

    async def _fetch_until_done(self) -> None:
        first = self._first
        scheduler = first.scheduler
        pauses = Backoff(first.clock, first=0.2, cap=10.0)
        idle = True
        while not first.quiet():
            if idle and first.drained is not None and await first.drained():
                return
            reserved = await scheduler.reserve(scheduler.capacity)
            if reserved == 0:
                continue
            try:
                got = await self._round(reserved, idle)
            except BrokerUnavailable as exc:
                delay = pauses.delay()
                log.warning("fetch failed, retrying in %.2fs: %s", delay, exc)
                await pauses.pause(delay)
                continue
            pauses.reset()
            idle = got == 0
            if idle:
                self._turn = (self._turn + 1) % len(self._fetchers)

    async def _round(self, reserved: int, idle: bool) -> int:
        """Fill the ``reserved`` slots from the queues in order; returns how many came."""
        left = reserved
        try:
            for index, fetcher in enumerate(self._fetchers):
                if left == 0 or fetcher.quiet():
                    break
                wait = fetcher.wait / len(self._fetchers) if idle and index == self._turn else 0.0
                got = await fetcher.broker.fetch(
                    fetcher.queue, max_messages=left, wait=wait, lease=fetcher.lease
                )
                if not got:
                    continue
                left -= len(got)  # `admit` frees the slots it was given, filled or not
                if fetcher.telemetry is not None:
                    fetcher.telemetry.fetched(fetcher.queue, len(got))
                await fetcher.jobs.screen(got)  # their cancel marks, as `Fetcher` reads them
                if not fetcher.jobs.admit(got, len(got)):
                    with contextlib.suppress(BrokerUnavailable):
                        await fetcher.broker.release(got)
                    break
        finally:
            if left:
                self._first.scheduler.unreserve(left)
        return reserved - left
