"""RabbitMQ broker (AMQP 0-9-1, through aio-pika's protocol layer ``aiormq``).

``amqp://user:pass@host:5672/vhost?queue_type=classic&prefetch=N&publish_timeout=S``
(``amqps://`` for TLS, certificates verified). Other query parameters (``heartbeat``,
...) go to the client.

Two connections: one only publishes, the other consumes, acks and declares. RabbitMQ's
memory and disk alarms block a connection that publishes (it stops reading it), so acks
and a shutdown never wait behind a blocked publish. Every call has a deadline by purpose
(``*_TIMEOUT``, ``publish_timeout``); client errors are mapped in one table, `_RULES`.

Queues, all durable and declared on first use: ``<queue>`` (the jobs; classic, or quorum
with ``queue_type=quorum``), ``<queue>.dead`` (the DLQ, same type) and, lazily, one
``<queue>.delay.<ms>.quorum`` per delay (delays rounded to two significant digits): its
messages expire after ``<ms>`` and dead-letter back into ``<queue>`` at least once (kept
until ``<queue>`` confirms them), and the queue itself expires ten minutes after its last
use. With ``delay_queues=classic``, or on RabbitMQ before 3.10, they are classic
``<queue>.delay.<ms>`` queues, which dead-letter at most once (a refused message is
dropped).

A worker consumes each queue with one consumer whose prefetch is ``prefetch``, or by
default the worker's capacity (the first `fetch`'s ``max_messages``), so RabbitMQ never
pushes more than the worker can run; `fetch` hands out what the consumer buffered.

Leases: RabbitMQ keeps a delivery with its channel until it is acked or the channel
closes (then it is requeued). This broker adds the visibility timeout on top: a delivery
not extended within it is nacked back to the queue and reported lost, as on the other
brokers. RabbitMQ's own ``consumer_timeout`` (30 minutes by default) closes a channel
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
import heapq
import itertools
import logging
import math
import re
import reprlib
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
from aiormq import exceptions as mqexc
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp import commands as spec

from ..errors import AioworkersError, BrokerUnavailable, ConfigError, LeaseLost, redact
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth

COUNT = "x-aioworkers-deliveries"  # deliveries counted before this copy of the message
ENTRY = "x-aioworkers-entry"  # a DLQ entry's id
DELAY_EXPIRES_MS = 600_000  # a delay queue unused this long (beyond its TTL) is deleted
REDECLARE_AFTER = 300.0  # redeclare a delay queue before publishing if older than this
# Deadlines, by purpose. Every call to RabbitMQ has one; running out is BrokerUnavailable.
CONNECT_TIMEOUT = 10.0  # TCP, TLS and the AMQP handshake; opening a channel
RPC_TIMEOUT = 10.0  # a method RabbitMQ answers at once unless in trouble (declare, consume)
PUBLISH_TIMEOUT = 10.0  # default ``publish_timeout``: one publish call, confirms included
HAND_BACK_TIMEOUT = 2.0  # a shutdown's republish of unstarted jobs (else: nacked back)
SETTLE_TIMEOUT = 5.0  # acks and nacks written to the socket
CLOSE_TIMEOUT = 5.0  # a connection's close handshake
_OWN_PARAMS = ("queue_type", "prefetch", "publish_timeout", "delay_queues")
_CHUNK = 1000  # publishes awaiting their confirms at once
_PERSISTENT = 2
MAX_COUNT = 1_000_000  # far above any poison limit: a larger count was not written by us
_NUMERIC_FACTS = ("attempts", "dead_at")
QUORUM_DELAYS_SINCE = (3, 10)  # message TTL and at-least-once dead-lettering on quorum queues
_QUORUM_DELAY = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",  # required by at-least-once; there is no length limit
}
log = logging.getLogger("aioworkers")
_SHOWN = reprlib.Repr()  # a header's value shown in an error: short, one line
_SHOWN.maxstring = _SHOWN.maxother = 40


@dataclass(eq=False, slots=True)
class _Held:
    """A delivery `fetch` handed out: ours while in ``_held`` and its channel lives."""

    queue: str
    gen: int
    message: DeliveredMessage
    count: int
    deadline: float
    acked: bool = False  # by this process: a repeated ack of it is not a lost lease


@dataclass(eq=False, slots=True)
class _Consumer:
    queue: str
    gen: int
    tag: str = ""
    active: bool = True
    buffer: deque[tuple[DeliveredMessage, int]] = field(default_factory=deque)  # (m, count)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


# Client errors -> ours, first match wins: (types, text the error or its cause must hold,
# our error, what to fix). ConfigError for refusals that retrying can't cure; everything
# else the client raises is transient: BrokerUnavailable, back off and try again.
_Rule = tuple[
    type[BaseException] | tuple[type[BaseException], ...], str, type[AioworkersError], str
]
_RULES: tuple[_Rule, ...] = (
    (
        ssl.SSLCertVerificationError,
        "",
        ConfigError,
        "the server's TLS certificate is not trusted: fix it, or give its CA as cafile=",
    ),
    (
        (mqexc.ProbableAuthenticationError, mqexc.AuthenticationError),
        "",
        ConfigError,
        "RabbitMQ refused the login: check the user and password in the URL",
    ),
    (
        mqexc.ChannelAccessRefused,
        "",
        ConfigError,
        "RabbitMQ refused the user this: grant it configure, write and read permissions "
        "on these queues (rabbitmqctl set_permissions)",
    ),
    # Transient, with a hint: the first also comes from a proxy whose RabbitMQ is down,
    # the second from a connection limit as well as from a missing vhost.
    (
        mqexc.IncompatibleProtocolError,
        "",
        BrokerUnavailable,
        "no AMQP handshake (is this RabbitMQ's port?)",
    ),
    (
        mqexc.InvalidFrameError,
        "Connection.OpenOk",
        BrokerUnavailable,
        "RabbitMQ refused to open the vhost (does it exist, may the user use it, "
        "is a connection limit reached?)",
    ),
    ((mqexc.AMQPError, mqexc.ChannelInvalidStateError, OSError), "", BrokerUnavailable, ""),
    (RuntimeError, "closed", BrokerUnavailable, ""),
)


def _detail(exc: BaseException) -> str:
    text = " ".join(str(a) for a in exc.args) if exc.args else ""
    return f"{type(exc).__name__}: {redact(text)[:300]}" if text else type(exc).__name__


def _map_error(what: str, exc: BaseException) -> AioworkersError | None:
    """Our error for a client error ``exc`` (by `_RULES`), or None to let it through."""
    if isinstance(exc, AioworkersError):
        return None
    for types, marker, kind, fix in _RULES:
        for candidate in (exc, exc.__cause__):
            if isinstance(candidate, types) and marker in str(candidate):
                detail = _detail(exc)
                return kind(f"amqp: {what}: {fix} ({detail})" if fix else f"amqp: {what}: {detail}")
    return None


@asynccontextmanager
async def _io(what: str, seconds: float) -> AsyncIterator[None]:
    """The I/O boundary: ``what`` gets ``seconds``, and client errors are mapped."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except Exception as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():
            raise BrokerUnavailable(f"amqp: {what}: timed out after {seconds:g}s") from exc
        mapped = _map_error(what, exc)
        if mapped is None:
            raise
        raise mapped from exc


