"""Foreign messages on SQS (`RawRetry`, mixed into `SqsBroker`): a message's attributes as
its headers, and a retry that sends the original body again with the attempt in the
``aioworkers-attempt`` message attribute."""

from __future__ import annotations

import base64
from typing import Any

from ._sqs_delays import route
from ._sqs_leases import Lease, Leases
from ._sqs_queues import SqsQueues
from ._sqs_wire import ETA, _attr, split_delay
from .base import ATTEMPT_HEADER, Delivery

_OURS = "aw-"  # the broker's own attributes (_sqs_wire): set again by each send


def _value(attribute: Any) -> Any:
    if not isinstance(attribute, dict):
        return None
    if "StringValue" in attribute:
        return attribute["StringValue"]
    binary = attribute.get("BinaryValue")
    return base64.b64decode(binary) if isinstance(binary, str) else binary


class ForeignSqs:
    """`RawRetry` for `SqsBroker`."""

    _leases: Leases
    _queues: SqsQueues
    group: str | None

    def message_meta(self, delivery: Delivery) -> tuple[str | None, dict[str, Any]]:
        """No routing key; the message attributes (String and Number as text)."""
        lease = delivery.token
        attrs = lease.attributes if isinstance(lease, Lease) else {}
        return None, {k: _value(v) for k, v in attrs.items() if not k.startswith(_OURS)}

    async def retry_raw(
        self, delivery: Delivery, *, body: bytes, attempt: int, delay: float
    ) -> None:
        """`SqsBroker.retry`, the producer's attributes kept and the attempt among them."""
        lease = self._leases.claim(delivery, "retry")
        q = await self._queues.need(delivery.queue)
        if not lease.copied:
            seconds, eta = split_delay(delay)
            attrs = {k: v for k, v in lease.attributes.items() if not k.startswith(_OURS)}
            attrs[ATTEMPT_HEADER] = _attr(attempt)
            if eta is not None:
                attrs[ETA] = _attr(eta)
            url, entry = route(q, body, attrs, seconds, fresh=True, group=self.group)
            await self._queues.send_all(delivery.queue, url, [entry], q.max_size)
            lease.copied = True
        await self._leases.remove(delivery.queue, q.url, [delivery], "retry")
