"""Foreign deliveries: a consumer queue's message made into something the executor runs.

The body is decoded by the consumer's ``decode``; the envelope the executor sees is made
here (id: the broker's message id, attempt: from the broker's metadata) and never written
to the broker: a retry re-publishes the original body (`retry_body`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..brokers.base import ATTEMPT_HEADER, Broker, Delivery, RawRetry
from ..consumers import Consumer, Message
from ..envelope import MAX_ATTEMPT, Envelope
from ..errors import MAX_FIELD_CHARS, DecodeError, clip

_TRACE = ("traceparent", "tracestate")
# A broker without `RawRetry` (memory, SQLite) keeps the attempt of a retried
# message in front of its body; Redis did too before its own (a stored entry still reads).
_MARK = re.compile(rb"\x00aioworkers-attempt:(\d{1,10})\x00")


@dataclass(slots=True)
class ForeignEnvelope(Envelope):
    """The envelope of a foreign message (its ``args``: the decoded body and `Message`)."""


class _Runnable(Protocol):
    name: str


class ConsumerApp(Protocol):
    @property
    def consumers(self) -> Mapping[str, Consumer]: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def tasks(self) -> Mapping[str, Any]: ...


def foreign_for(app: object) -> Foreign | None:
    """The decoder of ``app``'s consumer queues, or None (then the executor pays nothing)."""
    consumers: Mapping[str, Consumer] | None = getattr(app, "__dict__", {}).get("_consumers")
    if not consumers:
        return None
    owner = cast(ConsumerApp, app)
    return Foreign(consumers, owner.broker, owner.tasks)


def marked(body: bytes, attempt: int) -> bytes:
    """``body`` with ``attempt`` in front (brokers without `RawRetry`)."""
    return b"\x00aioworkers-attempt:%d\x00" % attempt + body


class Foreign:
    def __init__(self, consumers: Mapping[str, Consumer], broker: Broker, tasks: Any) -> None:
        self.queues = consumers
        self._meta = broker.message_meta if isinstance(broker, RawRetry) else None
        self._tasks = tasks

    def prepare(
        self, delivery: Delivery, max_size: int
    ) -> tuple[Envelope | None, Any, DecodeError | None]:
        consumer = self.queues[delivery.queue]
        task = self._tasks[consumer.task_name]
        attempt = 1
        found = _MARK.match(delivery.body)
        if found is not None:
            # Taken off for good: a retry or dead letter of this delivery has the original.
            attempt = int(found.group(1))
            delivery.body = delivery.body[found.end() :]
        routing_key, headers = self._meta(delivery) if self._meta is not None else (None, {})
        attempt = _attempt(headers.get(ATTEMPT_HEADER), attempt)
        msg = Message(
            delivery.message_id,
            delivery.queue,
            delivery.body,
            routing_key,
            headers,
            delivery.count,
            attempt,
        )
        env = ForeignEnvelope(delivery.message_id, task.name, [None, msg], {}, attempt)
        # A producer's trace context: the job's span continues its trace.
        env.headers = {k: str(headers[k]) for k in _TRACE if k in headers}
        if len(delivery.body) > max_size:
            size = len(delivery.body)
            return env, task, DecodeError("payload_too_large", f"{size} bytes > {max_size}")
        try:
            env.args[0] = consumer.decoder(delivery.body)
        except Exception as exc:  # whatever the decoder raises: the body can never run
            why = clip(f"{type(exc).__name__}: {exc}", MAX_FIELD_CHARS)
            return env, task, DecodeError("decode_error", why)
        if consumer.idempotency_key is not None:
            try:
                env.key = consumer.idempotency_key(env.args[0], msg)
            except Exception as exc:
                why = clip(f"idempotency_key failed: {type(exc).__name__}: {exc}", MAX_FIELD_CHARS)
                return env, task, DecodeError("schema_error", why)
        return env, task, None


def _attempt(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        n = int(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return default
    return n if 1 <= n <= MAX_ATTEMPT else default


async def retry_body(broker: Broker, delivery: Delivery, attempt: int, delay: float) -> None:
    """Re-publish ``delivery``'s original body as ``attempt`` after ``delay`` seconds."""
    if isinstance(broker, RawRetry):
        await broker.retry_raw(delivery, body=delivery.body, attempt=attempt, delay=delay)
    else:
        await broker.retry(delivery, body=marked(delivery.body, attempt), delay=delay)
