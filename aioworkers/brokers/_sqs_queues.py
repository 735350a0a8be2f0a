"""The SQS side of the SQS broker: its aiobotocore client, queue names resolved to URLs once
(and created on first use), and the batch calls (send, delete) with their partial failures
retried by the kit's `retry_batch`. Every call's client errors are mapped at this boundary
(`_sqs_errors.mapped`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore import exceptions as bexc  # type: ignore[import-untyped]

from ..errors import BrokerUnavailable, ConfigError
from ._kit import chunks, retry_batch
from ._sqs_errors import MessageRefusedError, error_code, mapped
from ._sqs_wire import DEFAULT_MAX_SIZE, MAX_BATCH, max_size, size, sort_reply
from .base import Delivery

T = TypeVar("T")

MAX_WAIT = 20  # SQS's limit for WaitTimeSeconds


@dataclass(slots=True)
class Queue:
    """An aioworkers queue as SQS holds it: its URL, its DLQ's, and what SQS takes."""

    url: str
    dlq_url: str
    fifo: bool
    max_size: int = DEFAULT_MAX_SIZE  # bytes a message may have (the delay queue's too)
    dlq_max_size: int = DEFAULT_MAX_SIZE
    delay_url: str | None = None  # FIFO queues: where delayed jobs wait (see `_sqs_delays`)
    owed: list[Delivery] = field(default_factory=list)  # early, sent again, not yet deleted
    next_move: float = 0.0  # time.monotonic() of the next look at the delay queue


def _missing(exc: bexc.ClientError) -> bool:
    code = error_code(exc)
    return "NonExistentQueue" in code or "QueueDoesNotExist" in code


