"""The records of an SQS event as the Lambda adapter sees them: each read into a `Delivery`,
and their visibility extended while their jobs run (the one broker call the lease loop
makes)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .brokers._sqs_wire import BASE, ENC, ETA, read_body, read_count, read_eta
from .brokers.base import Delivery
from .errors import BrokerUnavailable, DecodeError

log = logging.getLogger("aioworkers")

MAX_BATCH = 10  # SQS's limit for ChangeMessageVisibilityBatch


def read_record(record: Mapping[str, Any], queue: str) -> tuple[Delivery, DecodeError | None]:
    """The `Delivery` of an SQS event record on ``queue`` (count from ApproximateReceiveCount
    plus ``aw-base``; token ``(queue ARN, receipt handle)``), and why it can never run if an
    attribute the adapter reads is malformed."""
    arn = str(record.get("eventSourceARN", ""))
    message_id = str(record.get("messageId", ""))
    token = (arn, str(record.get("receiptHandle", "")))
    text = str(record.get("body", ""))
    body: bytes | None = None
    count, invalid = 1, None
    try:
        attrs, system = _attributes(record)
        body = read_body(text, _value(attrs, ENC))
        received = system.get("ApproximateReceiveCount")
        count = read_count("ApproximateReceiveCount", _str(received), least=1)
        count += read_count(BASE, _value(attrs, BASE))
        # The record runs when SQS delivers it; its eta is read only to refuse a malformed
        # one, as a worker's broker does.
        read_eta(_value(attrs, ETA))
    except DecodeError as exc:
        invalid = exc
    if body is None:
        body = text.encode(errors="backslashreplace")  # as it came, for the DLQ
    return Delivery(queue, message_id, body, count, token), invalid


class RecordLeases:
    """Extends the visibility of the records an invocation runs, as the SQS broker's
    `extend` does for a worker's deliveries, with ``client`` (the SQS broker's aiobotocore
    client; None: not on ``sqs://``, nothing to extend)."""

    def __init__(self, client: Any, urls: dict[str, str]) -> None:
        self._client = client
        self._urls = urls  # queue ARN -> URL, kept across invocations

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        by_arn: dict[str, list[Delivery]] = {}
        for d in deliveries:
            arn, receipt = d.token
            if arn and receipt:
                by_arn.setdefault(arn, []).append(d)
        if self._client is None or not by_arn:
            return []
        seconds = max(1, math.ceil(lease - 1e-9))
        lost: list[Delivery] = []
        try:
            for arn, group in by_arn.items():
                lost += await self._extend(arn, group, seconds)
        except BrokerUnavailable:
            raise  # the lease loop logs it and tries again at the next beat
        except Exception as exc:
            # Most likely the function's role lacks sqs:ChangeMessageVisibility: the records
            # then stay hidden for the queue's own visibility timeout. Said once a batch.
            self._client = None
            log.warning("could not extend the visibility of the records being run: %r", exc)
        return lost

    async def _extend(self, arn: str, group: list[Delivery], seconds: int) -> list[Delivery]:
        from .brokers.sqs import map_error  # on sqs:// only: aiobotocore is there

        lost: list[Delivery] = []
        try:
            url = await self._url(self._client, arn)
            for start in range(0, len(group), MAX_BATCH):
                chunk = group[start : start + MAX_BATCH]
                lost += await _extend_batch(self._client, url, chunk, seconds)
        except Exception as exc:
            # Client errors become ours at the I/O boundary, as in the broker.
            mapped = map_error(exc, "extend")
            if mapped is None:
                raise
            raise mapped from exc
        return lost

    async def _url(self, client: Any, arn: str) -> str:
        url = self._urls.get(arn)
        if url is None:
            parts = arn.split(":")
            request = {"QueueName": parts[-1]}
            if len(parts) == 6 and parts[4]:
                request["QueueOwnerAWSAccountId"] = parts[4]
            url = self._urls[arn] = str((await client.get_queue_url(**request))["QueueUrl"])
        return url


async def _extend_batch(
    client: Any, url: str, chunk: list[Delivery], seconds: int
) -> list[Delivery]:
    """Reports the records whose receipt SQS refused: another receive (or a delete) made
    them no longer this invocation's."""
    reply = await client.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": str(i), "ReceiptHandle": d.token[1], "VisibilityTimeout": seconds}
            for i, d in enumerate(chunk)
        ],
    )
    return [chunk[int(f["Id"])] for f in reply.get("Failed") or []]


def _attributes(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record's message attributes and its system attributes."""
    attrs = record.get("messageAttributes") or {}
    system = record.get("attributes") or {}
    if not isinstance(attrs, dict) or not isinstance(system, dict):
        raise DecodeError("schema_error", "the record's attributes are not objects")
    return attrs, system


def _value(attributes: dict[str, Any], name: str) -> str | None:
    """A message attribute's value in a Lambda event record (``stringValue``)."""
    a = attributes.get(name)
    if not isinstance(a, dict):
        return None
    v = a.get("stringValue", a.get("StringValue"))
    return None if v is None else str(v)


def _str(value: object) -> str | None:
    return None if value is None else str(value)
