"""Amazon SQS broker (aiobotocore): one SQS queue per aioworkers queue, and a DLQ beside it.

``sqs://?region=eu-west-1&endpoint_url=http://127.0.0.1:9324&create=1&prefix=app-``

- ``region``: the AWS region (default: ``AWS_DEFAULT_REGION``, else ``us-east-1``);
  ``endpoint_url``: another SQS API server (moto, ElasticMQ, a VPC endpoint); ``profile``:
  a named profile. Credentials come from the usual AWS chain (environment, profile, instance
  role) and never from the URL, so they never appear in logs or errors.
- ``create`` (default ``1``): create the queue and its DLQ on first use; ``0`` looks them up
  only. ``prefix``: prepended to every queue name. ``group``: the FIFO MessageGroupId
  (default: the job's task name).

The queue named ``q`` is the SQS queue ``<prefix>q`` and its DLQ ``<prefix>q-dead``
(``q-dead.fifo`` for FIFO queues); if the queue has a redrive policy, its target is the DLQ
instead. Names are resolved to URLs once (GetQueueUrl) and cached.

Leases and fencing: a delivery's token holds its receipt handle, its receive count and a
local deadline (the time the receive or the last extend was *sent*, plus the visibility
timeout). A delivery is ours while that deadline has not passed, this process has not seen
a later receive of the same message, and it was not settled or released. Every ack,
extend, retry, release and dead-letter checks that first. The check is needed: moto
accepts stale receipt handles for delete and change-visibility. Real SQS also refuses to
change the visibility of a message through a stale handle, and `extend` reports such
failures as lost; a stale *delete* may succeed on real SQS, so the local check is the
guarantee on both. What no client can rule out: a worker paused for longer than the lease
*during* one of those calls (after the check) may still delete a message another worker
has received since — at-least-once still holds, and idempotency keys cover the effects.

Delays: DelaySeconds in whole seconds (rounded up), at most 900 s. A longer delay carries
an ``aw-eta`` attribute; a message received before its eta is sent again with the rest of
the delay (and deleted), inside `fetch`. Bodies that are not valid SQS text (bytes that are
not UTF-8, control characters, empty) travel base64-encoded with ``aw-enc=b64``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore import exceptions as bexc  # type: ignore[import-untyped]

from ..envelope import decode
from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from ._sqs_wire import (
    _NOT_SQS_TEXT,
    BASE,
    ENC,
    ETA,
    _attr,
    _attr_value,
    decode_body,
    encode_body,
)
from .base import DeadLetter, Delivery, QueueDepth

log = logging.getLogger("aioworkers")

T = TypeVar("T")

MAX_DELAY = 900  # SQS's limit for DelaySeconds
MAX_WAIT = 20  # SQS's limit for WaitTimeSeconds
MAX_BATCH = 10  # SQS's limit for every *Batch call and for MaxNumberOfMessages
MAX_SIZE = 256 * 1024  # body plus message attributes
DLQ_SCAN_VISIBILITY = 30  # seconds a DLQ listing hides the entries it reads

_TRANSIENT_CODES = {
    "ThrottlingException",
    "Throttling",
    "RequestThrottled",
    "RequestThrottledException",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "KmsThrottled",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
}


@dataclass(eq=False, slots=True)
class Lease:
    """The token of an SQS delivery: the receipt handle and this process's view of it."""

    receipt: str
    receive_count: int
    deadline: float  # time.monotonic() after which the lease may have lapsed
    base: int = 0
    eta: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    settled: bool = False  # acked, retried, released or dead-lettered by us


@dataclass(slots=True)
class _Queue:
    url: str
    dlq_url: str
    fifo: bool
    # message id -> the lease of its current delivery in this process: an older delivery
    # of the same message (its lease lapsed, another fetch got it) is no longer ours.
    held: dict[str, Lease] = field(default_factory=dict)