def _refused(name: str, arguments: dict[str, Any], text: str) -> str:
    """What to fix when RabbitMQ refuses to declare queue ``name`` (PRECONDITION_FAILED)."""
    if "inequivalent arg" not in text:
        return f"amqp: RabbitMQ refused queue {name!r} with arguments {arguments}: {text}"
    # A delay queue is declared again on its next use; the others hold jobs.
    fix = "" if "x-message-ttl" in arguments else " or set queue_type= to match it"
    return (
        f"amqp: queue {name!r} already exists with other arguments than "
        f"{arguments or 'none (a classic queue)'}: delete it "
        f"(rabbitmqctl delete_queue {name}){fix} ({text})"
    )


def _headers(message: DeliveredMessage) -> dict[str, Any]:
    return dict(message.header.properties.headers or {})


class _BadHeader(Exception):
    """A header this broker reads holds something it never writes."""


def _counted(headers: dict[str, Any], name: str) -> int:
    """The delivery count in header ``name`` (0 if absent); raises `_BadHeader` unless it
    is a whole number in 0..MAX_COUNT: a negative one would defeat the poison limit."""
    value = headers.get(name, 0)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise _BadHeader(f"header {name} is not a delivery count: {_SHOWN.repr(value)}")
    return value


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None
    return tag


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bucket(delay: float) -> int:
    """Delay in ms, rounded to two significant digits: a bounded number of delay queues."""
    ms = max(1, round(delay * 1000))
    if ms < 100:
        return ms
    unit = 10 ** (len(str(ms)) - 2)
    return int(round(ms / unit) * unit)


