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
and a dead letter's facts are cut to fit it (`_sqs_queues`, `_sqs_dlq`).

Leases and fencing: a receive asks SQS to hide what it returns for the lease it is given
(``VisibilityTimeout``, whole seconds, rounded up), an extend for the lease it is given
from now (``ChangeMessageVisibility``). A delivery's token holds its receipt handle, and
this process keeps a local deadline for it (the time the receive or the last extend was
*sent*, plus the lease; `_sqs_leases`). A delivery is ours while that deadline has not
passed, this process has not seen a later receive of the same message, and it was not
settled or released. Every ack, extend, retry, release and dead-letter checks that first.
The check is needed: moto accepts stale receipt handles for delete and change-visibility.
Real SQS also refuses to change the visibility of a message through a stale handle, and
`extend` reports such failures as lost; a stale *delete* may succeed on real SQS, so the
local check is the guarantee on both. What no client can rule out: a worker paused for
longer than the lease *during* one of those calls (after the check) may still delete a
message another worker has received since — at-least-once still holds, and idempotency
keys cover the effects. A retry, release or dead letter sends its new message first and
deletes the original second; the lease stays ours until the delete is done, so a caller
that tries again after a failed delete only deletes (no second copy), and a copy whose
original could not be deleted before its lease ran out is logged as a job that may run
twice.

Delays: DelaySeconds in whole seconds (rounded up), at most 900 s. A longer delay carries
an ``aw-eta`` attribute; a message received before its eta is sent again with the rest of
the delay (and deleted), inside `fetch`. FIFO queues take no per-message delay, and a
message held back inside its group would hold back the whole group: a delayed FIFO job
waits in the delay queue instead, and `fetch` moves it to the tail of its group once due
(`_sqs_delays`).

Bodies that are not valid SQS text (bytes that are not UTF-8, control characters, empty)
travel base64-encoded with ``aw-enc=b64`` (`_sqs_wire`). A message whose attributes cannot
be read (an unknown ``aw-enc`` or a body that is not in it, an ``aw-base`` or ``aw-eta``
that is not a number in range) is dead-lettered by `fetch` with a decode reason and never
handed out.

