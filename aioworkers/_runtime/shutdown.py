"""The end of a worker: every wait on the way out is bounded, and a second stop cuts them.

Order: quiet -> drain within grace -> cancel the runs, which release their jobs (at most
`SETTLE_GRACE`) -> cancel again what is still going (a release retrying against a broker
that is down, a handler that ignores cancellation) and wait at most `ABANDON_WAIT` ->
leave the rest to their leases: the broker hands them out again once the leases lapse.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import anyio

from .clock import Clock, Timeout, move_on_after
from .inflight import InFlight

log = logging.getLogger("aioworkers")

# After the grace period, cancelled runs get this long to hand their jobs back.
SETTLE_GRACE = 5.0
# After a second stop: the same, cut short (the user asked for an exit now).
STOP_NOW_GRACE = 1.0
# How long a run cancelled a second time gets to end before its job is left to its lease.
ABANDON_WAIT = 1.0


class Deadlines:
    """The waits of the shutdown path, on ``clock``: each at most its own bound, and no
    later than the cut that a second stop sets (`hurry`)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._cut = math.inf
        self._open: set[Timeout] = set()

    @contextmanager
    def window(self, seconds: float) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ends the wait inside after ``seconds``, or at the cut."""
        with anyio.CancelScope() as scope:
            timeout = Timeout(self.clock, scope)
            timeout.start(max(0.0, min(seconds, self._cut - self.clock.monotonic())))
            self._open.add(timeout)
            try:
                yield scope
            finally:
                self._open.discard(timeout)
                timeout.stop()

    def hurry(self, within: float) -> None:
        """Every wait, open or to come, ends within ``within`` seconds from now."""
        self._cut = min(self._cut, self.clock.monotonic() + within)
        for timeout in self._open:
            if timeout.end > self._cut:
                timeout.start(within)


async def abandon(inflight: InFlight, deadlines: Deadlines, *others: asyncio.Task[Any]) -> None:
    """Cancel the runs still going, so they release their jobs; what does not end in time is
    left to its lease. ``others`` are tasks holding deliveries without a run (a release
    of unstarted ones) that are cancelled with the stragglers."""
    with anyio.CancelScope(shield=True):
        inflight.cancel_all()
        with deadlines.window(SETTLE_GRACE):
            await inflight.wait_empty()
        if not len(inflight):
            return
        log.error(
            "left %d jobs to their leases (not handed back in time): the broker hands them "
            "out again once their leases lapse",
            len(inflight),
        )
        # A settle retrying against a broker that is down, or a handler that swallowed the
        # cancel: a second cancel is not taken back by the runtime (see `Run.catch_cancel`).
        for task in [*inflight.tasks(), *others]:
            task.cancel()
        with move_on_after(deadlines.clock, ABANDON_WAIT):
            await inflight.wait_empty()
        left = inflight.forget()
        if left:
            log.error("%d runs did not end when cancelled twice: left running", len(left))


class Shutdown:
    """One worker's way out, in that order: `drain` (within ``grace``), `abandon` what is
    left; `stop` counts the stops, and from the second one on cuts every wait short."""

    def __init__(self, inflight: InFlight, clock: Clock, grace: float) -> None:
        self.inflight = inflight
        self.clock = clock
        self.grace = grace
        self.stops = 0
        self.deadlines = Deadlines(clock)
        # Tasks holding deliveries without a run (a hand-back of unstarted ones).
        self.others: list[asyncio.Task[Any]] = []
        self._grace_scope: anyio.CancelScope | None = None

    def stop(self) -> bool:
        """Count a stop; True from the second on, which cancels now: the runs get a second
        to release their jobs (a third stop: none), the rest is left to its lease."""
        self.stops += 1
        if self.stops < 2:
            return False
        log.warning("stopping now: cancelling %d jobs in flight", len(self.inflight))
        self.deadlines.hurry(STOP_NOW_GRACE if self.stops == 2 else 0.0)
        if self._grace_scope is not None:
            self._grace_scope.cancel()
        self.inflight.cancel_all()
        return True

    async def drain(self) -> None:
        """Wait for the runs to end within the grace period, then `abandon` the rest."""
        with move_on_after(self.clock, self.grace) as self._grace_scope:
            if self.stops > 1:
                self._grace_scope.cancel()  # a second stop came before the drain began
            await self.inflight.wait_empty()
        if len(self.inflight):
            if self.stops < 2:  # else a second stop() cut the grace period short
                log.warning("grace period over: releasing %d unfinished jobs", len(self.inflight))
            await self.abandon()

    async def abandon(self) -> None:
        await abandon(self.inflight, self.deadlines, *self.others)

    def settle_window(self) -> AbstractContextManager[anyio.CancelScope]:
        """The bound of the last flush of acks (`SETTLE_GRACE`, or the second stop's cut)."""
        return self.deadlines.window(SETTLE_GRACE)