class AmqpBroker:
    """See the module docstring for the URL, the queues and the semantics."""

    messaging_system = "rabbitmq"

    def __init__(self, url: str, *, visibility_timeout: float | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.queue_type = query.get("queue_type", "classic")
        if self.queue_type not in ("classic", "quorum"):
            raise ConfigError(
                f"amqp URL: queue_type must be 'classic' or 'quorum', got {self.queue_type!r}"
            )
        try:
            self.prefetch = int(query["prefetch"]) if "prefetch" in query else None
        except ValueError:
            raise ConfigError("amqp URL: prefetch must be a whole number") from None
        if self.prefetch is not None and self.prefetch < 1:
            raise ConfigError("amqp URL: prefetch must be >= 1")
        try:
            self.publish_timeout = float(query.get("publish_timeout", PUBLISH_TIMEOUT))
        except ValueError:
            raise ConfigError("amqp URL: publish_timeout must be a number of seconds") from None
        if not 0 < self.publish_timeout < math.inf:
            raise ConfigError("amqp URL: publish_timeout must be > 0 seconds")
        self._delay_option = query.get("delay_queues")
        if self._delay_option not in (None, "quorum", "classic"):
            raise ConfigError(
                f"amqp URL: delay_queues must be 'quorum' or 'classic', got {self._delay_option!r}"
            )
        self._delay_type = self._delay_option if self._delay_option == "classic" else None
        client_query = urlencode({k: v for k, v in query.items() if k not in _OWN_PARAMS})
        self._url = urlunsplit(parts._replace(query=client_query))
        self._host = f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        # Two connections: RabbitMQ's resource alarms block a connection that publishes
        # (it stops reading it), so acks, consuming and declarations never share one with
        # publishes.
        self._conn: AbstractConnection | None = None  # consuming, acks, declarations
        self._pconn: AbstractConnection | None = None  # publishing only
        self._connecting = {"main": asyncio.Lock(), "publish": asyncio.Lock()}
        self._con: AbstractChannel | None = None  # consuming: acks and nacks go here
        self._ctl: AbstractChannel | None = None  # declarations
        self._probe: AbstractChannel | None = None  # passive declares (a miss closes it)
        self._pub: AbstractChannel | None = None  # publisher confirms (on ``_pconn``)
        self._gen = 0  # the consuming channel's generation
        self._lock = asyncio.Lock()
        self._consumers: dict[str, _Consumer] = {}
        self._prefetches: dict[str, int] = {}
        self._held: set[_Held] = set()
        self._expiries: list[tuple[float, int, _Held]] = []
        self._seq = itertools.count()
        self._declared: set[str] = set()
        self._delays: dict[str, dict[str, float]] = {}  # queue -> delay queue -> declared at
        self._tasks: set[asyncio.Task[None]] = set()
        self._recounting: dict[str, asyncio.Event] = {}  # message id -> original acked
        self.known_queues: set[str] = set()  # every queue this broker declared

    def __repr__(self) -> str:
        return f"<AmqpBroker {self._host} {self.queue_type} held={len(self._held)}>"

    # -- connection -------------------------------------------------------------------------

    def _alive(self, ch: AbstractChannel | None) -> bool:
        return ch is not None and not ch.is_closed

    async def _connect(self, purpose: str) -> AbstractConnection:
        async with _io("connect", CONNECT_TIMEOUT):
            # Named for `rabbitmqctl list_connections` and the management UI.
            return await aiormq.connect(
                self._url, client_properties={"connection_name": f"aioworkers {purpose}"}
            )

    async def _connection(self) -> AbstractConnection:
        """The main connection: consuming, acks, declarations; it never publishes."""
        conn = self._conn
        if conn is None or conn.is_closed:
            async with self._connecting["main"]:
                if self._conn is None or self._conn.is_closed:
                    self._conn = None
                    self._conn = await self._connect("main")
                conn = self._conn
        return conn

    async def _publishing(self) -> AbstractConnection:
        conn = self._pconn
        if conn is None or conn.is_closed:
            async with self._connecting["publish"]:
                if self._pconn is None or self._pconn.is_closed:
                    self._pconn = None
                    self._pconn = await self._connect("publish")
                conn = self._pconn
        return conn

    async def _channel(
        self, conn: AbstractConnection, *, confirms: bool = False
    ) -> AbstractChannel:
        async with _io("open a channel", CONNECT_TIMEOUT):
            return await conn.channel(publisher_confirms=confirms, on_return_raises=confirms)

    async def _publisher(self) -> AbstractChannel:
        if not self._alive(self._pub):
            self._pub = await self._channel(await self._publishing(), confirms=True)
        assert self._pub is not None
        return self._pub

    async def _control(self) -> AbstractChannel:
        if not self._alive(self._ctl):
            self._ctl = await self._channel(await self._connection())
        assert self._ctl is not None
        return self._ctl

    async def _consuming(self) -> AbstractChannel:
        if not self._alive(self._con):
            ch = await self._channel(await self._connection())
            self._gen += 1
            self._con = ch
            # Deliveries of the old channel were requeued by RabbitMQ: none is ours now.
            self._held.clear()
            self._expiries.clear()
            for c in self._consumers.values():
                c.active = False
                c.arrived.set()
            self._consumers.clear()
            gen = self._gen
            ch.closing.add_done_callback(lambda _: self._lost(gen))
        assert self._con is not None
        return self._con

    def _lost(self, gen: int) -> None:
        # Wake every fetch waiting on this channel: it raises BrokerUnavailable.
        for c in list(self._consumers.values()):
            if c.gen == gen:
                c.arrived.set()

    def _owned(self, d: Delivery) -> _Held | None:
        h = d.token
        if not isinstance(h, _Held) or h not in self._held:
            return None
        if h.gen != self._gen or not self._alive(self._con):
            return None
        return h

    # -- declarations -----------------------------------------------------------------------

    def _arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    async def _declare(self, name: str, arguments: dict[str, Any]) -> spec.Queue.DeclareOk:
        ch = await self._control()
        try:
            async with _io(f"declare {name!r}", RPC_TIMEOUT):
                try:
                    ok = await ch.queue_declare(name, durable=True, arguments=arguments)
                except mqexc.ChannelPreconditionFailed as exc:
                    text = _text(exc.args[0] if exc.args else exc) or ""
                    raise ConfigError(_refused(name, arguments, text)) from None
        finally:
            if ch.is_closed:
                self._ctl = None
        self.known_queues.add(name)
        return ok

    async def _ensure(self, queue: str) -> None:
        if queue in self._declared:
            return
        await self._declare(queue, self._arguments())
        await self._declare(f"{queue}.dead", self._arguments())
        self._declared.add(queue)

    async def _delay_queue(self, queue: str, delay: float) -> str:
        ms = _bucket(delay)
        quorum = await self._delays_type() == "quorum"
        # Named apart: an existing queue's arguments can't change, and a classic delay
        # queue of an older version may still be there (it drains and expires on its own).
        name = f"{queue}.delay.{ms}.quorum" if quorum else f"{queue}.delay.{ms}"
        known = self._delays.setdefault(queue, {})
        # Redeclared now and then: a declare restarts the x-expires clock, a publish doesn't.
        if time.monotonic() - known.get(name, -REDECLARE_AFTER) >= REDECLARE_AFTER:
            arguments: dict[str, Any] = {
                "x-message-ttl": ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
                "x-expires": ms + DELAY_EXPIRES_MS,
            }
            await self._declare(name, arguments | _QUORUM_DELAY if quorum else arguments)
            known[name] = time.monotonic()
        return name

    async def _delays_type(self) -> str:
        """``quorum`` where RabbitMQ can (3.10+): an expired message is dead-lettered back
        at least once, kept until its queue confirms it; a classic queue drops it if the
        queue refuses it then (full, or unavailable)."""
        if self._delay_type is None:
            conn = await self._connection()
            text = str(conn.server_properties.get("version") or "")
            found = re.match(r"(\d+)\.(\d+)", text)
            if found is None or (int(found[1]), int(found[2])) >= QUORUM_DELAYS_SINCE:
                self._delay_type = "quorum"
            elif self._delay_option == "quorum":
                raise ConfigError(
                    f"amqp: delay_queues=quorum needs RabbitMQ 3.10 or later, this is "
                    f"{text}: upgrade it, or set delay_queues=classic"
                )
            else:
                log.warning(
                    "RabbitMQ %s is older than 3.10: delayed jobs and retries go through "
                    "classic queues, which dead-letter them back at most once",
                    text[:40],
                )
                self._delay_type = "classic"
        return self._delay_type

    async def _count(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue; (0, 0) if it does not exist."""
        if not self._alive(self._probe):
            self._probe = await self._channel(await self._connection())
        assert self._probe is not None
        async with _io(f"count {name!r}", RPC_TIMEOUT):
            try:
                ok = await self._probe.queue_declare(name, passive=True)
            except mqexc.ChannelNotFoundEntity:
                self._probe = None
                return 0, 0
        return int(ok.message_count or 0), int(ok.consumer_count or 0)

    # -- producer ---------------------------------------------------------------------------

    async def _send(
        self,
        routing_key: str,
        messages: Sequence[tuple[bytes, Any]],
        *,
        within: float | None = None,
    ) -> None:
        """Publish persistent messages and wait for every confirm, ``within`` seconds
        (``publish_timeout`` by default). One that timed out may still be enqueued."""
        seconds = self.publish_timeout if within is None else within
        async with _io(f"publish to {routing_key!r}", seconds):
            ch = await self._publisher()
            # Blocked by a resource alarm: wait here, not with frames queued behind the
            # block (those would still be enqueued long after this call gave up).
            await ch.connection.ready()
            for start in range(0, len(messages), _CHUNK):
                chunk = messages[start : start + _CHUNK]
                try:
                    confirms = await asyncio.gather(
                        *(
                            ch.basic_publish(
                                body, routing_key=routing_key, properties=props, mandatory=True
                            )
                            for body, props in chunk
                        )
                    )
                except mqexc.PublishError as exc:
                    # Unroutable: the queue was deleted behind our back. Declare it again.
                    self._declared.clear()
                    self._delays.clear()
                    raise BrokerUnavailable(f"amqp: {routing_key!r} is gone: {exc}") from None
                if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
                    raise BrokerUnavailable(
                        f"amqp: RabbitMQ did not confirm a publish to {routing_key!r}"
                    )

    @staticmethod
    def _new(body: bytes, headers: dict[str, Any] | None = None) -> tuple[bytes, Any]:
        props = spec.Basic.Properties(
            delivery_mode=_PERSISTENT, message_id=uuid.uuid4().hex, headers=headers
        )
        return bytes(body), props

    async def _route(self, queue: str, delay: float) -> str:
        await self._ensure(queue)
        return await self._delay_queue(queue, delay) if delay > 0 else queue

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        messages = [self._new(b) for b in bodies]
        try:
            await self._send(await self._route(queue, delay), messages)
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise  # a slow or blocked RabbitMQ: trying again would double the wait
            # Once more on a fresh channel (and connection, if that is what died): a
            # connection RabbitMQ dropped is often only noticed on first use.
            self._pub = None
            await self._send(await self._route(queue, delay), messages)

    # -- consumer ---------------------------------------------------------------------------

    def _live(self, c: _Consumer | None) -> bool:
        ch = self._con
        # RabbitMQ cancels a consumer itself when its queue is deleted (or a quorum
        # queue's leader moves): the client then forgets the tag.
        return (
            c is not None
            and c.gen == self._gen
            and ch is not None
            and not ch.is_closed
            and c.tag in getattr(ch, "consumers", (c.tag,))
        )

    async def _consumer(self, queue: str, max_messages: int) -> _Consumer:
        c = self._consumers.get(queue)
        if c is not None and self._live(c):
            return c
        async with self._lock:
            c = self._consumers.get(queue)
            if c is not None and self._live(c):
                return c
            if c is not None and c.gen == self._gen:
                # Cancelled by the server: hand back its buffer, declare again.
                await self.stop_fetching(queue)
                self._declared.discard(queue)
            try:
                return await self._subscribe(queue, max_messages)
            except BrokerUnavailable:
                self._declared.discard(queue)  # the queue may be gone: declare it again
                raise

    async def _subscribe(self, queue: str, max_messages: int) -> _Consumer:
        await self._ensure(queue)
        ch = await self._consuming()
        c = _Consumer(queue, self._gen)
        prefetch = self.prefetch or self._prefetches.setdefault(queue, max(1, max_messages))
        async with _io(f"consume {queue!r}", RPC_TIMEOUT):
            await ch.basic_qos(prefetch_count=prefetch)
            ok = await ch.basic_consume(queue, self._on_message(c))
        c.tag = str(ok.consumer_tag)
        self._consumers[queue] = c
        # aio-pika's own re-consume has left queues with no consumer at all: check.
        _, consumers = await self._count(queue)
        if consumers < 1:
            raise BrokerUnavailable(f"amqp: RabbitMQ reports no consumer on {queue!r}")
        return c

    def _on_message(self, c: _Consumer) -> Any:
        async def on_message(message: DeliveredMessage) -> None:
            recounting = self._recounting.get(message.header.properties.message_id or "")
            if recounting is not None:
                # The copy a recount published overtook the ack of the original: hand it
                # out only once that ack is sent, or a crash now would requeue both.
                await recounting.wait()
            try:
                count = self._count_of(message)
            except _BadHeader as exc:
                # Never handed out (nor left unsettled): straight to the DLQ.
                self._spawn(self._dead_on_arrival(message, c.queue, c.gen, str(exc)))
                return
            if not c.active:
                # Arrived after stop_fetching cancelled the consumer: hand it back too.
                self._spawn(self._hand_back([(message, count, c.queue)], c.gen))
            elif self.queue_type == "classic" and message.redelivered:
                self._spawn(self._recount(message, count, c.queue, c.gen))
            else:
                c.buffer.append((message, count))
                c.arrived.set()

        return on_message

    def _count_of(self, message: DeliveredMessage) -> int:
        """Deliveries of the message so far, this one included; `_BadHeader` if a count
        header holds something else than a count."""
        headers = _headers(message)
        count = _counted(headers, COUNT) + 1
        if self.queue_type == "quorum":
            count += _counted(headers, "x-delivery-count")
        return count

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recount(self, message: DeliveredMessage, count: int, queue: str, gen: int) -> None:
        """A classic queue redelivered a message its worker never settled: count that
        delivery in a copy, then drop the original."""
        headers = _headers(message)
        headers[COUNT] = count
        props = message.header.properties
        props.headers = headers
        done = asyncio.Event()
        key = props.message_id or ""
        if key:
            self._recounting[key] = done
        try:
            try:
                await self._send(queue, [(message.body, props)])
            except (BrokerUnavailable, ConfigError):
                await asyncio.sleep(1.0)  # let the next redelivery try again, not at once
                await self._settle_raw(message, gen, requeue=True)
                return
            await self._settle_raw(message, gen, requeue=None)
        finally:
            if self._recounting.get(key) is done:
                del self._recounting[key]
            done.set()

    async def _dead_on_arrival(
        self, message: DeliveredMessage, queue: str, gen: int, why: str
    ) -> None:
        """Dead-letter a message whose headers can't be read (reason ``schema_error``,
        as for a body that fails the envelope), then ack it."""
        message_id = _printable(message.header.properties.message_id or f"{gen}.{_tag(message)}")
        letter = DeadLetter(
            id=message_id,
            task=None,
            reason="schema_error",
            error=f"DecodeError: {why}",
            error_type="DecodeError",
            attempts=1,
            queue=queue,
        )
        try:
            await self._ensure(queue)
            await self._send(f"{queue}.dead", [self._letter(message.body, letter)])
        except (BrokerUnavailable, ConfigError):
            await asyncio.sleep(1.0)  # let the next delivery try again, not at once
            await self._settle_raw(message, gen, requeue=True)
            return
        await self._settle_raw(message, gen, requeue=None)

    async def _settle_raw(
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
        ch = self._con
        if gen != self._gen or ch is None or ch.is_closed:
            return False  # RabbitMQ requeued it with its channel: never settle it on another
        try:
            async with asyncio.timeout(within):
                if requeue is None:
                    await ch.basic_ack(_tag(message), wait=wait)
                else:
                    await ch.basic_nack(_tag(message), requeue=requeue, wait=wait)
        except (mqexc.AMQPError, mqexc.ChannelInvalidStateError, OSError, RuntimeError):
            return False  # TimeoutError included (an OSError)
        return True

    async def _hand_back(
        self, items: Sequence[tuple[DeliveredMessage, int, str]], gen: int
    ) -> None:
        """Make messages visible again at once without counting this delivery: publish a
        copy carrying the count so far, then ack the original."""
        by_queue: dict[str, list[DeliveredMessage]] = {}
        for message, count, queue in items:
            props = message.header.properties
            headers = _headers(message)
            headers.pop("x-delivery-count", None)
            headers[COUNT] = count - 1
            props.headers = headers
            by_queue.setdefault(queue, []).append(message)
        # Bounded tighter than a publish: this runs at shutdown, and nacking them back
        # instead (counted as a delivery on classic queues) is as safe.
        within = min(self.publish_timeout, HAND_BACK_TIMEOUT)
        for queue, messages in by_queue.items():
            try:
                copies = [(m.body, m.header.properties) for m in messages]
                await self._send(queue, copies, within=within)
            except (BrokerUnavailable, ConfigError):
                requeue: bool | None = True
            else:
                requeue = None
            for message in messages:
                await self._settle_raw(message, gen, requeue=requeue)

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        lease = self._lease if lease is None else lease
        c = await self._consumer(queue, max_messages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            if not self._live(c):
                raise BrokerUnavailable(f"amqp: the consumer of {queue!r} is gone")
            await self._expire()
            if c.buffer:
                return self._take(c, max_messages, lease)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if self._expiries:
                # Wake for the next lease to run out, too.
                remaining = min(remaining, max(self._expiries[0][0] - time.monotonic(), 0.001))
            c.arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await c.arrived.wait()

    def _take(self, c: _Consumer, max_messages: int, lease: float) -> list[Delivery]:
        # Synchronous: a cancelled fetch never loses a buffered message.
        out: list[Delivery] = []
        deadline = time.monotonic() + lease
        while c.buffer and len(out) < max_messages:
            message, count = c.buffer.popleft()
            h = _Held(c.queue, c.gen, message, count, deadline)
            self._held.add(h)
            heapq.heappush(self._expiries, (deadline, next(self._seq), h))
            message_id = message.header.properties.message_id or f"{c.gen}.{_tag(message)}"
            out.append(Delivery(c.queue, message_id, message.body, h.count, h))
        return out

    async def _expire(self) -> None:
        """Deliveries not extended within the visibility timeout go back to the queue."""
        now = time.monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            _, _, h = heapq.heappop(self._expiries)
            if h in self._held and h.deadline <= now:
                self._held.discard(h)
                await self._settle_raw(h.message, h.gen, requeue=True)

    async def stop_fetching(self, queue: str) -> None:
        c = self._consumers.pop(queue, None)
        if c is None:
            return
        c.active = False
        c.arrived.set()
        ch = self._con
        if c.gen == self._gen and ch is not None and not ch.is_closed:
            # If the cancel fails, what still arrives is handed back by `on_message`.
            with contextlib.suppress(BrokerUnavailable):
                async with _io(f"cancel the consumer of {queue!r}", RPC_TIMEOUT):
                    await ch.basic_cancel(c.tag)
        items = [(m, count, queue) for m, count in c.buffer]
        c.buffer.clear()
        if items:
            await self._hand_back(items, c.gen)

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        owned: list[tuple[Delivery, _Held]] = []
        for d in deliveries:
            h = self._owned(d)
            if h is not None:
                owned.append((d, h))
            elif not (isinstance(d.token, _Held) and d.token.acked):
                lost.append(d)
        written = True
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):  # one deadline for the batch
                for i, (_, h) in enumerate(owned):
                    self._held.discard(h)
                    h.acked = True
                    # One basic.ack per delivery (never multiple=True: an earlier tag on
                    # this channel may still be running); only the last waits for the write.
                    written = await self._settle_raw(
                        h.message, h.gen, requeue=None, wait=i == len(owned) - 1, within=None
                    )
        except TimeoutError:
            written = False
        if not written:
            # Frames go out in order: the last one written means all were. If it was not,
            # the channel closed under the batch and RabbitMQ requeues what it held.
            lost.extend(d for d, _ in owned)
        return lost

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        await self._expire()
        lost = []
        deadline = time.monotonic() + lease
        for d in deliveries:
            h = self._owned(d)
            if h is None:
                lost.append(d)
                continue
            h.deadline = deadline
            heapq.heappush(self._expiries, (deadline, next(self._seq), h))
        return lost

    def _must_own(self, d: Delivery) -> _Held:
        h = self._owned(d)
        if h is None:
            raise LeaseLost(f"{d!r} is no longer held by this worker (its channel closed)")
        return h

    async def _replace(self, h: _Held, routing_key: str, message: tuple[bytes, Any]) -> None:
        await self._send(routing_key, [message])
        # Published (confirmed) first: a crash here leaves a duplicate, never a loss.
        if h in self._held:
            self._held.discard(h)
            await self._settle_raw(h.message, h.gen, requeue=None)

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        h = self._must_own(delivery)
        routing_key = await self._route(delivery.queue, delay)
        await self._replace(h, routing_key, self._new(body))

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        owned = [(d, h) for d in deliveries if (h := self._owned(d)) is not None]
        for _, h in owned:
            self._held.discard(h)
        if owned:
            await self._hand_back([(h.message, d.count, h.queue) for d, h in owned], self._gen)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        h = self._must_own(delivery)
        await self._ensure(delivery.queue)
        await self._replace(h, f"{delivery.queue}.dead", self._letter(delivery.body, letter))

    def _letter(self, body: bytes, letter: DeadLetter) -> tuple[bytes, Any]:
        headers: dict[str, Any] = {ENTRY: uuid.uuid4().hex, **letter.facts()}
        # As text: the AMQP float header is single precision.
        headers["dead_at"] = repr(headers["dead_at"])
        return self._new(body, headers)

    # -- introspection ----------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        ready, _ = await self._count(queue)
        c = self._consumers.get(queue)
        if c is not None and c.gen == self._gen:
            ready += len(c.buffer)
        in_flight = sum(1 for h in self._held if h.queue == queue and h.gen == self._gen)
        delayed = 0
        for name in self._delays.get(queue, {}):
            delayed += (await self._count(name))[0]
        dead, _ = await self._count(f"{queue}.dead")
        return QueueDepth(ready=ready, in_flight=in_flight, delayed=delayed, dead=dead)

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[AbstractChannel]:
        """A channel of its own: closing it hands back, in place, whatever it got."""
        ch = await self._channel(await self._connection())
        try:
            yield ch
        finally:
            with contextlib.suppress(BrokerUnavailable):
                async with _io("close a channel", CLOSE_TIMEOUT):
                    await ch.close()

    async def _get_dead(
        self, ch: AbstractChannel, queue: str, limit: int | None
    ) -> list[DeliveredMessage]:
        got: list[DeliveredMessage] = []
        while limit is None or len(got) < limit:
            async with _io("read the DLQ", RPC_TIMEOUT):  # each get: the DLQ may be long
                try:
                    message = await ch.basic_get(f"{queue}.dead")
                except mqexc.ChannelNotFoundEntity:
                    break
            if not isinstance(message.delivery, spec.Basic.GetOk):
                break
            got.append(message)
        return got

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        async with self._reader() as ch:
            got = await self._get_dead(ch, queue, limit)
            return [_dead_letter(queue, m) for m in got]

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        if entry_ids is None:
            async with self._reader() as ch, _io("purge the DLQ", RPC_TIMEOUT):
                try:
                    ok = await ch.queue_purge(f"{queue}.dead")
                except mqexc.ChannelNotFoundEntity:
                    return 0
                return int(ok.message_count or 0)
        wanted = set(entry_ids)
        removed = 0
        async with self._reader() as ch:
            for message in await self._get_dead(ch, queue, None):
                if _text(_headers(message).get(ENTRY)) in wanted:
                    async with _io("ack a DLQ entry", SETTLE_TIMEOUT):
                        await ch.basic_ack(_tag(message))
                    removed += 1
        return removed

    async def aclose(self) -> None:
        """Hand back what the consumers buffered, then disconnect."""
        try:
            for queue in list(self._consumers):
                with contextlib.suppress(BrokerUnavailable):
                    await self.stop_fetching(queue)
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=5.0)
        finally:
            conns, self._conn, self._pconn = (self._conn, self._pconn), None, None
            self._con = self._ctl = self._probe = self._pub = None
            await asyncio.gather(*(_close(c) for c in conns if c is not None))


async def _close(conn: AbstractConnection) -> None:
    if conn.is_closed:
        return
    # Bounded: a connection blocked by a resource alarm is not read, so its close is not
    # answered; the client then drops the socket on its own.
    with contextlib.suppress(BrokerUnavailable):
        async with _io("close the connection", CLOSE_TIMEOUT):
            await conn.close()


def _dead_letter(queue: str, message: DeliveredMessage) -> DeadLetter:
    h = _headers(message)
    entry_id = _text(h.get(ENTRY)) or (message.header.properties.message_id or "")

    def fact(name: str) -> str | None:
        text = _text(h.get(name))
        if name in _NUMERIC_FACTS and text is not None:
            # An entry another client wrote must not break listing the DLQ.
            with contextlib.suppress(ValueError):
                if math.isfinite(float(text)):
                    return text
            return None
        return text

    return DeadLetter.from_facts(fact, queue=queue, entry_id=entry_id, body=message.body)
