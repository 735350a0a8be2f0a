"""Delays on SQS beyond what SQS does: DelaySeconds is at most 900 s, and FIFO queues take
none. A message received before its ``aw-eta`` is sent again with the rest of its delay;
a delayed FIFO job waits in the queue's standard delay queue and is moved to the tail of
its group once due."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ..errors import BrokerUnavailable, DecodeError
from ._sqs_dlq import DeadLetters
from ._sqs_leases import Leases, carried, lease_of, may_run_twice
from ._sqs_queues import Queue, SqsQueues
from ._sqs_wire import (
    DEDUP,
    ENC,
    ETA,
    MAX_BATCH,
    MAX_DELAY,
    Raw,
    _attr,
    _attr_value,
    entry,
    fifo_id,
    group_and_dedup,
    new_id,
    raw,
    read_body,
    read_eta,
    too_large,
)
from .base import Delivery

log = logging.getLogger("aioworkers")

MOVE_EVERY = 1.0  # seconds between two looks at a FIFO queue's delay queue
MOVE_VISIBILITY = 30  # seconds a delayed job being moved is hidden (well inside the 5-minute
# deduplication window, so a move repeated after a failure is dropped by SQS)
MAX_MOVES = 10  # receives of due delayed jobs in one fetch at most


def route(
    q: Queue, body: bytes, attrs: dict[str, Any], seconds: int, *, fresh: bool, group: str | None
) -> tuple[str, dict[str, Any]]:
    """The URL a message for ``q`` goes to, and its entry. ``fresh``: a new message for SQS
    (a retry, a hand-back), never deduplicated against the job's first send; ``group``: the
    broker's FIFO MessageGroupId option."""
    if not q.fifo:
        return q.url, entry(body, attrs, delay=seconds)
    group_id, dedup = group_and_dedup(body, group)
    if seconds:
        # FIFO queues take no per-message delay, and a message held back inside its group
        # would hold back the whole group: it waits in the delay queue.
        assert q.delay_url is not None
        keep = {} if fresh else {DEDUP: _attr(dedup)}
        return q.delay_url, entry(body, {**attrs, **keep}, delay=seconds)
    return q.url, entry(body, attrs, group=(group_id, new_id() if fresh else dedup))


def early(d: Delivery) -> bool:
    """Received before its eta (a delay beyond 900 s)."""
    eta = lease_of(d).eta
    return eta is not None and eta > time.time_ns() // 1_000_000 + 500


class Delays:
    """What `SqsBroker.fetch` does for delays, before it hands deliveries out."""

    def __init__(
        self, queues: SqsQueues, leases: Leases, dead: DeadLetters, group: str | None
    ) -> None:
        self._queues = queues
        self._leases = leases
        self._dead = dead
        self._group = group

    async def redelay(self, queue: str, q: Queue, early: list[Delivery]) -> None:
        """Send early messages again with the rest of their delay (a FIFO queue's to its
        delay queue), then delete them; a delete that fails is owed (`pay_owed`)."""
        now = time.time_ns() // 1_000_000
        routed = []
        for d in early:
            seconds = math.ceil(((lease_of(d).eta or now) - now) / 1000)
            # This receive was no delivery: the copy carries the count so far.
            seconds = max(1, min(MAX_DELAY, seconds))
            routed.append(route(q, d.body, carried(d), seconds, fresh=True, group=self._group))
        try:
            entries = [e for _, e in routed]
            refused = dict(await self._queues.send(queue, routed[0][0], entries, q.max_size))
        except BrokerUnavailable as exc:
            log.warning("could not delay %d early messages again: %s", len(early), exc)
            for d in early:
                self._leases.settled(d)  # they come back after their visibility timeout
            return
        for i, d in enumerate(early):
            if i in refused:
                message = Raw(d.message_id, lease_of(d).receipt, d.body)
                await self._dead.send_raw(queue, q.url, message, too_large(refused[i]))
                self._leases.settled(d)
            else:
                lease_of(d).copied = True
                q.owed.append(d)
        await self.pay_owed(queue, q)

    async def pay_owed(self, queue: str, q: Queue) -> None:
        """Delete the originals of early messages already sent on (the copy and the
        original must not both come back); if SQS cannot be reached, at the next fetch."""
        owed, q.owed = q.owed, []
        mine = [d for d in owed if self._leases.owned(d)]
        for d in owed:
            if d not in mine:
                may_run_twice("delay", d)
        if not mine:
            return
        try:
            await self._leases.remove(queue, q.url, mine, "delay")
        except BrokerUnavailable as exc:
            q.owed += mine
            log.warning("could not delete %d early messages sent on, later: %s", len(mine), exc)

    async def move_due(self, queue: str, q: Queue, url: str) -> None:
        """Move the delayed jobs of FIFO queue ``q`` that are due from its delay queue
        ``url`` to the tail of their group; early ones wait there again."""
        q.next_move = time.monotonic() + MOVE_EVERY
        for _ in range(MAX_MOVES):
            reply = await self._queues.call(
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

    async def _move(self, queue: str, q: Queue, url: str, messages: list[dict[str, Any]]) -> None:
        now = time.time_ns() // 1_000_000
        moves: dict[str, list[tuple[Raw, dict[str, Any]]]] = {q.url: [], url: []}
        for m in messages:
            try:
                target, moved = self._moved(q, url, m, now)
            except DecodeError as exc:
                await self._dead.send_raw(queue, url, raw(m), exc)
                continue
            moves[target].append((raw(m), moved))
        done: list[str] = []
        for target, items in moves.items():
            entries = [e for _, e in items]
            refused = dict(await self._queues.send(queue, target, entries, q.max_size))
            for i, (message, _) in enumerate(items):
                if i in refused:
                    await self._dead.send_raw(queue, url, message, too_large(refused[i]))
                else:
                    done.append(message.receipt)
        await self._queues.delete(queue, url, done)

    def _moved(self, q: Queue, url: str, m: dict[str, Any], now: int) -> tuple[str, dict[str, Any]]:
        """Where a message of the delay queue ``url`` goes now, and its entry: to its group
        when due, else back with the rest of its delay. `DecodeError` if unreadable."""
        attrs = m.get("MessageAttributes") or {}
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
        eta = read_eta(_attr_value(attrs, ETA))
        found = _attr_value(attrs, DEDUP)
        # One deduplication id for every leg (a delayed enqueue's is its job's): a copy left
        # behind by a failed delete joins the group as a duplicate that SQS drops.
        dedup = found if found is not None and fifo_id(found) else str(m["MessageId"])
        if eta is not None and eta > now + 500:
            seconds = min(MAX_DELAY, math.ceil((eta - now) / 1000))
            return url, entry(body, {**attrs, DEDUP: _attr(dedup)}, delay=seconds)
        rest = {k: v for k, v in attrs.items() if k not in (ENC, ETA, DEDUP)}
        group_id = group_and_dedup(body, self._group)[0]
        return q.url, entry(body, rest, group=(group_id, dedup))
