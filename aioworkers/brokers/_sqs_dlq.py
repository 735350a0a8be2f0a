"""The DLQ of an SQS queue: dead letters written as messages whose attributes carry the
facts, listed and removed by receiving them (SQS cannot peek)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from ..errors import BrokerUnavailable, DecodeError
from ._kit import chunks
from ._sqs_errors import MessageRefusedError
from ._sqs_queues import Queue, SqsQueues
from ._sqs_wire import (
    MAX_BATCH,
    Raw,
    _attr,
    add_fact,
    entry,
    group_and_dedup,
    new_id,
    read_dead_letter,
    size,
    sqs_text,
)
from .base import DeadLetter

log = logging.getLogger("aioworkers")

DLQ_SCAN_VISIBILITY = 30  # seconds a DLQ listing hides the entries it reads
MAX_FACT = 1024  # characters kept of a dead letter's short facts (id, task, error type)
NOTE_ROOM = 160  # bytes kept free for the "error" attribute when a letter's body is cut


class DeadLetters:
    """Writes, lists and removes the dead letters of the queues of ``queues``; ``group`` is
    the FIFO MessageGroupId option of the broker."""

    def __init__(self, queues: SqsQueues, group: str | None) -> None:
        self._queues = queues
        self._group = group

    async def send(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """Write ``body`` with ``letter``'s facts to the DLQ of ``queue`` (confirmed).

        The facts travel as message attributes, with every character SQS refuses escaped,
        cut to fit the DLQ's MaximumMessageSize: the traceback first (its end is kept), then
        the error; a body too large for the DLQ is cut last, and the error says so. If SQS
        still refuses the letter, a bare one goes: the body in base64 and the reason, with
        why the full letter was refused."""
        q = await self._queues.need(queue)
        refused = await self._queues.send(
            queue, q.dlq_url, [self._letter(q, body, letter)], q.dlq_max_size
        )
        if not refused:
            return
        why = refused[0][1]
        log.warning("the DLQ of %r refused a dead letter, sending it bare: %s", queue, why)
        bare = replace(letter, error=f"the DLQ refused the full letter: {why}", traceback=None)
        entries = [self._letter(q, body, bare, b64=True)]
        if await self._queues.send(queue, q.dlq_url, entries, q.dlq_max_size):
            raise MessageRefusedError(f"sqs: the DLQ of {queue!r} refused a dead letter: {why}")

    def _letter(
        self, q: Queue, body: bytes, letter: DeadLetter, *, b64: bool = False
    ) -> dict[str, Any]:
        facts = letter.facts()
        error = sqs_text(str(facts.pop("error", "")))
        traceback = sqs_text(str(facts.pop("traceback", "")))
        attrs = {
            name: _attr(sqs_text(value)[:MAX_FACT] if isinstance(value, str) else value)
            for name, value in facts.items()
            if value != ""
        }
        group = group_and_dedup(body, self._group)[0] if q.fifo else None
        limit = q.dlq_max_size

        def entry_for(data: bytes) -> dict[str, Any]:
            ids = None if group is None else (group, new_id())
            return entry(data, attrs, group=ids, b64=b64)

        kept, out = body, entry_for(body)
        while kept and (over := size(out) + NOTE_ROOM - limit) > 0:
            kept = kept[: max(0, len(kept) - over)]
            out = entry_for(kept)
        if len(kept) < len(body):
            error = f"(body cut to {len(kept)} of {len(body)} bytes to fit the DLQ) {error}"
        add_fact(out, "error", error, limit)
        add_fact(out, "traceback", traceback, limit, tail=True)
        return out

    async def send_raw(self, queue: str, url: str, raw: Raw, exc: DecodeError) -> None:
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
            await self.send(queue, raw.body, letter)
            await self._queues.delete(queue, url, [raw.receipt])
        except (BrokerUnavailable, MessageRefusedError) as err:
            log.warning(
                "could not dead-letter %s now, it comes back later: %s", raw.message_id, err
            )

    # -- listing and removing -------------------------------------------------------------

    async def _scan(self, queue: str, q: Queue) -> list[tuple[DeadLetter, str]]:
        """Every DLQ entry that can be received now, hidden for a while: O(n) receives.

        The caller makes them visible again (or deletes them)."""
        found: dict[str, tuple[DeadLetter, str]] = {}
        while True:
            reply = await self._queues.call(
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
                found[m["MessageId"]] = (read_dead_letter(queue, m), m["ReceiptHandle"])
        return sorted(found.values(), key=lambda e: (e[0].dead_at, e[0].entry_id))

    async def _unhide(self, queue: str, url: str, receipts: list[str]) -> None:
        for chunk in chunks(receipts, MAX_BATCH):
            await self._queues.call(
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

    async def list(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` entries. SQS cannot peek: every entry is received (hidden
        for a moment) and made visible again, so this reads the whole DLQ, O(n), and two
        listings at once may each miss what the other holds."""
        q = await self._queues.get(queue, create=False)
        if q is None:
            return []
        entries = await self._scan(queue, q)
        await self._unhide(queue, q.dlq_url, [r for _, r in entries])
        return [e for e, _ in entries[:limit]]

    async def remove(self, queue: str, entry_ids: Collection[str] | None) -> int:
        """Delete DLQ entries by MessageId (all for ``None``): reads the whole DLQ, O(n)."""
        q = await self._queues.get(queue, create=False)
        if q is None:
            return 0
        entries = await self._scan(queue, q)
        wanted = None if entry_ids is None else set(entry_ids)
        doomed = [r for e, r in entries if wanted is None or e.entry_id in wanted]
        keep = [r for e, r in entries if wanted is not None and e.entry_id not in wanted]
        await self._queues.delete(queue, q.dlq_url, doomed)
        await self._unhide(queue, q.dlq_url, keep)
        return len(doomed)
