"""RabbitMQ broker (AMQP 0-9-1, through aio-pika's protocol layer ``aiormq``).

``amqp://user:pass@host:5672/vhost?queue_type=classic&prefetch=N&publish_timeout=S``
(``amqps://`` for TLS, certificates verified). Other query parameters (``heartbeat``,
...) go to the client.

Two connections: one only publishes, the other consumes, acks and declares
(`_amqp_connections`). Every call has a deadline by purpose (``*_TIMEOUT``,
``publish_timeout``); client errors are mapped in one table (`_amqp_errors.RULES`).

Queues, all durable and declared on first use: ``<queue>`` (the jobs; classic, or quorum
with ``queue_type=quorum``), ``<queue>.dead`` (the DLQ, same type) and, lazily, one
``<queue>.delay.<ms>.quorum`` per delay (delays rounded to two significant digits): its
messages expire after ``<ms>`` and dead-letter back into ``<queue>`` at least once (kept
until ``<queue>`` confirms them), and the queue itself expires ten minutes after its last
use (`_amqp_topology`). With ``delay_queues=classic``, or on RabbitMQ before 3.10, they are classic
``<queue>.delay.<ms>`` queues, which dead-letter at most once (a refused message is
dropped).

A worker consumes each queue with one consumer whose prefetch is ``prefetch``, or by
default the worker's capacity (the first `fetch`'s ``max_messages``), so RabbitMQ never
pushes more than the worker can run; `fetch` hands out what the consumer buffered.

Leases: RabbitMQ keeps a delivery with its channel until it is acked or the channel
closes (then it is requeued). This broker adds a lease on top, kept in the kit's
`LeaseTable`: a delivery is leased for the ``lease`` its `fetch` gives, then each `extend`
gives; one not extended within it is nacked back to the queue (when the broker next
fetches or extends) and reported lost, as on the other brokers. RabbitMQ's own
``consumer_timeout`` (30 minutes by default) closes a channel
holding a delivery unacked for longer: jobs that may run longer need a larger
``consumer_timeout`` in ``rabbitmq.conf`` (or per queue with a policy).

Delivery counts (poison protection): each message carries ``x-aioworkers-deliveries``,
the deliveries counted before this copy. On quorum queues RabbitMQ adds
``x-delivery-count``; on classic queues a message that comes back redelivered (its
worker died, or its lease ran out) is republished with the count plus one and the old
copy acked. Handing a message back (release, stop_fetching) republishes it with its
count unchanged, so a shutdown never makes a job look poisonous. A count header holding
anything but a whole number in 0..MAX_COUNT (not ours) sends the message to the DLQ at
once with reason ``schema_error``: it is never handed out, nor left unsettled.

Reconnects: a lost connection or channel makes `fetch` raise `BrokerUnavailable`; the
next `fetch` reconnects and re-creates the consumer (checking RabbitMQ reports it).
Deliveries of a closed channel are never acked on a new one (RabbitMQ would close it):
they are dropped, and `extend` reports them lost; RabbitMQ requeued them already.

Limits: ``depth`` counts as ready what RabbitMQ holds ready plus this broker's buffer,
as in flight only this broker's own deliveries, and as delayed only the delay queues
this broker published to. The DLQ is listed by getting messages and handing them back;
removing entries by id reads the whole DLQ (O(n)).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from . import _amqp_dlq, _amqp_foreign
from ._amqp_connections import Connections, alive
from ._amqp_consumers import Consumer, Consumers
from ._amqp_errors import PUBLISH_TIMEOUT, SETTLE_TIMEOUT
from ._amqp_messages import COUNT, ENTRY, MAX_COUNT, message_id, new
from ._amqp_messages import letter as dlq_message
from ._amqp_publish import Publisher
from ._amqp_topology import Topology
from ._kit import LeaseTable
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth, handed_back

__all__ = ["COUNT", "ENTRY", "MAX_COUNT", "AmqpBroker"]

# A delivery whose nack could not be queued when its lease ran out is tried again after this.
EXPIRE_AGAIN = 1.0

_OWN_PARAMS = ("queue_type", "prefetch", "publish_timeout", "delay_queues")


@dataclass(eq=False, slots=True)
class _Held:
    """A delivery `fetch` handed out: ours while the lease table has it and its channel
    lives."""

    queue: str
    gen: int
    message: DeliveredMessage
    count: int
    acked: bool = False  # by this process: a repeated ack of it is not a lost lease


class AmqpBroker:
    """See the module docstring for the URL, the queues and the semantics."""

    messaging_system = "rabbitmq"

    def __init__(self, url: str, *, visibility_timeout: float | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        queue_type, prefetch, publish_timeout, delays = _options(query)
        client_query = urlencode({k: v for k, v in query.items() if k not in _OWN_PARAMS})
        self._host = f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        self._leases: LeaseTable[_Held] = LeaseTable()
        self._connections = Connections(urlunsplit(parts._replace(query=client_query)))
        self._topology = Topology(self._connections, queue_type=queue_type, delays=delays)
        self._publisher = Publisher(self._connections, self._topology, publish_timeout)
        # A new consuming channel: deliveries of the old one were requeued by RabbitMQ.
        self._consumers_of = Consumers(
            self._connections,
            self._topology,
            self._publisher,
            prefetch=prefetch,
            replaced=self._leases.clear,
        )

    def __repr__(self) -> str:
        return f"<AmqpBroker {self._host} {self.queue_type} held={len(self._leases)}>"

    @property
    def queue_type(self) -> str:
        return self._topology.queue_type

    @property
    def prefetch(self) -> int | None:
        return self._consumers_of.prefetch

    def set_prefetch(self, queue: str, count: int) -> None:
        """How many of ``queue``'s messages RabbitMQ may hand this worker ahead, from its
        consumer's next start (``prefetch=`` given to the broker overrides it)."""
        self._consumers_of.set_prefetch(queue, count)

    @property
    def publish_timeout(self) -> float:
        return self._publisher.timeout

    @property
    def known_queues(self) -> set[str]:
        """Every queue this broker declared."""
        return self._topology.known_queues

    # What tests reach in to (a channel to close, the consumers, a connection to read).
    @property
    def _con(self) -> AbstractChannel | None:
        return self._connections.consumer

    @property
    def _conn(self) -> AbstractConnection | None:
        return self._connections.current

    @property
    def _gen(self) -> int:
        return self._connections.gen

    @property
    def _consumers(self) -> dict[str, Consumer]:
        return self._consumers_of.by_queue

    def _live(self, c: Consumer | None) -> bool:
        return self._consumers_of.live(c)

    async def _connection(self) -> AbstractConnection:
        return await self._connections.main()

    async def _ensure(self, queue: str) -> None:
        await self._topology.ensure(queue)

    def _owned(self, d: Delivery) -> _Held | None:
        h = d.token
        if not isinstance(h, _Held) or not self._leases.owns(h):
            return None
        if h.gen != self._gen or not alive(self._con):
            return None
        return h

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        await self._publisher.publish(queue, bodies, delay=delay)

    # -- consumer ---------------------------------------------------------------------------

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        lease = self._lease if lease is None else lease
        c = await self._consumers_of.get(queue, max_messages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            if not self._consumers_of.live(c):
                raise BrokerUnavailable(f"amqp: the consumer of {queue!r} is gone")
            await self._expire()
            if c.buffer:
                return self._take(c, max_messages, lease)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            expiry = self._leases.next_deadline()
            if expiry is not None:
                # Wake for the next lease to run out, too.
                remaining = min(remaining, max(expiry - loop.time(), 0.001))
            c.arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await c.arrived.wait()

    def _take(self, c: Consumer, max_messages: int, lease: float) -> list[Delivery]:
        # Synchronous: a cancelled fetch never loses a buffered message.
        out: list[Delivery] = []
        while c.buffer and len(out) < max_messages:
            message, count = c.buffer.popleft()
            h = _Held(c.queue, c.gen, message, count)
            self._leases.add(h, lease)
            out.append(Delivery(c.queue, message_id(message, c.gen), message.body, count, h))
        return out

    async def _expire(self) -> None:
        """Deliveries not extended within their lease go back to the queue."""
        expired = self._leases.expired()
        for i, h in enumerate(expired):
            try:
                # Queued, not waited for: a False is then a nack never queued, so it is
                # safe to try again (a frame sent twice would close the channel).
                queued = await self._consumers_of.settle(h.message, h.gen, requeue=True, wait=False)
            except BaseException:
                # Cancelled before their nacks were queued: they keep a lease, so a later
                # call hands them back (else RabbitMQ keeps them until the channel closes).
                for rest in expired[i:]:
                    self._leases.add(rest, EXPIRE_AGAIN)
                raise
            if not queued and h.gen == self._gen and alive(self._con):
                self._leases.add(h, EXPIRE_AGAIN)

    async def stop_fetching(self, queue: str) -> None:
        await self._consumers_of.stop(queue)

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        owned: list[tuple[Delivery, _Held]] = []
        for d in deliveries:
            h = self._owned(d)
            if h is not None:
                owned.append((d, h))
            elif not (isinstance(d.token, _Held) and d.token.acked):
                lost.append(d)
        if not owned:
            return lost
        by_message = {id(h.message): (d, h) for d, h in owned}

        def claim(message: DeliveredMessage) -> bool:
            # Just before its frame is queued: a lease that ran out meanwhile was nacked.
            _, h = by_message[id(message)]
            if not self._leases.settle(h):
                return False
            h.acked = True
            return True

        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):  # one deadline for the batch
                refused, written = await self._consumers_of.ack_many(
                    [h.message for _, h in owned], owned[0][1].gen, claim
                )
        except TimeoutError:
            refused, written = [], False
        if not written:
            # Frames go out in order: the last one written means all were. If it was not,
            # the channel closed under the batch and RabbitMQ requeues what it held, or the
            # connection did not drain: what was not queued keeps its lease, which runs out.
            for _, h in owned:
                h.acked = False  # not known to be: an ack of it again is reported lost
            return lost + [d for d, _ in owned]
        return lost + [by_message[id(m)][0] for m in refused]

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        await self._expire()
        lost = []
        for d in deliveries:
            h = self._owned(d)
            if h is None:
                lost.append(d)
            else:
                self._leases.extend(h, lease)
        return lost

    def _must_own(self, d: Delivery) -> _Held:
        h = self._owned(d)
        if h is None:
            raise LeaseLost(f"{d!r} is no longer held by this worker (its channel closed)")
        return h

    async def _replace(self, h: _Held, routing_key: str, message: tuple[bytes, Any]) -> None:
        await self._publisher.send(routing_key, [message])
        # Published (confirmed) first: a crash here leaves a duplicate, never a loss.
        if self._leases.settle(h):
            await self._consumers_of.settle(h.message, h.gen, requeue=None)

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        h = self._must_own(delivery)
        routing_key = await self._topology.route(delivery.queue, delay)
        await self._replace(h, routing_key, new(body))

    # -- foreign messages (`RawRetry`, consumers' bindings, App.publish): _amqp_foreign ----

    def message_meta(self, delivery: Delivery) -> tuple[str | None, dict[str, Any]]:
        h = delivery.token
        return _amqp_foreign.meta(h.message) if isinstance(h, _Held) else (None, {})

    async def retry_raw(
        self, delivery: Delivery, *, body: bytes, attempt: int, delay: float
    ) -> None:
        h = self._must_own(delivery)
        routing_key = await self._topology.route(delivery.queue, delay)
        await self._replace(h, routing_key, _amqp_foreign.again(h.message, body, attempt))

    async def bind(
        self, queue: str, exchange: str, exchange_type: str, routing_keys: Sequence[str]
    ) -> None:
        """Declare ``exchange`` and bind ``queue`` to it with ``routing_keys``."""
        c, t = self._connections, self._topology
        await _amqp_foreign.bind(c, t, queue, exchange, exchange_type, routing_keys)

    async def publish_to(
        self, exchange: str, routing_key: str, body: bytes, *, headers: dict[str, Any]
    ) -> None:
        """One message to ``exchange`` (`App.publish`), confirmed."""
        timeout = self._publisher.timeout
        await _amqp_foreign.publish_to(
            self._connections, exchange, routing_key, body, headers, timeout
        )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        owned = [(d, h) for d in deliveries if (h := self._owned(d)) is not None]
        for _, h in owned:
            self._leases.settle(h)
        if owned:
            items = [(h.message, handed_back(d), h.queue) for d, h in owned]
            await self._consumers_of.hand_back(items, self._gen)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        h = self._must_own(delivery)
        await self._topology.ensure(delivery.queue)
        await self._replace(h, f"{delivery.queue}.dead", dlq_message(delivery.body, letter))

    # -- introspection ----------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        ready, _ = await self._topology.count(queue)
        c = self._consumers.get(queue)
        if c is not None and c.gen == self._gen:
            ready += len(c.buffer)
        in_flight = sum(1 for h in self._leases if h.queue == queue and h.gen == self._gen)
        delayed = 0
        for name in self._topology.delays.get(queue, {}):
            delayed += (await self._topology.count(name))[0]
        dead, _ = await self._topology.count(f"{queue}.dead")
        return QueueDepth(ready=ready, in_flight=in_flight, delayed=delayed, dead=dead)

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        return await _amqp_dlq.dead_letters(self._connections, queue, limit)

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        return await _amqp_dlq.remove_dead_letters(self._connections, queue, entry_ids)

    async def aclose(self) -> None:
        """Hand back what the consumers buffered, then disconnect."""
        try:
            await self._consumers_of.aclose()
        finally:
            await self._connections.aclose()


