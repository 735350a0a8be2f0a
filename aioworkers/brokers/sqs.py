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
instead. A FIFO queue ``q.fifo`` also has the standard queue ``<prefix>q-delay``, where its
delayed jobs wait (see Delays). Names are resolved to URLs once (GetQueueUrl) and cached,
with each queue's ``MaximumMessageSize``: a message over it is refused before it is sent,
and a dead letter's facts are cut to fit it.

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
A retry, release or dead letter sends its new message first and deletes the original
second; the lease stays ours until the delete is done, so a caller that tries again after
a failed delete only deletes (no second copy), and a copy whose original could not be
deleted before its lease ran out is logged as a job that may run twice.

Delays: DelaySeconds in whole seconds (rounded up), at most 900 s. A longer delay carries
an ``aw-eta`` attribute; a message received before its eta is sent again with the rest of
the delay (and deleted), inside `fetch`. FIFO queues take no per-message delay, and a
message held back inside its group would hold back the whole group: a delayed FIFO job
waits in the delay queue instead, and `fetch` moves it to the tail of its group once due.

Bodies that are not valid SQS text (bytes that are not UTF-8, control characters, empty)
travel base64-encoded with ``aw-enc=b64``. A message whose attributes cannot be read (an
unknown ``aw-enc`` or a body that is not in it, an ``aw-base`` or ``aw-eta`` that is not a
number in range) is dead-lettered by `fetch` with a decode reason and never handed out.

