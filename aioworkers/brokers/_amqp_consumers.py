"""The consumers of the RabbitMQ broker, one per queue on the consuming channel, and what
arrives on them: buffered for `AmqpBroker.fetch`, recounted (a classic queue's
redelivery), dead-lettered (unreadable count headers) or handed back (after a stop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiormq import exceptions as mqexc
from aiormq.abc import AbstractChannel, DeliveredMessage

from ..errors import BrokerUnavailable, ConfigError
from ._amqp_connections import Connections
from ._amqp_errors import HAND_BACK_TIMEOUT, RPC_TIMEOUT, SETTLE_TIMEOUT, io
from ._amqp_messages import (
    COUNT,
    BadHeader,
    counted,
    headers,
    letter,
    message_id,
    printable,
    tag,
)
from ._amqp_publish import Publisher
from ._amqp_topology import Topology
from .base import DeadLetter

# How often a settle checks again for room in a connection's write queue (aiormq's holds
# 10 frames; it is full only while the socket does not drain): from 1 ms, doubling to 20.
ROOM_POLL = 0.001
ROOM_POLL_MAX = 0.02


@dataclass(eq=False, slots=True)
class Consumer:
    queue: str
    gen: int
    tag: str = ""
    active: bool = True
    buffer: deque[tuple[DeliveredMessage, int]] = field(default_factory=deque)  # (m, count)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class Consumers:
    """By queue; ``replaced`` runs when the consuming channel is replaced (what the old one
    delivered is requeued by RabbitMQ: none of it is ours any more)."""

    def __init__(
        self,
        connections: Connections,
        topology: Topology,
        publisher: Publisher,
        *,
        prefetch: int | None,
        replaced: Callable[[], None],
    ) -> None:
        self._connections = connections
        self._topology = topology
        self._publisher = publisher
        self.prefetch = prefetch
        self._on_replaced = replaced
        self.by_queue: dict[str, Consumer] = {}
        self._prefetches: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recounting: dict[str, asyncio.Event] = {}  # message id -> original acked
        # The consuming channel's delivery tags not yet settled (nor their frame queued),
        # oldest first: an ack of the oldest ones in one frame (``multiple``) is safe only
        # up to the first tag something else still holds.
        self._unsettled: dict[int, None] = {}

    @property
    def gen(self) -> int:
        return self._connections.gen

    def set_prefetch(self, queue: str, count: int) -> None:
        """The prefetch of ``queue``'s consumer from when it starts (strict priority has
        the earlier queues' messages delivered ahead, so a freed slot finds one here)."""
        self._prefetches[queue] = max(1, count)

    def live(self, c: Consumer | None) -> bool:
        ch = self._connections.consumer
        # RabbitMQ cancels a consumer itself when its queue is deleted (or a quorum
        # queue's leader moves): the client then forgets the tag.
        return (
            c is not None
            and c.gen == self.gen
            and ch is not None
            and not ch.is_closed
            and c.tag in getattr(ch, "consumers", (c.tag,))
        )

    async def get(self, queue: str, max_messages: int) -> Consumer:
        """The consumer of ``queue``, subscribed (again) if it is not live."""
        c = self.by_queue.get(queue)
        if c is not None and self.live(c):
            return c
        async with self._lock:
            c = self.by_queue.get(queue)
            if c is not None and self.live(c):
                return c
            if c is not None and c.gen == self.gen:
                # Cancelled by the server: hand back its buffer, declare again.
                await self.stop(queue)
                self._topology.forget(queue)
            try:
                return await self._subscribe(queue, max_messages)
            except BrokerUnavailable:
                self._topology.forget(queue)  # the queue may be gone: declare it again
                raise

    async def _subscribe(self, queue: str, max_messages: int) -> Consumer:
        await self._topology.ensure(queue)
        ch = await self._connections.consuming(self._replaced)
        c = Consumer(queue, self.gen)
        prefetch = self.prefetch or self._prefetches.setdefault(queue, max(1, max_messages))
        async with io(f"consume {queue!r}", RPC_TIMEOUT):
            await ch.basic_qos(prefetch_count=prefetch)
            ok = await ch.basic_consume(queue, self._on_message(c))
        c.tag = str(ok.consumer_tag)
        self.by_queue[queue] = c
        # aio-pika's own re-consume has left queues with no consumer at all: check.
        _, consumers = await self._topology.count(queue)
        if consumers < 1:
            raise BrokerUnavailable(f"amqp: RabbitMQ reports no consumer on {queue!r}")
        return c

    def _on_message(self, c: Consumer) -> Any:
        async def on_message(message: DeliveredMessage) -> None:
            if c.gen == self.gen:
                # First, before any wait: tags are recorded in the order they arrived.
                self._unsettled[tag(message)] = None
            recounting = self._recounting.get(message.header.properties.message_id or "")
            if recounting is not None:
                # The copy a recount published overtook the ack of the original: hand it
                # out only once that ack is sent, or a crash now would requeue both.
                await recounting.wait()
            try:
                count = self._count_of(message)
            except BadHeader as exc:
                # Never handed out (nor left unsettled): straight to the DLQ.
                self._spawn(self._dead_on_arrival(message, c.queue, c.gen, str(exc)))
                return
            if not c.active:
                # Arrived after stop_fetching cancelled the consumer: hand it back too
                # (never delivered: it carries the deliveries before this one).
                self._spawn(self.hand_back([(message, count - 1, c.queue)], c.gen))
            elif self._topology.queue_type == "classic" and message.redelivered:
                self._spawn(self._recount(message, count, c.queue, c.gen))
            else:
                c.buffer.append((message, count))
                c.arrived.set()

        return on_message

    def _count_of(self, message: DeliveredMessage) -> int:
        """Deliveries of the message so far, this one included; `BadHeader` if a count
        header holds something else than a count."""
        found = headers(message)
        count = counted(found, COUNT) + 1
        if self._topology.queue_type == "quorum":
            count += counted(found, "x-delivery-count")
        return count

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recount(self, message: DeliveredMessage, count: int, queue: str, gen: int) -> None:
        """A classic queue redelivered a message its worker never settled: count that
        delivery in a copy, then drop the original."""
        found = headers(message)
        found[COUNT] = count
        props = message.header.properties
        props.headers = found
        done = asyncio.Event()
        key = props.message_id or ""
        if key:
            self._recounting[key] = done
        try:
            try:
                await self._publisher.send(queue, [(message.body, props)])
            except (BrokerUnavailable, ConfigError):
                await asyncio.sleep(1.0)  # let the next redelivery try again, not at once
                await self.settle(message, gen, requeue=True)
                return
            await self.settle(message, gen, requeue=None)
        finally:
            if self._recounting.get(key) is done:
                del self._recounting[key]
            done.set()

    async def _dead_on_arrival(
        self, message: DeliveredMessage, queue: str, gen: int, why: str
    ) -> None:
        """Dead-letter a message whose headers can't be read (reason ``schema_error``,
        as for a body that fails the envelope), then ack it."""
        dead = DeadLetter(
            id=printable(message_id(message, gen)),
            task=None,
            reason="schema_error",
            error=f"DecodeError: {why}",
            error_type="DecodeError",
            attempts=1,
            queue=queue,
        )
        try:
            await self._topology.ensure(queue)
            await self._publisher.send(f"{queue}.dead", [letter(message.body, dead)])
        except (BrokerUnavailable, ConfigError):
            await asyncio.sleep(1.0)  # let the next delivery try again, not at once
            await self.settle(message, gen, requeue=True)
            return
        await self.settle(message, gen, requeue=None)

    async def settle(
        self,
        message: DeliveredMessage,
        gen: int,
        *,
        requeue: bool | None,
        wait: bool = True,
        within: float | None = SETTLE_TIMEOUT,
    ) -> bool:
        """Ack (``requeue=None``) or nack a message, only on the channel it came from;
        ``wait=False`` queues the frame without waiting for it to be written; ``within``
        None when the caller bounds the time. False if the channel is gone (RabbitMQ requeues
        what it held) or the frame was not written in time."""
        delivery_tag = tag(message)
        try:
            async with asyncio.timeout(within):
                ch = await self._ready(gen)
                if ch is None:
                    return False  # RabbitMQ requeued it with its channel: never on another
                # Queued by the call below without a wait (`_ready`): no longer unsettled.
                self._unsettled.pop(delivery_tag, None)
                if requeue is None:
                    await ch.basic_ack(delivery_tag, wait=wait)
                else:
                    await ch.basic_nack(delivery_tag, requeue=requeue, wait=wait)
        except (mqexc.AMQPError, mqexc.ChannelInvalidStateError, OSError, RuntimeError):
            return False  # TimeoutError included (an OSError)
        return True

    async def ack_many(
        self,
        messages: Sequence[DeliveredMessage],
        gen: int,
        claim: Callable[[DeliveredMessage], bool],
    ) -> tuple[list[DeliveredMessage], bool]:
        """Ack ``messages`` of the consuming channel of generation ``gen``: the oldest
        unsettled deliveries of the channel, as long as they are among them, in one frame
        (``multiple``), the others one frame each. ``claim(message)`` is called just before
        a frame for it is queued: False (its lease was lost meanwhile) leaves it out.
        Returns the messages left out that way, and whether every frame was written (the
        last one is waited for; the caller bounds the time)."""
        pending = {tag(m): m for m in messages}
        refused: list[DeliveredMessage] = []
        waited = True  # for the last frame queued (none yet)
        try:
            while pending:
                ch = await self._ready(gen)
                if ch is None:
                    return refused, False
                frame = self._next_frame(pending, claim, refused)
                if frame is None:
                    continue
                last, multiple = frame
                # Frames of this call reach the socket in order: the last one written
                # means all were. (A claim refused after it leaves it not waited for.)
                waited = not pending
                await ch.basic_ack(last, multiple=multiple, wait=waited)
        except (mqexc.AMQPError, mqexc.ChannelInvalidStateError, OSError, RuntimeError):
            return refused, False
        return refused, waited

    def _next_frame(
        self,
        pending: dict[int, DeliveredMessage],
        claim: Callable[[DeliveredMessage], bool],
        refused: list[DeliveredMessage],
    ) -> tuple[int, bool] | None:
        """The next ack frame of `ack_many`, ``(tag, multiple)``, its tags claimed and taken
        out of ``pending`` and of the unsettled ones; None if it has none (refused).
        Called with nothing waiting between it and the frame's queueing: the unsettled tags
        read here are what RabbitMQ holds when it reads the frame."""
        unsettled = self._unsettled
        covered: list[int] = []
        for t in unsettled:
            if t not in pending:
                break
            if not claim(pending[t]):
                refused.append(pending.pop(t))
                break
            covered.append(t)
        if not covered:
            if not pending:
                return None
            first = min(pending)
            if not claim(pending[first]):
                refused.append(pending.pop(first))
                return None
            covered = [first]
        for t in covered:
            del pending[t]
            unsettled.pop(t, None)
        return covered[-1], len(covered) > 1

    async def _ready(self, gen: int) -> AbstractChannel | None:
        """The consuming channel of generation ``gen`` once its connection takes a frame
        without a wait, or None if that channel is gone. A frame that waited for room could
        be written after its channel closed and a new one took the same number (aiormq
        reuses them): it would settle the new channel's delivery of the same tag."""
        pause = ROOM_POLL
        while True:
            ch = self._connections.consumer
            if gen != self.gen or ch is None or ch.is_closed:
                return None
            if not ch.connection.write_queue.full():
                return ch
            await asyncio.sleep(pause)
            pause = min(pause * 2, ROOM_POLL_MAX)

    async def hand_back(self, items: Sequence[tuple[DeliveredMessage, int, str]], gen: int) -> None:
        """Make messages ``(message, carried count, queue)`` visible again at once without
        counting this delivery: publish a copy carrying the count, then ack the original."""
        by_queue: dict[str, list[DeliveredMessage]] = {}
        for message, carried, queue in items:
            props = message.header.properties
            found = headers(message)
            found.pop("x-delivery-count", None)
            found[COUNT] = carried
            props.headers = found
            by_queue.setdefault(queue, []).append(message)
        # Bounded tighter than a publish: this runs at shutdown, and nacking them back
        # instead (counted as a delivery on classic queues) is as safe.
        within = min(self._publisher.timeout, HAND_BACK_TIMEOUT)
        for queue, messages in by_queue.items():
            try:
                copies = [(m.body, m.header.properties) for m in messages]
                await self._publisher.send(queue, copies, within=within)
            except (BrokerUnavailable, ConfigError):
                requeue: bool | None = True
            else:
                requeue = None
            for message in messages:
                await self.settle(message, gen, requeue=requeue)

    def _replaced(self, gen: int) -> None:
        """A new consuming channel: its consumers are new ones, on it."""
        self._unsettled = {}  # its tags start again at 1
        self._on_replaced()
        for c in self.by_queue.values():
            c.active = False
            c.arrived.set()
        self.by_queue.clear()
        ch = self._connections.consumer
        assert ch is not None
        ch.closing.add_done_callback(lambda _: self._lost(gen))

    def _lost(self, gen: int) -> None:
        # Wake every fetch waiting on this channel: it raises BrokerUnavailable.
        for c in list(self.by_queue.values()):
            if c.gen == gen:
                c.arrived.set()

    async def stop(self, queue: str) -> None:
        """Cancel the consumer of ``queue`` and hand back what it buffered."""
        c = self.by_queue.pop(queue, None)
        if c is None:
            return
        c.active = False
        c.arrived.set()
        ch = self._connections.consumer
        if c.gen == self.gen and ch is not None and not ch.is_closed:
            # If the cancel fails, what still arrives is handed back by `on_message`.
            with contextlib.suppress(BrokerUnavailable):
                async with io(f"cancel the consumer of {queue!r}", RPC_TIMEOUT):
                    await ch.basic_cancel(c.tag)
        # Never delivered: each carries the deliveries before this one.
        items = [(m, count - 1, queue) for m, count in c.buffer]
        c.buffer.clear()
        if items:
            await self.hand_back(items, c.gen)

    async def aclose(self) -> None:
        """Hand back what the consumers buffered; wait (a little) for what they started."""
        for queue in list(self.by_queue):
            with contextlib.suppress(BrokerUnavailable):
                await self.stop(queue)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