def _options(query: dict[str, str]) -> tuple[str, int | None, float, str | None]:
    """``queue_type``, ``prefetch``, ``publish_timeout`` and ``delay_queues`` of the URL."""
    queue_type = query.get("queue_type", "classic")
    if queue_type not in ("classic", "quorum"):
        raise ConfigError(f"amqp URL: queue_type must be 'classic' or 'quorum', got {queue_type!r}")
    try:
        prefetch = int(query["prefetch"]) if "prefetch" in query else None
    except ValueError:
        raise ConfigError("amqp URL: prefetch must be a whole number") from None
    if prefetch is not None and prefetch < 1:
        raise ConfigError("amqp URL: prefetch must be >= 1")
    try:
        publish_timeout = float(query.get("publish_timeout", PUBLISH_TIMEOUT))
    except ValueError:
        raise ConfigError("amqp URL: publish_timeout must be a number of seconds") from None
    if not 0 < publish_timeout < math.inf:
        raise ConfigError("amqp URL: publish_timeout must be > 0 seconds")
    delays = query.get("delay_queues")
    if delays not in (None, "quorum", "classic"):
        raise ConfigError(f"amqp URL: delay_queues must be 'quorum' or 'classic', got {delays!r}")
    return queue_type, prefetch, publish_timeout, delays