Errors: `map_error` is the one table from botocore's errors to ours (transient ->
`BrokerUnavailable`; set-up -> `ConfigError` with what to fix; a message SQS refuses for
what it holds -> `MessageRefusedError`), applied at every call (`_sqs_errors`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import BrokerUnavailable, ConfigError, DecodeError
from ._kit import by_queue, chunks
from ._sqs_delays import Delays, early, route
from ._sqs_dlq import DeadLetters
from ._sqs_errors import MessageRefusedError, map_error, mapped
from ._sqs_foreign import ForeignSqs
from ._sqs_leases import Lease, Leases, carried, half_done, lease_of, may_run_twice
from ._sqs_queues import MAX_WAIT, Queue, SqsQueues
from ._sqs_wire import (
    BASE,
    ENC,
    ETA,
    MAX_BATCH,
    MAX_DELAY,
    _attr,
    _attr_value,
    group_and_dedup,
    raw,
    read_body,
    read_count,
    read_eta,
    size,
    split_delay,
)
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth

__all__ = [
    "MAX_DELAY",
    "MAX_VISIBILITY",
    "Lease",
    "MessageRefusedError",
    "SqsBroker",
    "group_and_dedup",
    "map_error",
    "split_delay",
]

MAX_VISIBILITY = 12 * 3600  # SQS's limit for a visibility timeout
_mapped = mapped  # the name the error table's tests and older imports use

log = logging.getLogger("aioworkers")


class SqsBroker(ForeignSqs):  # RawRetry: _sqs_foreign
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
        self.group = query.get("group") or None
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        # A queue this broker creates gets it as its own visibility timeout (what Lambda,
        # or a consumer that passes none, gets).
        self._queues = SqsQueues(
            region=query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=query.get("endpoint_url") or None,
            profile=query.get("profile") or None,
            create=query.get("create", "1").lower() not in ("0", "false", "no"),
            prefix=query.get("prefix", ""),
            visibility=_seconds(self._lease),
        )
        self._leases = Leases(self._queues)
        self._dead = DeadLetters(self._queues, self.group)
        self._delays = Delays(self._queues, self._leases, self._dead, self.group)
        self._last_fetched: dict[str, int] = {}  # per queue: how busy the last fetch was

    def __repr__(self) -> str:
        where = self.endpoint_url or self.region
        queues = sorted(self._queues.known)
        return f"<SqsBroker {where} prefix={self.prefix!r} queues={queues}>"

    @property
    def region(self) -> str:
        return self._queues.region

    @property
    def endpoint_url(self) -> str | None:
        return self._queues.endpoint_url

    @property
    def prefix(self) -> str:
        return self._queues.prefix

    @property
    def create(self) -> bool:
        return self._queues.create

    async def client(self) -> Any:
        """The aiobotocore SQS client, created on first use on the running loop."""
        return await self._queues.client()

    def sqs_name(self, queue: str) -> str:
        return self._queues.sqs_name(queue)

    def queue_name(self, native_name: str) -> str:
        """The aioworkers queue name of an SQS queue name (the prefix removed)."""
        return self._queues.queue_name(native_name)

    # -- producer -------------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        """Raises `MessageRefusedError` (a `ValueError`) for a job SQS cannot take: over the
        queue's MaximumMessageSize (checked before anything is sent), or refused by SQS."""
        if not bodies:
            return
        q = await self._queues.need(queue)
        seconds, eta = split_delay(delay)
        attrs = {} if eta is None else {ETA: _attr(eta)}
        routed = [route(q, body, attrs, seconds, fresh=False, group=self.group) for body in bodies]
        entries = [entry for _, entry in routed]
        for i, entry in enumerate(entries):
            if (n := size(entry)) > q.max_size:
                raise MessageRefusedError(
                    f"sqs: job {i + 1} of {len(entries)} is {n} bytes as an SQS message, "
                    f"over the MaximumMessageSize {q.max_size} of {self.sqs_name(queue)!r}; "
                    "nothing was sent: pass a reference (a URL, a key) instead of the data"
                )
        await self._queues.send_all(queue, routed[0][0], entries, q.max_size)

    # -- consumer -------------------------------------------------------------------------

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []
        lease = self._lease if lease is None else _check_lease(lease)
        q = await self._queues.need(queue)
        if q.owed:
            await self._delays.pay_owed(queue, q)
        if q.delay_url is not None and time.monotonic() >= q.next_move:
            await self._delays.move_due(queue, q, q.delay_url)
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
        due = [d for d in out if not early(d)]
        if len(due) < len(out):
            await self._delays.redelay(queue, q, [d for d in out if early(d)])
        return due

    async def _receive(
        self, queue: str, q: Queue, n: int, wait_s: int, lease: float
    ) -> list[Delivery]:
        sent = self._leases.clock.monotonic()
        reply = await self._queues.call(
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
        for m in reply.get("Messages") or []:
            try:
                delivery = self._delivery(queue, m)
            except DecodeError as exc:
                await self._dead.send_raw(queue, q.url, raw(m), exc)
                continue
            # moto hands a message this process still holds to a second receive: keep the
            # first delivery, drop this one (real SQS never does this).
            if self._leases.hold(lease_of(delivery), lease, start=sent):
                out.append(delivery)
        return out

    @staticmethod
    def _delivery(queue: str, m: dict[str, Any]) -> Delivery:
        """The delivery of received message ``m``; `DecodeError` if its attributes cannot
        be read."""
        attrs = m.get("MessageAttributes") or {}
        count = (m.get("Attributes") or {}).get("ApproximateReceiveCount")
        received = read_count("ApproximateReceiveCount", count, least=1)
        base = read_count(BASE, _attr_value(attrs, BASE))
        eta = read_eta(_attr_value(attrs, ETA))
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
        mid = m["MessageId"]
        token = Lease(
            m["ReceiptHandle"], received, (queue, mid), base=base, eta=eta, attributes=attrs
        )
        return Delivery(queue, mid, body, base + received, token)

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: `fetch` never receives more than it returns."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        # SQS may accept an outdated receipt handle: only a lapsed lease this process
        # knows of, or a handle SQS refuses, is reported lost.
        lost: list[Delivery] = []
        for queue, group in by_queue(deliveries).items():
            mine: list[Delivery] = []
            for d in group:
                if self._leases.owned(d):
                    mine.append(d)
                elif not (isinstance(d.token, Lease) and d.token.settled):
                    lost.append(d)  # lapsed; settled by this process is not lost
            if not mine:
                continue
            q = await self._queues.need(queue)
            receipts = [lease_of(d).receipt for d in mine]
            refused = set(await self._queues.delete(queue, q.url, receipts))
            for d in mine:
                self._leases.settled(d)
                if lease_of(d).receipt in refused:
                    lost.append(d)
        return lost

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        lost: list[Delivery] = []
        seconds = _seconds(_check_lease(lease))
        for queue, group in by_queue(deliveries).items():
            mine: list[Delivery] = []
            for d in group:
                (mine if self._leases.owned(d) else lost).append(d)
            if not mine:
                continue
            q = await self._queues.need(queue)
            for chunk in chunks(mine, MAX_BATCH):
                lost += await self._extend_batch(queue, q.url, chunk, seconds)
        return lost

    async def _extend_batch(
        self, queue: str, url: str, chunk: list[Delivery], seconds: int
    ) -> list[Delivery]:
        sent = self._leases.clock.monotonic()
        reply = await self._queues.call(
            queue,
            "extend",
            lambda c: c.change_message_visibility_batch(
                QueueUrl=url,
                Entries=[
                    {
                        "Id": str(i),
                        "ReceiptHandle": lease_of(d).receipt,
                        "VisibilityTimeout": seconds,
                    }
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
                self._leases.extended(d, seconds, start=sent)
        return [chunk[i] for i in sorted(lost)]

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        lease = self._leases.claim(delivery, "retry")
        q = await self._queues.need(delivery.queue)
        if not lease.copied:
            seconds, eta = split_delay(delay)
            attrs = {} if eta is None else {ETA: _attr(eta)}
            url, entry = route(q, body, attrs, seconds, fresh=True, group=self.group)
            await self._queues.send_all(delivery.queue, url, [entry], q.max_size)
            lease.copied = True
        await self._leases.remove(delivery.queue, q.url, [delivery], "retry")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """A fresh copy, visible at once, that carries the deliveries before this one
        (`handed_back`): a hand-back at shutdown never pushes a job toward max_deliveries."""
        for queue, group in by_queue(deliveries).items():
            mine = [d for d in group if self._leases.owned(d)]
            for d in group:
                if d not in mine and half_done(d):
                    may_run_twice("release", d)
            if mine:
                await self._release(queue, await self._queues.need(queue), mine)

    async def _release(self, queue: str, q: Queue, mine: list[Delivery]) -> None:
        todo = [d for d in mine if not lease_of(d).copied]
        entries = [route(q, d.body, carried(d), 0, fresh=True, group=self.group)[1] for d in todo]
        refused = dict(await self._queues.send(queue, q.url, entries, q.max_size))
        back = [d for i, d in enumerate(todo) if i in refused]
        if back:
            # No copy (the count attribute took it over the size limit): the original is
            # made visible again instead, and this hand-back counts as a delivery.
            await self._extend_batch(queue, q.url, back, 0)
            for d in back:
                self._leases.settled(d)
        for d in todo:
            lease_of(d).copied = d not in back
        copied = [d for d in mine if lease_of(d).copied]
        try:
            await self._leases.remove(queue, q.url, copied, "release")
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
        lease = self._leases.claim(delivery, "dead letter")
        q = await self._queues.need(delivery.queue)
        if not lease.copied:
            await self._dead.send(delivery.queue, delivery.body, letter)
            lease.copied = True
        await self._leases.remove(delivery.queue, q.url, [delivery], "dead letter")

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """Write ``body`` with ``letter``'s facts to the DLQ of ``queue`` (confirmed): for a
        message no fetch handed out (the Lambda adapter's records). See `DeadLetters.send`."""
        await self._dead.send(queue, body, letter)

    # -- introspection --------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        """A FIFO queue's delayed jobs are those in its delay queue, in any state."""
        q = await self._queues.get(queue)
        if q is None:
            return QueueDepth()
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]

        async def attrs(url: str) -> list[int]:
            reply = await self._queues.call(
                queue, "depth", lambda c: c.get_queue_attributes(QueueUrl=url, AttributeNames=names)
            )
            a = reply.get("Attributes", {})
            return [int(a.get(n, 0)) for n in names]

        urls = [q.url, q.dlq_url] + ([q.delay_url] if q.delay_url else [])
        (ready, in_flight, delayed), dead, *waiting = await asyncio.gather(*map(attrs, urls))
        return QueueDepth(ready, in_flight, delayed + sum(map(sum, waiting)), sum(dead))

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` entries: reads the whole DLQ, O(n) (SQS cannot peek)."""
        return await self._dead.list(queue, limit=limit)

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        """Delete DLQ entries by MessageId (all for ``None``): reads the whole DLQ, O(n)."""
        return await self._dead.remove(queue, entry_ids)

    async def aclose(self) -> None:
        await self._queues.aclose()


def _check_lease(lease: float | None) -> float:
    if lease is not None and lease > MAX_VISIBILITY:
        raise ConfigError(
            f"sqs: visibility_timeout is at most 12 hours ({MAX_VISIBILITY} s) on SQS, got {lease}"
        )
    return DEFAULT_LEASE if lease is None else lease


def _seconds(lease: float) -> int:
    """A lease in the whole seconds SQS counts in, rounded up, at least 1."""
    return max(1, math.ceil(lease - 1e-9))