@asynccontextmanager
async def _mapped(what: str) -> AsyncIterator[None]:
    """Transient client errors become `BrokerUnavailable`: the runtime backs off."""
    try:
        yield
    except bexc.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        transient = code in _TRANSIENT_CODES or "Throttl" in code or "Unavailable" in code
        if transient or (isinstance(status, int) and status >= 500):
            raise BrokerUnavailable(f"sqs {what}: {code}") from exc
        raise
    except (
        bexc.EndpointConnectionError,
        bexc.ConnectionClosedError,
        bexc.ReadTimeoutError,
        bexc.ConnectTimeoutError,
        bexc.HTTPClientError,
        OSError,
    ) as exc:
        raise BrokerUnavailable(f"sqs {what}: {type(exc).__name__}") from exc


def _code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def split_delay(delay: float, *, now_ms: int | None = None) -> tuple[int, int | None]:
    """``(DelaySeconds, eta in epoch ms or None)`` for a delay in seconds: whole seconds,
    rounded up, at most 900; beyond that the eta says when the message is really due."""
    seconds = math.ceil(max(delay, 0.0) - 1e-9)
    if seconds <= MAX_DELAY:
        return seconds, None
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return MAX_DELAY, now + int(delay * 1000)


def group_and_dedup(body: bytes, group: str | None) -> tuple[str, str]:
    """FIFO MessageGroupId (``group``, else the job's task) and deduplication id (the job's
    idempotency key, else its id); bodies that are not envelopes use a hash of the body."""
    digest = hashlib.sha256(body).hexdigest()
    try:
        env = decode(body)
    except Exception:
        return group or "aioworkers", digest
    dedup = env.key if env.key is not None else env.id
    # Ids are limited to 128 characters of [A-Za-z0-9!-~]: hash anything else.
    if len(dedup) > 128 or re.search(r"[^!-~]", dedup):
        dedup = hashlib.sha256(dedup.encode()).hexdigest()
    g = group or env.task
    if len(g) > 128 or re.search(r"[^!-~]", g):
        g = hashlib.sha256(g.encode()).hexdigest()
    return g, dedup


