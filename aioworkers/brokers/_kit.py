"""The broker toolkit: what several brokers need, written once.

- `map_exceptions`: a table from client errors to ours, applied at the I/O boundary;
- `by_queue`, `chunks`: how batches are cut;
- `LeaseTable`: the local lease table of the brokers that emulate leases;
- `retry_batch`: a batch call whose entries may fail one by one, retried with backoff;
- `DueTimers`: wake-ups at the moments jobs this process delayed become due.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import (
    Awaitable,
    Callable,
    Hashable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Generic, TypeVar

from .._runtime.backoff import Backoff
from .._runtime.clock import SYSTEM_CLOCK, Clock
from ..errors import BrokerUnavailable
from .base import Delivery

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

log = logging.getLogger("aioworkers")

# A client error -> ours (an exception type is called with the error's text), or None for
# "not a client error after all": it is raised as it is.
Mapper = Callable[[BaseException], BaseException | None] | type[BaseException]


class map_exceptions:  # named like the function it stands for: ``with map_exceptions(...)``
    """``with`` (or ``async with``) block whose errors are mapped by ``table``: the first
    entry whose type matches the error decides; the mapped error is raised ``from`` the
    original. Only `Exception` is mapped, never a cancellation. Stateless: build one per
    table and use it at every call (httpcore's ``map_exceptions``, as an object)."""

    __slots__ = ("_table",)

    def __init__(self, table: Mapping[type[BaseException], Mapper]) -> None:
        self._table = tuple(table.items())

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        mapped = self.mapped(exc)
        if mapped is not None:
            raise mapped from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def mapped(self, exc: BaseException) -> BaseException | None:
        """What ``exc`` becomes, or None if no entry maps it."""
        for kind, to in self._table:
            if isinstance(exc, kind):
                mapped: BaseException | None = to(str(exc)) if isinstance(to, type) else to(exc)
                return mapped
        return None


def by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[Delivery]]:
    """The deliveries grouped by queue, in order."""
    groups: dict[str, list[Delivery]] = {}
    for d in deliveries:
        groups.setdefault(d.queue, []).append(d)
    return groups


def chunks(items: Sequence[T], n: int) -> Iterator[list[T]]:
    """``items`` cut into lists of at most ``n``."""
    for start in range(0, len(items), n):
        yield list(items[start : start + n])


class LeaseTable(Generic[K]):
    """The deliveries a broker emulating leases holds, by token, each with a deadline on
    ``clock.monotonic()``. A lease is held until it is settled or collected by `expired`:
    a broker that hands lapsed deliveries back (memory, AMQP) collects them when it looks
    at its queue; one whose server lets them lapse by itself (SQS) collects them before
    every check, so a lapsed lease is never taken for a held one."""

    __slots__ = ("_clock", "_deadlines", "_heap", "_seq")

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._deadlines: dict[K, float] = {}
        # (deadline, seq, token); entries of extended or settled leases are stale and
        # skipped when they come up.
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._deadlines)

    def __iter__(self) -> Iterator[K]:
        return iter(self._deadlines)

    def add(self, token: K, lease: float, *, start: float | None = None) -> float:
        """Hold ``token`` for ``lease`` seconds from now (or from ``start``, on the clock:
        when the call that took the lease was sent); returns its deadline."""
        deadline = (self._clock.monotonic() if start is None else start) + lease
        self._deadlines[token] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), token))
        return deadline

    def owns(self, token: object) -> bool:
        return token in self._deadlines

    def extend(self, token: K, lease: float, *, start: float | None = None) -> bool:
        """Hold ``token`` for ``lease`` more seconds from now (or ``start``); False if it is
        not held."""
        if token not in self._deadlines:
            return False
        self.add(token, lease, start=start)
        return True

    def settle(self, token: K) -> bool:
        """Let go of ``token``; False if it was not held."""
        return self._deadlines.pop(token, None) is not None

    def expired(self, now: float | None = None) -> list[K]:
        """Remove and return the tokens whose lease ran out by ``now`` (default: the clock's
        now), earliest first."""
        now = self._clock.monotonic() if now is None else now
        out: list[K] = []
        heap, deadlines = self._heap, self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, token = heapq.heappop(heap)
            if deadlines.get(token) == deadline:
                del deadlines[token]
                out.append(token)
        if len(heap) > 2 * len(deadlines) + 64:
            # Mostly stale entries (leases extended many times): rebuild, so the heap stays
            # as small as the table.
            self._heap = [e for e in heap if deadlines.get(e[2]) == e[0]]
            heapq.heapify(self._heap)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline on the clock (possibly of a lease settled since), or None."""
        return self._heap[0][0] if self._heap else None

    def clear(self) -> None:
        self._deadlines.clear()
        self._heap.clear()


async def retry_batch(
    call: Callable[[list[T]], Awaitable[list[T]]],
    entries: Sequence[T],
    *,
    what: str,
    attempts: int = 5,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Send ``entries`` with ``call``, which returns those that failed on the server's side
    this time (worth another try; what it refuses for good it deals with itself), and send
    those again after a `Backoff` pause on ``clock``: `BrokerUnavailable` if some still
    fail after ``attempts`` calls. The client's own retries cover a call that fails as a
    whole; this covers a call that succeeds for some entries only."""
    pauses = Backoff(clock, first=0.05, cap=1.0)
    pending = list(entries)
    for attempt in range(1, attempts + 1):
        pending = await call(pending)
        if not pending:
            return
        if attempt < attempts:
            await pauses.pause()
    raise BrokerUnavailable(f"{what}: {len(pending)} of {len(entries)} entries failed")


class DueTimers:
    """Calls ``due(queue)`` when a job this process delayed becomes due, on a broker whose
    delayed jobs move to the queue only when a fetch asks for it (Redis): a fetch that
    long-polls meanwhile would see the job only when its poll ends (a throttled job,
    deferred by milliseconds, would come back up to a whole poll late, and a rate limit
    would drain in waves a poll apart). Timers falling within one ``grain`` share one call;
    at most ``limit`` wait per queue (past it the fetches' own moves still run them).
    Best effort: a failed call is logged at debug level and changes nothing."""

    def __init__(
        self,
        due: Callable[[str], Awaitable[object]],
        *,
        grain: float = 0.005,
        limit: int = 1000,
    ) -> None:
        self._due = due
        self._grain = grain
        self._limit = limit
        self._timers: dict[str, dict[int, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def after(self, queue: str, delay: float) -> None:
        """Call ``due(queue)`` ``delay`` seconds from now (rounded up to the grain)."""
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + delay) / self._grain)
        timers = self._timers.setdefault(queue, {})
        if slot in timers or len(timers) >= self._limit:
            return
        timers[slot] = loop.call_at(slot * self._grain, self._fire, queue, slot)

    def _fire(self, queue: str, slot: int) -> None:
        self._timers.get(queue, {}).pop(slot, None)
        task = asyncio.get_running_loop().create_task(self._call(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, queue: str) -> None:
        try:
            await self._due(queue)
        except Exception as exc:  # the next fetch moves the job anyway
            log.debug("could not move due jobs of %r now: %s", queue, exc)

    async def aclose(self) -> None:
        """Cancel every timer and wait for the calls in progress."""
        for timers in self._timers.values():
            for handle in timers.values():
                handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