class SqsQueues:
    """The client and the queues of one broker (see the `SqsBroker` URL options)."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None,
        profile: str | None,
        create: bool,
        prefix: str,
        visibility: int,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.create = create
        self.prefix = prefix
        self._visibility = visibility  # a created queue's own VisibilityTimeout
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self.known: dict[str, Queue] = {}
        # Talked to SQS once: missing credentials are no longer a set-up error.
        self._started = False

    async def client(self) -> Any:
        """The aiobotocore SQS client, created on first use on the running loop."""
        if self._client is not None:
            return self._client
        async with self._lock:
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
                async with mapped("connect", started=self._started):
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

    async def get(self, queue: str, *, create: bool | None = None) -> Queue | None:
        """The queue, resolved once (and created if ``create``, default the URL's option);
        None if it does not exist."""
        q = self.known.get(queue)
        if q is not None:
            return q
        create = self.create if create is None else create
        client = await self.client()
        async with mapped("resolve queue", started=self._started):
            q = await self._resolve(client, self.sqs_name(queue), create)
        self._started = True
        return None if q is None else self.known.setdefault(queue, q)

    async def need(self, queue: str) -> Queue:
        q = await self.get(queue)
        if q is None:
            raise ConfigError(f"sqs: queue {self.sqs_name(queue)!r} does not exist (create=0)")
        return q

    async def _resolve(self, client: Any, name: str, create: bool) -> Queue | None:
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
        dlq_size = max_size(await _attributes(client, dlq_url, "MaximumMessageSize"))
        q = Queue(url, dlq_url, fifo, max_size=max_size(attrs), dlq_max_size=dlq_size)
        if fifo:
            delay_name = f"{name.removesuffix('.fifo')}-delay"
            q.delay_url = await self._url(client, delay_name, create, False)
            if q.delay_url is None:
                raise ConfigError(
                    f"sqs: the FIFO queue {name!r} needs the standard queue {delay_name!r} "
                    "for its delayed jobs and retries: create it, or use create=1"
                )
            delay_size = max_size(await _attributes(client, q.delay_url, "MaximumMessageSize"))
            q.max_size = min(q.max_size, delay_size)
        return q

    async def _url(self, client: Any, name: str, create: bool, fifo: bool) -> str | None:
        try:
            return str((await client.get_queue_url(QueueName=name))["QueueUrl"])
        except bexc.ClientError as exc:
            if not _missing(exc):
                raise
        if not create:
            return None
        attributes = {"VisibilityTimeout": str(self._visibility)}
        if fifo:
            attributes["FifoQueue"] = "true"
        reply = await client.create_queue(QueueName=name, Attributes=attributes)
        return str(reply["QueueUrl"])

    async def call(
        self, queue: str, what: str, fn: Callable[[Any], Awaitable[T]], *, message: bool = False
    ) -> T:
        """``fn(client)``, its errors mapped; a queue deleted under us is forgotten (resolved,
        and created, again on the next call) and the call is `BrokerUnavailable`."""
        client = await self.client()
        async with mapped(what, started=self._started, message=message):
            try:
                return await fn(client)
            except bexc.ClientError as exc:
                if _missing(exc):
                    self.known.pop(queue, None)
                    raise BrokerUnavailable(
                        f"sqs: queue {self.sqs_name(queue)!r} does not exist"
                    ) from exc
                raise

    # -- batch calls ----------------------------------------------------------------------

    async def send_all(
        self, queue: str, url: str, entries: list[dict[str, Any]], limit: int
    ) -> None:
        """`send`, and `MessageRefusedError` if SQS refuses any (the others are sent)."""
        refused = await self.send(queue, url, entries, limit)
        if refused:
            raise MessageRefusedError(
                f"sqs refused {len(refused)} of {len(entries)} messages for "
                f"{self.sqs_name(queue)!r} (the others were sent): {refused[0][1]}"
            )

    async def send(
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
            n = size(entry)
            if n > limit:
                why = f"{n} bytes as an SQS message, over the MaximumMessageSize {limit}"
                refused.append((i, f"MessageTooLong: {why}"))
                continue
            if not batches or len(batches[-1]) == MAX_BATCH or total + n > limit:
                batches.append([])
                total = 0
            batches[-1].append((i, entry))
            total += n
        for found in await asyncio.gather(*(self._send_batch(queue, url, b) for b in batches)):
            refused += found
        return sorted(refused)

    async def _send_batch(
        self, queue: str, url: str, batch: list[tuple[int, dict[str, Any]]]
    ) -> list[tuple[int, str]]:
        refused: list[tuple[int, str]] = []

        async def send(
            pending: list[tuple[int, dict[str, Any]]],
        ) -> list[tuple[int, dict[str, Any]]]:
            by_id = {str(i): entry for i, entry in pending}
            try:
                reply = await self.call(
                    queue,
                    "send",
                    lambda c: c.send_message_batch(
                        QueueUrl=url, Entries=[{"Id": i, **e} for i, e in by_id.items()]
                    ),
                    message=True,
                )
            except MessageRefusedError as exc:
                if len(pending) == 1:
                    refused.append((pending[0][0], str(exc)))
                    return []
                # The whole call was refused for one entry's sake: send them one by one.
                singles = [self._send_batch(queue, url, [item]) for item in pending]
                refused.extend(r for found in await asyncio.gather(*singles) for r in found)
                return []
            refused.extend((int(i), why) for i, why in sort_reply(reply, by_id))
            return [(int(i), entry) for i, entry in by_id.items()]

        await retry_batch(send, batch, what="sqs send")
        return refused

    async def delete(self, queue: str, url: str, receipts: list[str]) -> list[str]:
        """Delete by receipt handle; returns those SQS refused as invalid (the message is
        gone, or no longer ours)."""
        refused: list[str] = []

        async def delete(pending: list[str]) -> list[str]:
            by_id = dict(enumerate(pending))
            reply = await self.call(
                queue,
                "delete",
                lambda c: c.delete_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in by_id.items()],
                ),
            )
            left = {str(i): r for i, r in by_id.items()}
            refused.extend(left[i] for i, _ in sort_reply(reply, left))
            return list(left.values())

        await asyncio.gather(
            *(
                retry_batch(delete, chunk, what="sqs delete")
                for chunk in chunks(receipts, MAX_BATCH)
            )
        )
        return refused

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()


async def _attributes(client: Any, url: str, *names: str) -> dict[str, str]:
    reply = await client.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
    return dict(reply.get("Attributes") or {})