Errors: `map_error` is the one table from botocore's errors to ours (transient ->
`BrokerUnavailable`; set-up -> `ConfigError` with what to fix; a message SQS refuses for
what it holds -> `MessageRefusedError`).
"""

from __future__ import annotations

import asyncio
import base64
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
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlsplit

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore import exceptions as bexc  # type: ignore[import-untyped]

from ..envelope import decode
from ..errors import (
    AioworkersError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    LeaseLost,
    redact,
)
from ._sqs_wire import (
    BASE,
    DEDUP,
    ENC,
    ETA,
    _attr,
    _attr_value,
    encode_body,
    read_body,
    read_count,
    read_eta,
    sqs_text,
)
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth

log = logging.getLogger("aioworkers")

T = TypeVar("T")

MAX_DELAY = 900  # SQS's limit for DelaySeconds
MAX_WAIT = 20  # SQS's limit for WaitTimeSeconds
MAX_BATCH = 10  # SQS's limit for every *Batch call and for MaxNumberOfMessages
MAX_VISIBILITY = 12 * 3600  # SQS's limit for a visibility timeout
DEFAULT_MAX_SIZE = 256 * 1024  # a queue's MaximumMessageSize when SQS does not say
DLQ_SCAN_VISIBILITY = 30  # seconds a DLQ listing hides the entries it reads
MOVE_EVERY = 1.0  # seconds between two looks at a FIFO queue's delay queue
MOVE_VISIBILITY = 30  # seconds a delayed job being moved is hidden (well inside the 5-minute
# deduplication window, so a move repeated after a failure is dropped by SQS)
MAX_MOVES = 10  # receives of due delayed jobs in one fetch at most
MAX_FACT = 1024  # characters kept of a dead letter's short facts (id, task, error type)
NOTE_ROOM = 160  # bytes kept free for the "error" attribute when a letter's body is cut


class MessageRefusedError(AioworkersError, ValueError):
    """SQS refuses a message for what it holds (too large, characters it does not take):
    permanent, sending it again fails the same way."""


# -- client errors: one table -----------------------------------------------------------------

TRANSIENT, CONFIG, REFUSED = "transient", "config", "refused"

# What an SQS error code means here (the "AWS.SimpleQueueService." prefix removed). A code
# not listed is TRANSIENT in a 5xx reply or when it speaks of throttling, CONFIG otherwise:
# credentials, permissions, a missing queue, KMS, a bad parameter at start-up.
_CODES: dict[str, str] = {
    **dict.fromkeys(
        (
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
            "OverLimit",  # too many messages in flight: some settle soon
            "QueueDeletedRecently",  # create again after 60 s
        ),
        TRANSIENT,
    ),
    # What one message holds: `MessageRefusedError` for a send, `ConfigError` elsewhere.
    **dict.fromkeys(
        (
            "InvalidMessageContents",
            "MessageTooLong",
            "BatchRequestTooLong",
            "InvalidParameterValue",
            "InvalidAttributeValue",
        ),
        REFUSED,
    ),
}

_PERMISSIONS = (
    "the AWS credentials in use lack a permission on this queue: aioworkers needs "
    "sqs:GetQueueUrl, GetQueueAttributes, SendMessage, ReceiveMessage, DeleteMessage, "
    "ChangeMessageVisibility, and CreateQueue unless create=0"
)
_KEYS = "the AWS credentials in use are not valid (environment, profile or role): check them"
# What to fix, for the errors a user meets at start-up (AWS's own text otherwise: auth
# failures get only this, their text may quote the request).
_HINTS: dict[str, str] = {
    "AccessDenied": _PERMISSIONS,
    "AccessDeniedException": _PERMISSIONS,
    "InvalidClientTokenId": _KEYS,
    "UnrecognizedClientException": _KEYS,
    "SignatureDoesNotMatch": _KEYS,
    "IncompleteSignature": _KEYS,
    "InvalidSecurity": _KEYS,
    "MissingAuthenticationToken": _KEYS,
    "ExpiredToken": "the AWS session token has expired: refresh the credentials",
    "NonExistentQueue": "the queue does not exist: create it, or use create=1",
    "QueueDoesNotExist": "the queue does not exist: create it, or use create=1",
    "credentials": (
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a "
        "profile (AWS_PROFILE, or profile= in the URL), or give the process an instance or "
        "task role"
    ),
}

# botocore's other errors, by class (first match wins).
_TYPES: tuple[tuple[type[Exception], str], ...] = (
    # An instance or task metadata service, or a credential process, failed this time.
    (bexc.CredentialRetrievalError, TRANSIENT),
    (bexc.MetadataRetrievalError, TRANSIENT),
    (bexc.PartialCredentialsError, CONFIG),
    (bexc.UnknownCredentialError, CONFIG),
    (bexc.NoRegionError, CONFIG),
    (bexc.ProfileNotFound, CONFIG),
    (bexc.InvalidConfigError, CONFIG),
    (bexc.ConnectionError, TRANSIENT),  # endpoint unreachable, connect timeout, proxy
    (bexc.HTTPClientError, TRANSIENT),  # read timeout, connection closed
    (OSError, TRANSIENT),
)


def map_error(
    exc: BaseException, what: str, *, started: bool = True, message: bool = False
) -> AioworkersError | None:
    """Our error for a client error raised during ``what`` (None: not a client error).

    ``started``: the broker has talked to SQS before, so missing credentials are a lapse
    of an instance role, not a set-up without any. ``message``: the call sends messages,
    so a refusal concerns what they hold."""
    kind, detail = _classify(exc, started)
    if kind == TRANSIENT:
        return BrokerUnavailable(f"sqs {what}: {detail}")
    if kind == REFUSED and message:
        return MessageRefusedError(f"sqs {what}: {detail}")
    if kind is not None:
        return ConfigError(f"sqs {what}: {detail}")
    return None


def _classify(exc: BaseException, started: bool) -> tuple[str | None, str]:
    if isinstance(exc, bexc.ClientError):
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        kind = _CODES.get(code)
        if kind is None:
            server = isinstance(status, int) and status >= 500
            kind = TRANSIENT if server or "Throttl" in code or "Unavailable" in code else CONFIG
        text = _HINTS.get(code) or redact(str(exc.response.get("Error", {}).get("Message", "")))
        return kind, f"{code}: {text[:300]}" if text else code
    if isinstance(exc, bexc.NoCredentialsError):
        if started:
            return TRANSIENT, "no AWS credentials at the moment (NoCredentialsError)"
        return CONFIG, _HINTS["credentials"]
    for cls, kind in _TYPES:
        if isinstance(exc, cls):
            return kind, f"{type(exc).__name__}: {redact(str(exc))[:300]}"
    return None, ""


@asynccontextmanager
async def _mapped(what: str, *, started: bool = True, message: bool = False) -> AsyncIterator[None]:
    """Client errors become ours at the I/O boundary (see `map_error`)."""
    try:
        yield
    except Exception as exc:
        mapped = map_error(exc, what, started=started, message=message)
        if mapped is None:
            raise
        raise mapped from exc


def _code(exc: bexc.ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code.removeprefix("AWS.SimpleQueueService.")


@dataclass(eq=False, slots=True)
class Lease:
    """The token of an SQS delivery: the receipt handle and this process's view of it."""

    receipt: str
    receive_count: int
    deadline: float  # time.monotonic() after which the lease may have lapsed
    base: int = 0
    eta: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    copied: bool = False  # its retry, hand-back or dead letter is sent; the delete is left
    settled: bool = False  # acked, retried, released or dead-lettered by us


@dataclass(slots=True)
class _Queue:
    url: str
    dlq_url: str
    fifo: bool
    max_size: int = DEFAULT_MAX_SIZE  # bytes a message may have (the delay queue's too)
    dlq_max_size: int = DEFAULT_MAX_SIZE
    delay_url: str | None = None  # FIFO queues: where delayed jobs wait (`_move_due`)
    # message id -> the lease of its current delivery in this process: an older delivery
    # of the same message (its lease lapsed, another fetch got it) is no longer ours.
    held: dict[str, Lease] = field(default_factory=dict)
    owed: list[Delivery] = field(default_factory=list)  # early, sent again, not yet deleted
    next_move: float = 0.0  # time.monotonic() of the next look at the delay queue


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
    if not _fifo_id(dedup):
        dedup = hashlib.sha256(dedup.encode()).hexdigest()
    g = group or env.task
    if not _fifo_id(g):
        g = hashlib.sha256(g.encode()).hexdigest()
    return g, dedup


