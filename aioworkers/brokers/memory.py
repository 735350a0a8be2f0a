"""The in-memory broker: the reference semantics of the Broker protocol, for tests and
single-process use. Nothing survives the process."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from ..errors import LeaseLost
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth

# How many lease tokens of applied retries and dead letters are remembered, so that one
# re-sent after a lost reply is answered as done (see `MemoryBroker._not_held`).
APPLIED_KEPT = 10_000


@dataclass(slots=True)
class _Message:
    id: str
    body: bytes
    count: int = 0


@dataclass(slots=True)
class _Lease:
    message: _Message
    deadline: float
    token: int


@dataclass(slots=True)
class _Queue:
    ready: deque[_Message] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Message]] = field(default_factory=list)
    leases: dict[str, _Lease] = field(default_factory=dict)
    expiries: list[tuple[float, int, str]] = field(default_factory=list)
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
        if self.expiries:
            times.append(self.expiries[0][0])
        return min(times) - now if times else None


class MemoryBroker:
    """In-process broker with delays, leases (visibility timeout), delivery counts and a DLQ.

    ``clock`` returns monotonic seconds; tests pass a fake one to expire leases on demand.
    """

    messaging_system = "memory"

    def __init__(
        self,
        *,
        visibility_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._applied: OrderedDict[object, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<MemoryBroker queues={sorted(self._queues)}>"

    def _q(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    def _promote(self, q: _Queue) -> None:
        now = self._clock()
        while q.delayed and q.delayed[0][0] <= now:
            q.ready.append(heapq.heappop(q.delayed)[2])
        while q.expiries and q.expiries[0][0] <= now:
            _, token, message_id = heapq.heappop(q.expiries)
            lease = q.leases.get(message_id)
            # Stale heap entries (extended or settled leases) are skipped.
            if lease is not None and lease.token == token and lease.deadline <= now:
                del q.leases[message_id]
                q.ready.append(lease.message)

    def _add(self, q: _Queue, message: _Message, delay: float) -> None:
        if delay > 0:
            heapq.heappush(q.delayed, (self._clock() + delay, next(self._tokens), message))
        else:
            q.ready.append(message)

    def _owned(self, delivery: Delivery) -> _Lease | None:
        q = self._q(delivery.queue)
        lease = q.leases.get(delivery.message_id)
        if lease is None or lease.token != delivery.token:
            return None
        return lease

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            self._promote(q)
            if q.ready:
                return self._take(q, queue, max_messages, lease)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            changed = q.changed
            nxt = q.seconds_to_next_change(self._clock())
            timeout = remaining if nxt is None else min(remaining, max(nxt, 0.001))
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                pass

    def _take(self, q: _Queue, queue: str, max_messages: int, lease: float) -> list[Delivery]:
        # Synchronous from here on: a cancelled fetch never leaves a message leased.
        out = []
        deadline = self._clock() + lease
        for _ in range(min(max_messages, len(q.ready))):
            message = q.ready.popleft()
            message.count += 1
            token = next(self._tokens)
            q.leases[message.id] = _Lease(message, deadline, token)
            heapq.heappush(q.expiries, (deadline, token, message.id))
            out.append(Delivery(queue, message.id, message.body, message.count, token))
        return out

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: entries are only read on `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost = []
        for d in deliveries:
            if self._owned(d) is not None:
                del self._q(d.queue).leases[d.message_id]
            elif self._exists(d):
                lost.append(d)  # leased again, or waiting for its next delivery
        return lost

    def _exists(self, d: Delivery) -> bool:
        """Whether the message is still in the queue (a slow scan: lost leases only)."""
        q = self._q(d.queue)
        return (
            d.message_id in q.leases
            or any(m.id == d.message_id for m in q.ready)
            or any(m.id == d.message_id for _, _, m in q.delayed)
        )

    def _not_held(self, delivery: Delivery) -> bool:
        """True if ``delivery`` was settled by a retry or dead letter applied already (the
        call is re-sent after its reply was lost: done); raises `LeaseLost` if it is not
        held for another reason; False if it is held."""
        if self._owned(delivery) is not None:
            return False
        if delivery.token in self._applied:
            return True
        raise LeaseLost(f"{delivery!r} is no longer leased by this worker")

    def _applied_now(self, delivery: Delivery) -> None:
        self._applied[delivery.token] = None
        if len(self._applied) > APPLIED_KEPT:
            self._applied.popitem(last=False)

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        if self._not_held(delivery):
            return
        q = self._q(delivery.queue)
        del q.leases[delivery.message_id]
        self._applied_now(delivery)
        self._add(q, _Message(str(next(self._ids)), bytes(body)), delay)
        q.notify()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        for d in reversed(deliveries):
            lease = self._owned(d)
            if lease is None:
                continue
            q = self._q(d.queue)
            del q.leases[d.message_id]
            # A hand-back at shutdown is not a failed delivery: don't count it as one.
            lease.message.count -= 1
            q.ready.appendleft(lease.message)
            q.notify()

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        lost = []
        deadline = self._clock() + lease
        for d in deliveries:
            held = self._owned(d)
            if held is None:
                lost.append(d)
                continue
            held.deadline = deadline
            heapq.heappush(self._q(d.queue).expiries, (deadline, held.token, d.message_id))
        return lost

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        if self._not_held(delivery):
            return
        q = self._q(delivery.queue)
        self._applied_now(delivery)
        entry_id = str(next(self._ids))
        q.dead[entry_id] = replace(
            letter,
            entry_id=entry_id,
            queue=delivery.queue,
            body=delivery.body,
            dead_at=letter.dead_at or time.time(),
        )
        del q.leases[delivery.message_id]

    async def depth(self, queue: str) -> QueueDepth:
        q = self._q(queue)
        self._promote(q)
        return QueueDepth(
            ready=len(q.ready), in_flight=len(q.leases), delayed=len(q.delayed), dead=len(q.dead)
        )

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        return list(itertools.islice(self._q(queue).dead.values(), limit))

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        dead = self._q(queue).dead
        if entry_ids is None:
            n = len(dead)
            dead.clear()
            return n
        return sum(dead.pop(i, None) is not None for i in entry_ids)

    async def aclose(self) -> None:
        """Nothing to close; the queues stay, so a closed app can be reopened in-process."""