class SqsBroker:
    """``sqs://?region=...&endpoint_url=...&create=1&prefix=...&group=...`` (see module doc)."""

    def __init__(self, url: str, *, visibility_timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        unknown = set(query) - {"region", "endpoint_url", "create", "prefix", "group", "profile"}
        if unknown:
            raise ConfigError(f"sqs URL: unknown parameters {sorted(unknown)}")
        if parts.username or parts.password:
            raise ConfigError("sqs URL: credentials come from the AWS chain, not the URL")
        self.region = query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.endpoint_url = query.get("endpoint_url") or None
        self.profile = query.get("profile") or None
        self.create = query.get("create", "1").lower() not in ("0", "false", "no")
        self.prefix = query.get("prefix", "")
        self.group = query.get("group") or None
        self.visibility_timeout = visibility_timeout
        self._visibility = max(1, math.ceil(visibility_timeout - 1e-9))
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()
        self._queues: dict[str, _Queue] = {}
        self._last_fetched: dict[str, int] = {}  # per queue: how busy the last fetch was
        self._ids = itertools.count()

    def __repr__(self) -> str:
        where = self.endpoint_url or self.region
        return f"<SqsBroker {where} prefix={self.prefix!r} queues={sorted(self._queues)}>"

    # -- connection and queue names -------------------------------------------------------

    async def client(self) -> Any:
        """The aiobotocore SQS client, created on first use on the running loop."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                stack = AsyncExitStack()
                session = get_session()
                if self.profile:
                    session.set_config_variable("profile", self.profile)
                config = AioConfig(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=MAX_WAIT + 10,
                    max_pool_connections=100,
                )
                async with _mapped("connect"):
                    self._client = await stack.enter_async_context(
                        session.create_client(
                            "sqs",
                            region_name=self.region,
                            endpoint_url=self.endpoint_url,
                            config=config,
                        )
                    )
                self._stack = stack
        return self._client

    def sqs_name(self, queue: str) -> str:
        return f"{self.prefix}{queue}"

    def queue_name(self, sqs_name: str) -> str:
        """The aioworkers queue name of an SQS queue name (the prefix removed)."""
        return sqs_name.removeprefix(self.prefix)

    async def _q(self, queue: str, *, create: bool | None = None) -> _Queue | None:
        q = self._queues.get(queue)
        if q is not None:
            return q
        create = self.create if create is None else create
        client = await self.client()
        name = self.sqs_name(queue)
        fifo = name.endswith(".fifo")
        async with _mapped("resolve queue"):
            url = await self._url(client, name, create, fifo)
            if url is None:
                return None
            attrs = (
                await client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
            ).get("Attributes", {})
            redrive = attrs.get("RedrivePolicy")
            if redrive:
                target = json.loads(redrive).get("deadLetterTargetArn", "")
                dlq_name = target.rsplit(":", 1)[-1]
            else:
                dlq_name = f"{name.removesuffix('.fifo')}-dead" + (".fifo" if fifo else "")
            dlq_url = await self._url(client, dlq_name, create, fifo)
        if dlq_url is None:
            raise ConfigError(f"sqs: the DLQ {dlq_name!r} of {name!r} does not exist (create=0)")
        q = self._queues.setdefault(queue, _Queue(url, dlq_url, fifo))
        return q

    async def _url(self, client: Any, name: str, create: bool, fifo: bool) -> str | None:
        try:
            return str((await client.get_queue_url(QueueName=name))["QueueUrl"])
        except bexc.ClientError as exc:
            if "NonExistentQueue" not in _code(exc) and "QueueDoesNotExist" not in _code(exc):
                raise
        if not create:
            return None
        attributes = {"VisibilityTimeout": str(self._visibility)}
        if fifo:
            attributes["FifoQueue"] = "true"
        reply = await client.create_queue(QueueName=name, Attributes=attributes)
        return str(reply["QueueUrl"])

    async def _need(self, queue: str) -> _Queue:
        q = await self._q(queue)
        if q is None:
            raise ConfigError(f"sqs: queue {self.sqs_name(queue)!r} does not exist (create=0)")
        return q

    def _forget(self, queue: str, exc: bexc.ClientError) -> None:
        if "NonExistentQueue" in _code(exc) or "QueueDoesNotExist" in _code(exc):
            # Deleted under us: resolve (and create) it again on the next call.
            self._queues.pop(queue, None)
            raise BrokerUnavailable(f"sqs: queue {self.sqs_name(queue)!r} does not exist") from exc

    async def _call(self, queue: str, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        client = await self.client()
        async with _mapped(what):
            try:
                return await fn(client)
            except bexc.ClientError as exc:
                self._forget(queue, exc)
                raise

    # -- producer -------------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        q = await self._need(queue)
        seconds, eta = split_delay(delay)
        extra: dict[str, Any] = {} if eta is None else {ETA: _attr(eta)}
        entries = [self._entry(q, body, seconds, extra) for body in bodies]
        await self._send(queue, q.url, entries)

    def _entry(
        self, q: _Queue, body: bytes, delay: int, attributes: dict[str, Any], *, fresh: bool = False
    ) -> dict[str, Any]:
        text, enc = encode_body(body)
        entry: dict[str, Any] = {"MessageBody": text}
        attrs = {**attributes, **enc}
        if attrs:
            entry["MessageAttributes"] = attrs
        if q.fifo:
            group, dedup = group_and_dedup(body, self.group)
            entry["MessageGroupId"] = group
            # A retry or hand-back is a new message for SQS: never deduplicated away.
            entry["MessageDeduplicationId"] = os.urandom(16).hex() if fresh else dedup
            if delay:
                # FIFO queues take no per-message delay: the eta holds it back in `fetch`.
                attrs.setdefault(ETA, _attr(time.time_ns() // 1_000_000 + delay * 1000))
                entry["MessageAttributes"] = attrs
        elif delay:
            entry["DelaySeconds"] = delay
        return entry

    async def _send(self, queue: str, url: str, entries: list[dict[str, Any]]) -> None:
        async def batch(chunk: list[dict[str, Any]]) -> None:
            pending = {str(i): e for i, e in enumerate(chunk)}
            for attempt in range(5):
                reply = await self._call(
                    queue,
                    "send",
                    lambda c: c.send_message_batch(
                        QueueUrl=url, Entries=[{"Id": i, **e} for i, e in pending.items()]
                    ),
                )
                failed = reply.get("Failed") or []
                for ok in reply.get("Successful") or []:
                    pending.pop(ok["Id"], None)
                if not pending:
                    return
                if any(f.get("SenderFault") for f in failed):
                    raise BrokerUnavailable(f"sqs send: {failed[0].get('Code')}")
                await asyncio.sleep(0.05 * 2**attempt)
            raise BrokerUnavailable(f"sqs send: {len(pending)} messages not accepted")

        await asyncio.gather(*(batch(c) for c in _chunks(entries, MAX_BATCH)))

    # -- consumer -------------------------------------------------------------------------

    async def fetch(self, queue: str, *, max_messages: int, wait: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        q = await self._need(queue)
        # Whole seconds, rounded up, so a short wait still waits (SQS has no finer unit).
        wait_s = min(MAX_WAIT, math.ceil(max(wait, 0.0) - 1e-9))
        sizes = [min(MAX_BATCH, max_messages - i) for i in range(0, max_messages, MAX_BATCH)]
        # As many long polls as the last fetch showed work for: a quiet queue gets one, so
        # a message that arrives is handed on at once instead of waiting for idle polls
        # to time out; a busy one gets enough to fill every free slot.
        polls = min(len(sizes), 1 + self._last_fetched.get(queue, 0) // MAX_BATCH)
        replies = await asyncio.gather(*(self._receive(queue, q, n, wait_s) for n in sizes[:polls]))
        # A message moto hands to two of these receives is kept once (see `_receive`).
        out = list(itertools.chain.from_iterable(replies))
        self._last_fetched[queue] = len(out)
        due = [d for d in out if not self._early(d)]
        if len(due) < len(out):
            await self._redelay(queue, q, [d for d in out if self._early(d)])
        return due

    async def _receive(self, queue: str, q: _Queue, n: int, wait_s: int) -> list[Delivery]:
        sent = time.monotonic()
        reply = await self._call(
            queue,
            "receive",
            lambda c: c.receive_message(
                QueueUrl=q.url,
                MaxNumberOfMessages=n,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=self._visibility,
                AttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            ),
        )
        out = []
        deadline = sent + self.visibility_timeout
        for m in reply.get("Messages") or []:
            attrs = m.get("MessageAttributes") or {}
            received = int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1))
            base = int(_attr_value(attrs, BASE) or 0)
            eta = _attr_value(attrs, ETA)
            lease = Lease(
                m["ReceiptHandle"],
                received,
                deadline,
                base=base,
                eta=int(float(eta)) if eta else None,
                attributes=attrs,
            )
            mid = m["MessageId"]
            current = q.held.get(mid)
            if current is not None and _live(current):
                # moto handed a message this process still holds to a second receive:
                # keep the first delivery, drop this one (real SQS never does this).
                continue
            q.held[mid] = lease
            body = decode_body(m.get("Body", ""), _attr_value(attrs, ENC))
            out.append(Delivery(queue, mid, body, base + received, lease))
        if len(q.held) > 10_000:
            # Bounded: forget leases that lapsed (settled ones are already gone).
            q.held = {k: v for k, v in q.held.items() if _live(v)}
        return out

    @staticmethod
    def _early(d: Delivery) -> bool:
        eta = _lease(d).eta
        return eta is not None and eta > time.time_ns() // 1_000_000 + 500

    async def _redelay(self, queue: str, q: _Queue, early: list[Delivery]) -> None:
        """Send early messages again with the rest of their delay, then delete them."""
        now = time.time_ns() // 1_000_000
        if q.fifo:
            # No per-message delay on FIFO queues: keep them hidden until the eta instead
            # (each early receive then counts as a delivery).
            for d in early:
                remaining = math.ceil((_lease(d).eta or now) / 1000 - now / 1000)
                seconds = max(1, min(remaining, 12 * 3600 - 60))
                await self._extend_batch(queue, q.url, [d], seconds)
                self._settled(d)  # not handed out: no longer held by this process
            return
        entries = []
        for d in early:
            lease = _lease(d)
            assert lease.eta is not None
            seconds = min(MAX_DELAY, math.ceil((lease.eta - now) / 1000))
            attrs = {k: v for k, v in lease.attributes.items() if k not in (ENC, BASE)}
            # This receive was no delivery: carry the count over to the copy.
            attrs[BASE] = _attr(d.count - 1)
            entries.append(self._entry(q, d.body, seconds, attrs, fresh=True))
        await self._send(queue, q.url, entries)
        for d in early:
            self._settled(d)
        await self._delete(queue, q.url, [_lease(d) for d in early])

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: `fetch` never receives more than it returns."""

    def _owned(self, d: Delivery) -> bool:
        lease = d.token
        if not isinstance(lease, Lease) or not _live(lease):
            return False
        q = self._queues.get(d.queue)
        return q is not None and q.held.get(d.message_id) is lease

    def _settled(self, d: Delivery) -> None:
        lease = _lease(d)
        lease.settled = True
        q = self._queues.get(d.queue)
        if q is not None and q.held.get(d.message_id) is lease:
            del q.held[d.message_id]

    async def _delete(self, queue: str, url: str, leases: list[Lease]) -> list[Lease]:
        """Delete by receipt handle; returns the leases SQS refused as invalid."""
        refused: list[Lease] = []

        async def batch(chunk: list[Lease]) -> None:
            pending = {str(i): lease for i, lease in enumerate(chunk)}
            for attempt in range(5):
                reply = await self._call(
                    queue,
                    "delete",
                    lambda c: c.delete_message_batch(
                        QueueUrl=url,
                        Entries=[{"Id": i, "ReceiptHandle": x.receipt} for i, x in pending.items()],
                    ),
                )
                for ok in reply.get("Successful") or []:
                    pending.pop(ok["Id"], None)
                for failed in reply.get("Failed") or []:
                    if failed.get("SenderFault") and failed["Id"] in pending:
                        # The handle is invalid (the message is gone or no longer ours).
                        refused.append(pending.pop(failed["Id"]))
                if not pending:
                    return
                await asyncio.sleep(0.05 * 2**attempt)
            raise BrokerUnavailable(f"sqs delete: {len(pending)} entries failed")

        await asyncio.gather(*(batch(c) for c in _chunks(leases, MAX_BATCH)))
        return refused

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        # SQS may accept an outdated receipt handle: only a lapsed lease this process
        # knows of, or a handle SQS refuses, is reported lost.
        lost: list[Delivery] = []
        for queue, group in _by_queue(deliveries).items():
            mine: list[Delivery] = []
            for d in group:
                if self._owned(d):
                    mine.append(d)
                elif not (isinstance(d.token, Lease) and d.token.settled):
                    lost.append(d)  # lapsed; settled by this process is not lost
            if not mine:
                continue
            q = await self._need(queue)
            refused = set(await self._delete(queue, q.url, [_lease(d) for d in mine]))
            for d in mine:
                self._settled(d)
                if _lease(d) in refused:
                    lost.append(d)
        return lost

    async def extend(self, deliveries: Sequence[Delivery], *, visibility: float) -> list[Delivery]:
        lost: list[Delivery] = []
        seconds = max(1, math.ceil(visibility - 1e-9))
        for queue, group in _by_queue(deliveries).items():
            mine: list[Delivery] = []
            for d in group:
                (mine if self._owned(d) else lost).append(d)
            if not mine:
                continue
            q = await self._need(queue)
            for chunk in _chunks(mine, MAX_BATCH):
                lost += await self._extend_batch(queue, q.url, chunk, seconds)
        return lost

    async def _extend_batch(
        self, queue: str, url: str, chunk: list[Delivery], seconds: int
    ) -> list[Delivery]:
        sent = time.monotonic()
        reply = await self._call(
            queue,
            "extend",
            lambda c: c.change_message_visibility_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": _lease(d).receipt, "VisibilityTimeout": seconds}
                    for i, d in enumerate(chunk)
                ],
            ),
        )
        failed = {int(f["Id"]) for f in reply.get("Failed") or []}
        for i, d in enumerate(chunk):
            if i not in failed:
                _lease(d).deadline = sent + seconds
        return [chunk[i] for i in sorted(failed)]

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        if not self._owned(delivery):
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")
        q = await self._need(delivery.queue)
        seconds, eta = split_delay(delay)
        attrs = {} if eta is None else {ETA: _attr(eta)}
        await self._send(delivery.queue, q.url, [self._entry(q, body, seconds, attrs, fresh=True)])
        self._settled(delivery)
        await self._delete(delivery.queue, q.url, [_lease(delivery)])

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # A fresh copy, visible at once, that carries the delivery count minus this one:
        # a hand-back at shutdown never pushes a job toward max_deliveries.
        for queue, group in _by_queue(deliveries).items():
            mine = [d for d in group if self._owned(d)]
            if not mine:
                continue
            q = await self._need(queue)
            entries = []
            for d in mine:
                lease = _lease(d)
                attrs = {k: v for k, v in lease.attributes.items() if k not in (ENC, BASE)}
                if d.count > 1:
                    attrs[BASE] = _attr(d.count - 1)
                entries.append(self._entry(q, d.body, 0, attrs, fresh=True))
            await self._send(queue, q.url, entries)
            for d in mine:
                self._settled(d)
            await self._delete(queue, q.url, [_lease(d) for d in mine])

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        if not self._owned(delivery):
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")
        q = await self._need(delivery.queue)
        await self.send_dead_letter(delivery.queue, delivery.body, letter)
        self._settled(delivery)
        await self._delete(delivery.queue, q.url, [_lease(delivery)])

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """Write ``body`` with ``letter``'s facts to the DLQ of ``queue`` (confirmed).

        The facts travel as message attributes; the traceback is cut (from the start) to fit
        SQS's 256 KiB for body and attributes together."""
        q = await self._need(queue)
        values = letter.facts()
        values.pop("traceback", None)  # added last, cut to the room left
        attrs = {name: _attr(v) for name, v in values.items() if v != ""}
        entry = self._entry(q, body, 0, attrs, fresh=True)
        sizes = (len(k) + len(v["StringValue"].encode()) + 16 for k, v in attrs.items())
        used = len(entry["MessageBody"].encode()) + sum(sizes)
        room = MAX_SIZE - used - 64
        if letter.traceback and room > 0:
            tb = letter.traceback.encode()[-room:].decode(errors="ignore")
            tb = _NOT_SQS_TEXT.sub("?", tb)
            if tb:
                entry["MessageAttributes"]["traceback"] = _attr(tb)
        await self._send(queue, q.dlq_url, [entry])

    # -- introspection --------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        q = await self._q(queue)
        if q is None:
            return QueueDepth()
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]

        async def attrs(url: str) -> list[int]:
            reply = await self._call(
                queue, "depth", lambda c: c.get_queue_attributes(QueueUrl=url, AttributeNames=names)
            )
            a = reply.get("Attributes", {})
            return [int(a.get(n, 0)) for n in names]

        (ready, in_flight, delayed), dead = await asyncio.gather(attrs(q.url), attrs(q.dlq_url))
        return QueueDepth(ready, in_flight, delayed, sum(dead))

    async def _scan_dead(self, queue: str, q: _Queue) -> list[tuple[DeadLetter, str]]:
        """Every DLQ entry that can be received now, hidden for a while: O(n) receives.

        The caller makes them visible again (or deletes them)."""
        found: dict[str, tuple[DeadLetter, str]] = {}
        while True:
            reply = await self._call(
                queue,
                "dead letters",
                lambda c: c.receive_message(
                    QueueUrl=q.dlq_url,
                    MaxNumberOfMessages=MAX_BATCH,
                    WaitTimeSeconds=0,
                    VisibilityTimeout=DLQ_SCAN_VISIBILITY,
                    AttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                    MessageAttributeNames=["All"],
                ),
            )
            messages = reply.get("Messages") or []
            if not messages:
                break
            for m in messages:
                found[m["MessageId"]] = (_dead_letter(queue, m), m["ReceiptHandle"])
        return sorted(found.values(), key=lambda e: (e[0].dead_at, e[0].entry_id))

    async def _unhide(self, queue: str, url: str, receipts: list[str]) -> None:
        for chunk in _chunks(receipts, MAX_BATCH):
            await self._call(
                queue,
                "dead letters",
                lambda c, chunk=chunk: c.change_message_visibility_batch(  # type: ignore[misc]
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": 0}
                        for i, r in enumerate(chunk)
                    ],
                ),
            )

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` entries. SQS cannot peek: every entry is received (hidden
        for a moment) and made visible again, so this reads the whole DLQ, O(n), and two
        listings at once may each miss what the other holds."""
        q = await self._q(queue, create=False)
        if q is None:
            return []
        entries = await self._scan_dead(queue, q)
        await self._unhide(queue, q.dlq_url, [r for _, r in entries])
        return [e for e, _ in entries[:limit]]

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        """Delete DLQ entries by MessageId (all for ``None``): reads the whole DLQ, O(n)."""
        q = await self._q(queue, create=False)
        if q is None:
            return 0
        entries = await self._scan_dead(queue, q)
        wanted = None if entry_ids is None else set(entry_ids)
        doomed = [r for e, r in entries if wanted is None or e.entry_id in wanted]
        keep = [r for e, r in entries if wanted is not None and e.entry_id not in wanted]
        leases = [Lease(r, 0, 0.0) for r in doomed]
        await self._delete(queue, q.dlq_url, leases)
        await self._unhide(queue, q.dlq_url, keep)
        return len(doomed)

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()


def _live(lease: Lease) -> bool:
    return not lease.settled and time.monotonic() < lease.deadline


def _lease(d: Delivery) -> Lease:
    assert isinstance(d.token, Lease), f"{d!r} was not delivered by an SqsBroker"
    return d.token


def _chunks(items: Sequence[T], n: int) -> Iterable[list[T]]:
    for start in range(0, len(items), n):
        yield list(items[start : start + n])


def _by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[Delivery]]:
    groups: dict[str, list[Delivery]] = {}
    for d in deliveries:
        groups.setdefault(d.queue, []).append(d)
    return groups


def _dead_letter(queue: str, m: dict[str, Any]) -> DeadLetter:
    attrs = m.get("MessageAttributes") or {}
    body = decode_body(m.get("Body", ""), _attr_value(attrs, ENC))

    def get(name: str) -> str | None:
        return _attr_value(attrs, name)

    known: dict[str, str] = {}
    if get("reason") is None:
        # Moved here by the queue's redrive policy (maxReceiveCount): read what we can.
        known["reason"] = "max_deliveries"
        try:
            env = decode(body)
            known.update(id=env.id, task=env.task)
        except Exception:
            pass
    sent = int(m.get("Attributes", {}).get("SentTimestamp", 0)) / 1000
    return DeadLetter.from_facts(
        lambda name: get(name) or known.get(name),
        queue=queue,
        entry_id=m["MessageId"],
        body=body,
        dead_at=sent,
    )
