"""The in-memory broker: the reference semantics of the Broker protocol, for tests and
single-process use. Nothing survives the process."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import anyio

from .._runtime.clock import SYSTEM_CLOCK, Clock
from ..errors import LeaseLost
from ._kit import LeaseTable
from .base import (
    DEFAULT_LEASE,
    DeadLetter,
    DeadLetterPage,
    Delivery,
    QueueDepth,
    entry_number,
    entry_numbers,
    handed_back,
)

# How many lease tokens of applied retries and dead letters are remembered, so that one
# re-sent after a lost reply is answered as done (see `MemoryBroker._not_held`).
APPLIED_KEPT = 10_000


@dataclass(slots=True)
class _Message:
    id: str
    body: bytes
    count: int = 0


@dataclass(eq=False, slots=True)
class _Lease:
    """A delivery's token: the message it holds, while its queue's lease table has it."""

    message: _Message
    token: int


@dataclass(slots=True)
class _Queue:
    leases: LeaseTable[_Lease]
    ready: deque[_Message] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Message]] = field(default_factory=list)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        # Waiters hold the old event; swapping wakes all of them exactly once.
        self.changed.set()
        self.changed = asyncio.Event()

    def seconds_to_next_change(self, now: float) -> float | None:
        times = []
        if self.delayed:
            times.append(self.delayed[0][0])
        expiry = self.leases.next_deadline()
        if expiry is not None:
            times.append(expiry)
        return min(times) - now if times else None


class _Monotonic:
    """A bare monotonic callable as a `Clock` (what ``clock=`` took before): its time for
    leases and delays, real timers for waits."""

    __slots__ = ("monotonic",)

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def time(self) -> float:
        return time.time()


class MemoryBroker:
    """In-process broker with delays, leases, delivery counts and a DLQ.

    Leases are kept in a `LeaseTable` on ``clock`` (a `Clock`; a bare monotonic callable
    is taken too): a delivery not extended within its lease goes back to its queue when the
    queue is next looked at. On an `aioworkers.testing.FakeClock`, leases, delays and
    fetch's waits all move with the clock, so tests drive time instead of waiting.
    """

    messaging_system = "memory"

    def __init__(
        self,
        *,
        visibility_timeout: float | None = None,
        clock: Clock | Callable[[], float] = SYSTEM_CLOCK,
    ) -> None:
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        self._clock: Clock = _Monotonic(clock) if callable(clock) else clock
        # Real time: a waiting fetch is one timer on the loop, not a race of two tasks.
        self._real_timers = clock is SYSTEM_CLOCK or callable(clock)
        self._queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._applied: OrderedDict[int, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<MemoryBroker queues={sorted(self._queues)}>"

    def _q(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(LeaseTable(self._clock))
        return q

    def _promote(self, q: _Queue) -> None:
        now = self._clock.monotonic()
        while q.delayed and q.delayed[0][0] <= now:
            q.ready.append(heapq.heappop(q.delayed)[2])
        for lease in q.leases.expired(now):
            q.ready.append(lease.message)

    def _add(self, q: _Queue, message: _Message, delay: float) -> None:
        if delay > 0:
            eta = self._clock.monotonic() + delay
            heapq.heappush(q.delayed, (eta, next(self._tokens), message))
        else:
            q.ready.append(message)

    def _owned(self, delivery: Delivery) -> _Lease | None:
        lease = delivery.token
        if isinstance(lease, _Lease) and self._q(delivery.queue).leases.owns(lease):
            return lease
        return None

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        q = self._q(queue)
        for body in bodies:
            self._add(q, _Message(str(next(self._ids)), bytes(body)), delay)
        q.notify()

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        q = self._q(queue)
        lease = self._lease if lease is None else lease
        # The wait is timed on the clock that sleeps (a bare callable's waits are real).
        timer = time.monotonic if self._real_timers else self._clock.monotonic
        deadline = timer() + wait
        while True:
            self._promote(q)
            if q.ready:
                return self._take(q, queue, max_messages, lease)
            remaining = deadline - timer()
            if remaining <= 0:
                return []
            nxt = q.seconds_to_next_change(self._clock.monotonic())
            seconds = remaining if nxt is None else min(remaining, max(nxt, 0.001))
            await self._wait(q.changed, seconds)

    async def _wait(self, changed: asyncio.Event, seconds: float) -> None:
        """Until ``changed`` is set or ``seconds`` of the clock have passed."""
        if self._real_timers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await changed.wait()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waiter = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()

    def _take(self, q: _Queue, queue: str, max_messages: int, lease: float) -> list[Delivery]:
        # Synchronous from here on: a cancelled fetch never leaves a message leased.
        out = []
        for _ in range(min(max_messages, len(q.ready))):
            message = q.ready.popleft()
            message.count += 1
            held = _Lease(message, next(self._tokens))
            q.leases.add(held, lease)
            out.append(Delivery(queue, message.id, message.body, message.count, held))
        return out

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: entries are only read on `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost = []
        for d in deliveries:
            held = self._owned(d)
            if held is not None:
                self._q(d.queue).leases.settle(held)
            elif self._exists(d):
                lost.append(d)  # leased again, or waiting for its next delivery
        return lost

    def _exists(self, d: Delivery) -> bool:
        """Whether the message is still in the queue (a slow scan: lost leases only)."""
        q = self._q(d.queue)
        return (
            any(lease.message.id == d.message_id for lease in q.leases)
            or any(m.id == d.message_id for m in q.ready)
            or any(m.id == d.message_id for _, _, m in q.delayed)
        )

    def _not_held(self, delivery: Delivery) -> _Lease | None:
        """The lease of ``delivery`` if it is held; None if it was settled by a retry or
        dead letter applied already (the call is re-sent after its reply was lost: done);
        else `LeaseLost`."""
        held = self._owned(delivery)
        if held is not None:
            return held
        if isinstance(delivery.token, _Lease) and delivery.token.token in self._applied:
            return None
        raise LeaseLost(f"{delivery!r} is no longer leased by this worker")

    def _applied_now(self, q: _Queue, held: _Lease) -> None:
        q.leases.settle(held)
        self._applied[held.token] = None
        if len(self._applied) > APPLIED_KEPT:
            self._applied.popitem(last=False)

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        held = self._not_held(delivery)
        if held is None:
            return
        q = self._q(delivery.queue)
        self._applied_now(q, held)
        self._add(q, _Message(str(next(self._ids)), bytes(body)), delay)
        q.notify()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        for d in reversed(deliveries):
            held = self._owned(d)
            if held is None:
                continue
            q = self._q(d.queue)
            q.leases.settle(held)
            held.message.count = handed_back(d)
            q.ready.appendleft(held.message)
            q.notify()

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        lost = []
        for d in deliveries:
            held = self._owned(d)
            if held is None:
                lost.append(d)
            else:
                self._q(d.queue).leases.extend(held, lease)
        return lost

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """`DeadLetterWriter`: a body that was never a delivery here (a push request)."""
        entry_id = str(next(self._ids))
        dead_at = letter.dead_at or self._clock.time()
        filed = replace(letter, entry_id=entry_id, queue=queue, body=body, dead_at=dead_at)
        self._q(queue).dead[entry_id] = filed

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        held = self._not_held(delivery)
        if held is None:
            return
        q = self._q(delivery.queue)
        self._applied_now(q, held)
        entry_id = str(next(self._ids))
        q.dead[entry_id] = replace(
            letter,
            entry_id=entry_id,
            queue=delivery.queue,
            body=delivery.body,
            dead_at=letter.dead_at or self._clock.time(),
        )

    async def depth(self, queue: str) -> QueueDepth:
        q = self._q(queue)
        self._promote(q)
        return QueueDepth(
            ready=len(q.ready), in_flight=len(q.leases), delayed=len(q.delayed), dead=len(q.dead)
        )

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        return list(itertools.islice(self._q(queue).dead.values(), limit))

    async def dead_letter_page(
        self, queue: str, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """`DeadLetterPages`: a bisection on the entry ids (increasing integers, in
        insertion order), after copying the id list (the references only)."""
        dead = self._q(queue).dead
        ids = list(dead)
        limit = max(limit, 1)
        if after is not None:
            start = bisect.bisect_right(ids, entry_number(after), key=int) if after else 0
            read = ids[start : start + limit + 1]
            newest_first, beyond = False, start > 0
        else:
            end = len(ids)
            if before is not None:
                end = bisect.bisect_left(ids, entry_number(before), key=int)
            read = ids[max(end - limit - 1, 0) : end][::-1]
            newest_first, beyond = True, end < len(ids)
        letters = [dead[i] for i in read]
        return DeadLetterPage.of(letters, limit=limit, newest_first=newest_first, beyond=beyond)

    async def dead_letters_by_id(self, queue: str, entry_ids: Collection[str]) -> list[DeadLetter]:
        dead = self._q(queue).dead
        found = sorted({n for n in entry_numbers(entry_ids) if str(n) in dead})
        return [dead[str(n)] for n in found]

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        dead = self._q(queue).dead
        if entry_ids is None:
            n = len(dead)
            dead.clear()
            return n
        return sum(dead.pop(i, None) is not None for i in entry_ids)

    async def aclose(self) -> None:
        """Nothing to close; the queues stay, so a closed app can be reopened in-process."""
