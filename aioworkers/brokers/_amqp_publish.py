"""Publishing to RabbitMQ: persistent messages on a channel with publisher confirms, on a
connection of its own (`_amqp_connections`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiormq import exceptions as mqexc
from pamqp import commands as spec

from ..errors import BrokerUnavailable
from ._amqp_connections import Connections
from ._amqp_errors import io
from ._amqp_messages import new
from ._amqp_topology import Topology

_CHUNK = 1000  # publishes awaiting their confirms at once


class Publisher:
    """Sends messages and waits for their confirms, each call within ``timeout`` seconds
    (the URL's ``publish_timeout``) unless told otherwise."""

    def __init__(self, connections: Connections, topology: Topology, timeout: float) -> None:
        self._connections = connections
        self._topology = topology
        self.timeout = timeout

    async def send(
        self,
        routing_key: str,
        messages: Sequence[tuple[bytes, Any]],
        *,
        within: float | None = None,
    ) -> None:
        """Publish persistent messages and wait for every confirm, ``within`` seconds
        (``publish_timeout`` by default). One that timed out may still be enqueued."""
        seconds = self.timeout if within is None else within
        async with io(f"publish to {routing_key!r}", seconds):
            ch = await self._connections.publishing()
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
                    self._topology.forget()
                    raise BrokerUnavailable(f"amqp: {routing_key!r} is gone: {exc}") from None
                if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
                    raise BrokerUnavailable(
                        f"amqp: RabbitMQ did not confirm a publish to {routing_key!r}"
                    )

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        messages = [new(b) for b in bodies]
        try:
            await self.send(await self._topology.route(queue, delay), messages)
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise  # a slow or blocked RabbitMQ: trying again would double the wait
            # Once more on a fresh channel (and connection, if that is what died): a
            # connection RabbitMQ dropped is often only noticed on first use.
            self._connections.publisher = None
            await self.send(await self._topology.route(queue, delay), messages)