def _fifo_id(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"[!-~]{1,128}", value) is not None


class SqsBroker:
    """``sqs://?region=...&endpoint_url=...&create=1&prefix=...&group=...`` (see module doc)."""

    messaging_system = "aws_sqs"

    def __init__(self, url: str, *, visibility_timeout: float | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        unknown = set(query) - {"region", "endpoint_url", "create", "prefix", "group", "profile"}
        if unknown:
            raise ConfigError(f"sqs URL: unknown parameters {sorted(unknown)}")
        if parts.username or parts.password:
            raise ConfigError("sqs URL: credentials come from the AWS chain, not the URL")
        _check_lease(visibility_timeout)
        self.region = query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.endpoint_url = query.get("endpoint_url") or None
        self.profile = query.get("profile") or None
        self.create = query.get("create", "1").lower() not in ("0", "false", "no")
        self.prefix = query.get("prefix", "")
        self.group = query.get("group") or None
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        # A queue this broker creates gets it as its own visibility timeout (what Lambda,
        # or a consumer that passes none, gets).
        self._visibility = _seconds(self._lease)
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()
        self._queues: dict[str, _Queue] = {}
        self._last_fetched: dict[str, int] = {}  # per queue: how busy the last fetch was
        self._ids = itertools.count()
        # Talked to SQS once: missing credentials are no longer a set-up error.
        self._started = False

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
                async with _mapped("connect", started=self._started):
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
        async with _mapped("resolve queue", started=self._started):
            q = await self._resolve(client, self.sqs_name(queue), create)
        self._started = True
        return None if q is None else self._queues.setdefault(queue, q)

    async def _resolve(self, client: Any, name: str, create: bool) -> _Queue | None:
        fifo = name.endswith(".fifo")
        url = await self._url(client, name, create, fifo)
        if url is None:
            return None
        attrs = await _attributes(client, url, "RedrivePolicy", "MaximumMessageSize")
        redrive = attrs.get("RedrivePolicy")
        if redrive:
            target = json.loads(redrive).get("deadLetterTargetArn", "")
            dlq_name = target.rsplit(":", 1)[-1]
        else:
            dlq_name = f"{name.removesuffix('.fifo')}-dead" + (".fifo" if fifo else "")
        dlq_url = await self._url(client, dlq_name, create, fifo)
        if dlq_url is None:
            raise ConfigError(f"sqs: the DLQ {dlq_name!r} of {name!r} does not exist (create=0)")
        dlq_size = _max_size(await _attributes(client, dlq_url, "MaximumMessageSize"))
        q = _Queue(url, dlq_url, fifo, max_size=_max_size(attrs), dlq_max_size=dlq_size)
        if fifo:
            delay_name = f"{name.removesuffix('.fifo')}-delay"
            q.delay_url = await self._url(client, delay_name, create, False)
            if q.delay_url is None:
                raise ConfigError(
                    f"sqs: the FIFO queue {name!r} needs the standard queue {delay_name!r} "
                    "for its delayed jobs and retries: create it, or use create=1"
                )
            delay_size = _max_size(await _attributes(client, q.delay_url, "MaximumMessageSize"))
            q.max_size = min(q.max_size, delay_size)
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

    async def _call(
        self, queue: str, what: str, fn: Callable[[Any], Awaitable[T]], *, message: bool = False
    ) -> T:
        client = await self.client()
        async with _mapped(what, started=self._started, message=message):
            try:
                return await fn(client)
            except bexc.ClientError as exc:
                self._forget(queue, exc)
                raise

    # -- producer -------------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        """Raises `MessageRefusedError` (a `ValueError`) for a job SQS cannot take: over the
        queue's MaximumMessageSize (checked before anything is sent), or refused by SQS."""
        if not bodies:
            return
        q = await self._need(queue)
        seconds, eta = split_delay(delay)
        attrs = {} if eta is None else {ETA: _attr(eta)}
        routed = [self._route(q, body, attrs, seconds, fresh=False) for body in bodies]
        entries = [entry for _, entry in routed]
        for i, entry in enumerate(entries):
            if (size := _size(entry)) > q.max_size:
                raise MessageRefusedError(
                    f"sqs: job {i + 1} of {len(entries)} is {size} bytes as an SQS message, "
                    f"over the MaximumMessageSize {q.max_size} of {self.sqs_name(queue)!r}; "
                    "nothing was sent: pass a reference (a URL, a key) instead of the data"
                )
        await self._send_copies(queue, routed[0][0], entries, q.max_size)

    def _route(
        self, q: _Queue, body: bytes, attrs: dict[str, Any], seconds: int, *, fresh: bool
    ) -> tuple[str, dict[str, Any]]:
        """The URL a message for ``q`` goes to, and its entry. ``fresh``: a new message for
        SQS (a retry, a hand-back), never deduplicated against the job's first send."""
        if not q.fifo:
            return q.url, self._entry(body, attrs, delay=seconds)
        group, dedup = group_and_dedup(body, self.group)
        if seconds:
            # FIFO queues take no per-message delay, and a message held back inside its
            # group would hold back the whole group: it waits in the delay queue.
            assert q.delay_url is not None
            keep = {} if fresh else {DEDUP: _attr(dedup)}
            return q.delay_url, self._entry(body, {**attrs, **keep}, delay=seconds)
        return q.url, self._entry(body, attrs, group=(group, _new_id() if fresh else dedup))

    @staticmethod
    def _entry(
        body: bytes,
        attributes: dict[str, Any],
        *,
        delay: int = 0,
        group: tuple[str, str] | None = None,
        b64: bool = False,
    ) -> dict[str, Any]:
        """A SendMessageBatch entry; ``group``: FIFO (MessageGroupId, MessageDeduplicationId);
        ``b64``: base64 even if the body is text."""
        text, enc = encode_body(body)
        if b64 and not enc:
            text, enc = base64.b64encode(body).decode(), {ENC: _attr("b64")}
        entry: dict[str, Any] = {"MessageBody": text}
        attrs = {name: a for name, a in attributes.items() if name != ENC} | enc
        if attrs:
            entry["MessageAttributes"] = attrs
        if group is not None:
            entry["MessageGroupId"], entry["MessageDeduplicationId"] = group
        elif delay:
            entry["DelaySeconds"] = delay
        return entry

    async def _send_copies(
        self, queue: str, url: str, entries: list[dict[str, Any]], limit: int
    ) -> None:
        """`_send`, and `MessageRefusedError` if SQS refuses any (the others are sent)."""
        refused = await self._send(queue, url, entries, limit)
        if refused:
            raise MessageRefusedError(
                f"sqs refused {len(refused)} of {len(entries)} messages for "
                f"{self.sqs_name(queue)!r} (the others were sent): {refused[0][1]}"
            )

    async def _send(
        self, queue: str, url: str, entries: list[dict[str, Any]], limit: int
    ) -> list[tuple[int, str]]:
        """Send ``entries`` in the batches SQS takes (10, together at most ``limit``
        bytes). Returns ``(index, why)`` of those refused for what they hold (over
        ``limit``, or a sender fault): sending them again would fail the same way. Other
        failures are retried, then raised as `BrokerUnavailable`."""
        refused: list[tuple[int, str]] = []
        batches: list[list[tuple[int, dict[str, Any]]]] = []
        total = 0
        for i, entry in enumerate(entries):
            size = _size(entry)
            if size > limit:
                why = f"{size} bytes as an SQS message, over the MaximumMessageSize {limit}"
                refused.append((i, f"MessageTooLong: {why}"))
                continue
            if not batches or len(batches[-1]) == MAX_BATCH or total + size > limit:
                batches.append([])
                total = 0
            batches[-1].append((i, entry))
            total += size
        for found in await asyncio.gather(*(self._send_batch(queue, url, b) for b in batches)):
            refused += found
        return sorted(refused)

    async def _send_batch(
        self, queue: str, url: str, batch: list[tuple[int, dict[str, Any]]]
    ) -> list[tuple[int, str]]:
        pending = {str(i): entry for i, entry in batch}
        refused: list[tuple[int, str]] = []
        for attempt in range(5):
            try:
                reply = await self._call(
                    queue,
                    "send",
                    lambda c: c.send_message_batch(
                        QueueUrl=url, Entries=[{"Id": i, **e} for i, e in pending.items()]
                    ),
                    message=True,
                )
            except MessageRefusedError as exc:
                if len(pending) == 1:
                    return [*refused, (int(next(iter(pending))), str(exc))]
                # The whole call was refused for one entry's sake: send them one by one.
                singles = [self._send_batch(queue, url, [(int(i), e)]) for i, e in pending.items()]
                return refused + [r for found in await asyncio.gather(*singles) for r in found]
            refused += [(int(i), why) for i, why in _sort_reply(reply, pending)]
            if not pending:
                return refused
            await asyncio.sleep(0.05 * 2**attempt)
        raise BrokerUnavailable(f"sqs send: {len(pending)} messages not accepted")

    # -- consumer -------------------------------------------------------------------------

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []
        lease = self._lease if lease is None else _check_lease(lease)
        q = await self._need(queue)
        if q.owed:
            await self._pay_owed(queue, q)
        if q.delay_url is not None and time.monotonic() >= q.next_move:
            await self._move_due(queue, q, q.delay_url)
        # Whole seconds, rounded up, so a short wait still waits (SQS has no finer unit).
        wait_s = min(MAX_WAIT, math.ceil(max(wait, 0.0) - 1e-9))
        sizes = [min(MAX_BATCH, max_messages - i) for i in range(0, max_messages, MAX_BATCH)]
        # As many long polls as the last fetch showed work for: a quiet queue gets one, so
        # a message that arrives is handed on at once instead of waiting for idle polls
        # to time out; a busy one gets enough to fill every free slot.
        polls = min(len(sizes), 1 + self._last_fetched.get(queue, 0) // MAX_BATCH)
        receives = (self._receive(queue, q, n, wait_s, lease) for n in sizes[:polls])
        replies = await asyncio.gather(*receives)
        # A message moto hands to two of these receives is kept once (see `_receive`).
        out = list(itertools.chain.from_iterable(replies))
        self._last_fetched[queue] = len(out)
        due = [d for d in out if not self._early(d)]
        if len(due) < len(out):
            await self._redelay(queue, q, [d for d in out if self._early(d)])
        return due

    async def _receive(
        self, queue: str, q: _Queue, n: int, wait_s: int, lease: float
    ) -> list[Delivery]:
        sent = time.monotonic()
        reply = await self._call(
            queue,
            "receive",
            lambda c: c.receive_message(
                QueueUrl=q.url,
                MaxNumberOfMessages=n,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=_seconds(lease),
                AttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            ),
        )
        out = []
        deadline = sent + lease
        for m in reply.get("Messages") or []:
            try:
                delivery = self._delivery(queue, q, m, deadline)
            except DecodeError as exc:
                await self._dead_letter_raw(queue, q.url, _raw(m), exc)
                continue
            if delivery is not None:
                out.append(delivery)
        if len(q.held) > 10_000:
            # Bounded: forget leases that lapsed (settled ones are already gone).
            q.held = {k: v for k, v in q.held.items() if _live(v)}
        return out

    @staticmethod
    def _delivery(queue: str, q: _Queue, m: dict[str, Any], deadline: float) -> Delivery | None:
        """The delivery of received message ``m`` (None if this process holds it already);
        `DecodeError` if its attributes cannot be read."""
        attrs = m.get("MessageAttributes") or {}
        count = (m.get("Attributes") or {}).get("ApproximateReceiveCount")
        received = read_count("ApproximateReceiveCount", count, least=1)
        base = read_count(BASE, _attr_value(attrs, BASE))
        eta = read_eta(_attr_value(attrs, ETA))
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
        mid = m["MessageId"]
        current = q.held.get(mid)
        if current is not None and _live(current):
            # moto handed a message this process still holds to a second receive:
            # keep the first delivery, drop this one (real SQS never does this).
            return None
        lease = Lease(m["ReceiptHandle"], received, deadline, base=base, eta=eta, attributes=attrs)
        q.held[mid] = lease
        return Delivery(queue, mid, body, base + received, lease)

    async def _dead_letter_raw(self, queue: str, url: str, raw: _Raw, exc: DecodeError) -> None:
        """Dead-letter a message the runtime never sees (as SQS holds it), then delete it
        from ``url``. If SQS cannot be reached now, it comes back after its lease."""
        error = f"DecodeError: {exc.detail}"
        letter = DeadLetter(
            id=raw.message_id,
            task=None,
            reason=exc.reason,
            error=error,
            error_type="DecodeError",
            attempts=1,
            dead_at=time.time(),
            queue=queue,
        )
        log.error(
            "job failed id=%s size=%d error=%r outcome=dead-lettered (%s)",
            raw.message_id,
            len(raw.body),
            error,
            exc.reason,
        )
        try:
            await self.send_dead_letter(queue, raw.body, letter)
            await self._delete(queue, url, [Lease(raw.receipt, 1, 0.0)])
        except (BrokerUnavailable, MessageRefusedError) as err:
            log.warning(
                "could not dead-letter %s now, it comes back later: %s", raw.message_id, err
            )

    @staticmethod
    def _early(d: Delivery) -> bool:
        eta = _lease(d).eta
        return eta is not None and eta > time.time_ns() // 1_000_000 + 500

    async def _redelay(self, queue: str, q: _Queue, early: list[Delivery]) -> None:
        """Send early messages again with the rest of their delay (a FIFO queue's to its
        delay queue), then delete them; a delete that fails is owed (`_pay_owed`)."""
        now = time.time_ns() // 1_000_000
        routed = []
        for d in early:
            seconds = math.ceil(((_lease(d).eta or now) - now) / 1000)
            # This receive was no delivery: the copy carries the count so far.
            copy = self._route(q, d.body, _carried(d), max(1, min(MAX_DELAY, seconds)), fresh=True)
            routed.append(copy)
        try:
            refused = dict(
                await self._send(queue, routed[0][0], [e for _, e in routed], q.max_size)
            )
        except BrokerUnavailable as exc:
            log.warning("could not delay %d early messages again: %s", len(early), exc)
            for d in early:
                self._settled(d)  # they come back after their visibility timeout
            return
        for i, d in enumerate(early):
            if i in refused:
                raw = _Raw(d.message_id, _lease(d).receipt, d.body)
                await self._dead_letter_raw(queue, q.url, raw, _too_large(refused[i]))
                self._settled(d)
            else:
                _lease(d).copied = True
                q.owed.append(d)
        await self._pay_owed(queue, q)

    async def _pay_owed(self, queue: str, q: _Queue) -> None:
        """Delete the originals of early messages already sent on (the copy and the
        original must not both come back); if SQS cannot be reached, at the next fetch."""
        owed, q.owed = q.owed, []
        mine = [d for d in owed if self._owned(d)]
        for d in owed:
            if d not in mine:
                _may_run_twice("delay", d)
        if not mine:
            return
        try:
            await self._remove(queue, q.url, mine, "delay")
        except BrokerUnavailable as exc:
            q.owed += mine
            log.warning("could not delete %d early messages sent on, later: %s", len(mine), exc)

    async def _move_due(self, queue: str, q: _Queue, url: str) -> None:
        """Move the delayed jobs of FIFO queue ``q`` that are due from its delay queue
        ``url`` to the tail of their group; early ones wait there again."""
        q.next_move = time.monotonic() + MOVE_EVERY
        for _ in range(MAX_MOVES):
            reply = await self._call(
                queue,
                "receive delayed",
                lambda c: c.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=MAX_BATCH,
                    WaitTimeSeconds=0,
                    VisibilityTimeout=MOVE_VISIBILITY,
                    MessageAttributeNames=["All"],
                ),
            )
            messages = reply.get("Messages") or []
            if messages:
                await self._move(queue, q, url, messages)
            if len(messages) < MAX_BATCH:
                return

    async def _move(self, queue: str, q: _Queue, url: str, messages: list[dict[str, Any]]) -> None:
        now = time.time_ns() // 1_000_000
        moves: dict[str, list[tuple[_Raw, dict[str, Any]]]] = {q.url: [], url: []}
        for m in messages:
            try:
                target, entry = self._moved(q, url, m, now)
            except DecodeError as exc:
                await self._dead_letter_raw(queue, url, _raw(m), exc)
                continue
            moves[target].append((_raw(m), entry))
        done: list[Lease] = []
        for target, items in moves.items():
            refused = dict(await self._send(queue, target, [e for _, e in items], q.max_size))
            for i, (raw, _) in enumerate(items):
                if i in refused:
                    await self._dead_letter_raw(queue, url, raw, _too_large(refused[i]))
                else:
                    done.append(Lease(raw.receipt, 1, 0.0))
        await self._delete(queue, url, done)

    def _moved(
        self, q: _Queue, url: str, m: dict[str, Any], now: int
    ) -> tuple[str, dict[str, Any]]:
        """Where a message of the delay queue ``url`` goes now, and its entry: to its group
        when due, else back with the rest of its delay. `DecodeError` if unreadable."""
        attrs = m.get("MessageAttributes") or {}
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
        eta = read_eta(_attr_value(attrs, ETA))
        found = _attr_value(attrs, DEDUP)
        # One deduplication id for every leg (a delayed enqueue's is its job's): a copy left
        # behind by a failed delete joins the group as a duplicate that SQS drops.
        dedup = found if found is not None and _fifo_id(found) else str(m["MessageId"])
        if eta is not None and eta > now + 500:
            seconds = min(MAX_DELAY, math.ceil((eta - now) / 1000))
            return url, self._entry(body, {**attrs, DEDUP: _attr(dedup)}, delay=seconds)
        rest = {k: v for k, v in attrs.items() if k not in (ENC, ETA, DEDUP)}
        return q.url, self._entry(body, rest, group=(group_and_dedup(body, self.group)[0], dedup))

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: `fetch` never receives more than it returns."""

    def _owned(self, d: Delivery) -> bool:
        lease = d.token
        if not isinstance(lease, Lease) or not _live(lease):
            return False
        q = self._queues.get(d.queue)
        return q is not None and q.held.get(d.message_id) is lease

    def _claim(self, d: Delivery, what: str) -> Lease:
        """The lease of ``d`` if it is still ours, else `LeaseLost`."""
        if self._owned(d):
            return _lease(d)
        if _half_done(d):
            _may_run_twice(what, d)
        raise LeaseLost(f"{d!r} is no longer leased by this worker")

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
                # A refused handle is invalid: the message is gone, or no longer ours.
                refused.extend(chunk[int(i)] for i, _ in _sort_reply(reply, pending))
                if not pending:
                    return
                await asyncio.sleep(0.05 * 2**attempt)
            raise BrokerUnavailable(f"sqs delete: {len(pending)} entries failed")

        await asyncio.gather(*(batch(c) for c in _chunks(leases, MAX_BATCH)))
        return refused

    async def _remove(self, queue: str, url: str, deliveries: list[Delivery], what: str) -> None:
        """Delete the originals of ``deliveries``, whose new messages are out, then let go of
        their leases. A delete that fails keeps them ours: the caller tries again, and only
        the delete is repeated."""
        refused = set(await self._delete(queue, url, [_lease(d) for d in deliveries]))
        for d in deliveries:
            self._settled(d)
            if _lease(d) in refused:
                _may_run_twice(what, d)

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

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        lost: list[Delivery] = []
        seconds = _seconds(_check_lease(lease))
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
        failed = reply.get("Failed") or []
        # A sender fault means the handle is no longer valid: lost. A server-side failure
        # extends nothing this time, and the local deadline still says when it runs out.
        lost = {int(f["Id"]) for f in failed if f.get("SenderFault", True)}
        unchanged = {int(f["Id"]) for f in failed}
        for i, d in enumerate(chunk):
            if i not in unchanged:
                _lease(d).deadline = sent + seconds
        return [chunk[i] for i in sorted(lost)]

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        lease = self._claim(delivery, "retry")
        q = await self._need(delivery.queue)
        if not lease.copied:
            seconds, eta = split_delay(delay)
            attrs = {} if eta is None else {ETA: _attr(eta)}
            url, entry = self._route(q, body, attrs, seconds, fresh=True)
            await self._send_copies(delivery.queue, url, [entry], q.max_size)
            lease.copied = True
        await self._remove(delivery.queue, q.url, [delivery], "retry")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # A fresh copy, visible at once, that carries the delivery count minus this one:
        # a hand-back at shutdown never pushes a job toward max_deliveries.
        for queue, group in _by_queue(deliveries).items():
            mine = [d for d in group if self._owned(d)]
            for d in group:
                if d not in mine and _half_done(d):
                    _may_run_twice("release", d)
            if not mine:
                continue
            q = await self._need(queue)
            todo = [d for d in mine if not _lease(d).copied]
            entries = [self._route(q, d.body, _carried(d), 0, fresh=True)[1] for d in todo]
            refused = dict(await self._send(queue, q.url, entries, q.max_size))
            back = [d for i, d in enumerate(todo) if i in refused]
            if back:
                # No copy (the count attribute took it over the size limit): the original is
                # made visible again instead, and this hand-back counts as a delivery.
                await self._extend_batch(queue, q.url, back, 0)
                for d in back:
                    self._settled(d)
            for d in todo:
                _lease(d).copied = d not in back
            copied = [d for d in mine if _lease(d).copied]
            try:
                await self._remove(queue, q.url, copied, "release")
            except BrokerUnavailable:
                # A worker at shutdown may not call again: say what that leaves behind.
                log.warning(
                    "release: the copies of %d jobs are out but their originals are not "
                    "deleted yet; unless released again before their leases run out, these "
                    "jobs may run twice",
                    len(copied),
                )
                raise

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        lease = self._claim(delivery, "dead letter")
        q = await self._need(delivery.queue)
        if not lease.copied:
            await self.send_dead_letter(delivery.queue, delivery.body, letter)
            lease.copied = True
        await self._remove(delivery.queue, q.url, [delivery], "dead letter")

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """Write ``body`` with ``letter``'s facts to the DLQ of ``queue`` (confirmed).

        The facts travel as message attributes, with every character SQS refuses escaped,
        cut to fit the DLQ's MaximumMessageSize: the traceback first (its end is kept), then
        the error; a body too large for the DLQ is cut last, and the error says so. If SQS
        still refuses the letter, a bare one goes: the body in base64 and the reason, with
        why the full letter was refused."""
        q = await self._need(queue)
        entry = self._letter(q, body, letter)
        refused = await self._send(queue, q.dlq_url, [entry], q.dlq_max_size)
        if not refused:
            return
        why = refused[0][1]
        log.warning("the DLQ of %r refused a dead letter, sending it bare: %s", queue, why)
        bare = replace(letter, error=f"the DLQ refused the full letter: {why}", traceback=None)
        entry = self._letter(q, body, bare, b64=True)
        refused = await self._send(queue, q.dlq_url, [entry], q.dlq_max_size)
        if refused:
            raise MessageRefusedError(f"sqs: the DLQ of {queue!r} refused a dead letter: {why}")

    def _letter(
        self, q: _Queue, body: bytes, letter: DeadLetter, *, b64: bool = False
    ) -> dict[str, Any]:
        facts = letter.facts()
        error = sqs_text(str(facts.pop("error", "")))
        traceback = sqs_text(str(facts.pop("traceback", "")))
        attrs = {
            name: _attr(sqs_text(value)[:MAX_FACT] if isinstance(value, str) else value)
            for name, value in facts.items()
            if value != ""
        }
        group = group_and_dedup(body, self.group)[0] if q.fifo else None
        limit = q.dlq_max_size

        def entry_for(data: bytes) -> dict[str, Any]:
            ids = None if group is None else (group, _new_id())
            return self._entry(data, attrs, group=ids, b64=b64)

        kept, entry = body, entry_for(body)
        while kept and (over := _size(entry) + NOTE_ROOM - limit) > 0:
            kept = kept[: max(0, len(kept) - over)]
            entry = entry_for(kept)
        if len(kept) < len(body):
            error = f"(body cut to {len(kept)} of {len(body)} bytes to fit the DLQ) {error}"
        _add_fact(entry, "error", error, limit)
        _add_fact(entry, "traceback", traceback, limit, tail=True)
        return entry

    # -- introspection --------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        """A FIFO queue's delayed jobs are those in its delay queue, in any state."""
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

        urls = [q.url, q.dlq_url] + ([q.delay_url] if q.delay_url else [])
        (ready, in_flight, delayed), dead, *waiting = await asyncio.gather(*map(attrs, urls))
        return QueueDepth(ready, in_flight, delayed + sum(map(sum, waiting)), sum(dead))

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


def _check_lease(lease: float | None) -> float:
    if lease is not None and lease > MAX_VISIBILITY:
        raise ConfigError(
            f"sqs: visibility_timeout is at most 12 hours ({MAX_VISIBILITY} s) on SQS, got {lease}"
        )
    return DEFAULT_LEASE if lease is None else lease


def _seconds(lease: float) -> int:
    """A lease in the whole seconds SQS counts in, rounded up, at least 1."""
    return max(1, math.ceil(lease - 1e-9))


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


def _too_large(why: str) -> DecodeError:
    return DecodeError("payload_too_large", f"SQS refused to take it further: {why}")


def _half_done(d: Delivery) -> bool:
    """Its new message is out, but its original was not deleted."""
    return isinstance(d.token, Lease) and d.token.copied and not d.token.settled


def _may_run_twice(what: str, d: Delivery) -> None:
    log.warning(
        "%s of %r: its new message was sent but the original could not be deleted before "
        "its lease ran out; the job may run twice",
        what,
        d,
    )


def _carried(d: Delivery) -> dict[str, Any]:
    """The attributes a copy of ``d`` keeps, with the deliveries so far as ``aw-base``."""
    attrs = {k: v for k, v in _lease(d).attributes.items() if k not in (ENC, BASE)}
    if d.count > 1:
        attrs[BASE] = _attr(d.count - 1)
    return attrs


def _new_id() -> str:
    return os.urandom(16).hex()


def _size(entry: dict[str, Any]) -> int:
    """A message's size as SQS counts it: the body, and each attribute's name, type and
    value."""
    size = len(entry["MessageBody"].encode())
    for name, attr in (entry.get("MessageAttributes") or {}).items():
        size += len(name.encode()) + len(str(attr.get("DataType", "")).encode())
        size += len(str(attr.get("StringValue", "")).encode()) + len(attr.get("BinaryValue", b""))
    return size


def _add_fact(
    entry: dict[str, Any], name: str, text: str, limit: int, *, tail: bool = False
) -> None:
    """Add attribute ``name`` with as much of ``text`` as fits in ``limit`` bytes: its head,
    or its ``tail`` (a traceback ends with the error)."""
    room = limit - _size(entry) - len(name) - len("String")
    if not text or room <= 0:
        return
    data = text.encode()
    text = (data[-room:] if tail else data[:room]).decode(errors="ignore")
    if text:
        entry.setdefault("MessageAttributes", {})[name] = _attr(text)


def _sort_reply(reply: dict[str, Any], pending: dict[str, Any]) -> list[tuple[str, str]]:
    """Take the entries SQS took or refused out of ``pending`` (what is left failed on
    SQS's side, worth another try); returns ``(id, why)`` of those refused (sender faults)."""
    for ok in reply.get("Successful") or []:
        pending.pop(ok.get("Id"), None)
    refused = []
    for failed in reply.get("Failed") or []:
        if failed.get("SenderFault") and failed.get("Id") in pending:
            del pending[failed["Id"]]
            refused.append((str(failed["Id"]), f"{failed.get('Code')}: {failed.get('Message')}"))
    return refused


class _Raw(NamedTuple):
    """A received message as SQS holds it (its body: the SQS text), for the DLQ."""

    message_id: str
    receipt: str
    body: bytes


def _raw(m: dict[str, Any]) -> _Raw:
    body = str(m.get("Body", "")).encode(errors="surrogatepass")
    return _Raw(str(m.get("MessageId", "")), str(m.get("ReceiptHandle", "")), body)


async def _attributes(client: Any, url: str, *names: str) -> dict[str, str]:
    reply = await client.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
    return dict(reply.get("Attributes") or {})


def _max_size(attributes: dict[str, str]) -> int:
    try:
        return int(attributes.get("MaximumMessageSize", DEFAULT_MAX_SIZE))
    except ValueError:
        return DEFAULT_MAX_SIZE


def _dead_letter(queue: str, m: dict[str, Any]) -> DeadLetter:
    attrs = m.get("MessageAttributes") or {}
    try:
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
    except DecodeError:
        body = _raw(m).body  # listed as SQS holds it

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
