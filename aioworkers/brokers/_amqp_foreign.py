"""Foreign messages on RabbitMQ: exchange bindings of consumer queues, a foreign message's
routing key and headers, its retry with the original body, and `App.publish`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiormq import exceptions as mqexc
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ..errors import BrokerUnavailable, ConfigError
from ._amqp_connections import Connections
from ._amqp_errors import RPC_TIMEOUT, io
from ._amqp_messages import headers, new, text
from ._amqp_topology import Topology
from .base import ATTEMPT_HEADER

# The routing key a message was first published with: a retry goes through a delay queue,
# which dead-letters it back under the queue's name.
ROUTING_KEY_HEADER = "aioworkers-routing-key"


def meta(message: DeliveredMessage) -> tuple[str | None, dict[str, Any]]:
    """A delivered message's routing key and headers (bytes values as text)."""
    found = {k: text(v) if isinstance(v, bytes) else v for k, v in headers(message).items()}
    key = found.get(ROUTING_KEY_HEADER)
    return (str(key) if key is not None else message.routing_key), found


def again(message: DeliveredMessage, body: bytes, attempt: int) -> tuple[bytes, Any]:
    """A retry of ``message``: its body and headers (RabbitMQ's own ``x-`` ones and our
    delivery count dropped: a retry is a fresh message), ``attempt`` and its routing key."""
    routing_key, _ = meta(message)
    kept = {k: v for k, v in headers(message).items() if not k.startswith("x-")}
    kept[ATTEMPT_HEADER] = attempt
    if routing_key is not None:
        kept[ROUTING_KEY_HEADER] = routing_key
    return new(body, kept)


def default_keys(queue: str, exchange_type: str) -> tuple[str, ...]:
    """Bound with no routing key: everything on a topic exchange, the queue's name on a
    direct one, the empty key (ignored) on fanout and headers exchanges."""
    return {"topic": ("#",), "direct": (queue,)}.get(exchange_type, ("",))


async def bind(
    connections: Connections,
    topology: Topology,
    queue: str,
    exchange: str,
    exchange_type: str,
    routing_keys: Sequence[str],
) -> None:
    """Declare ``exchange`` (durable) and bind ``queue`` to it; idempotent. An exchange
    that exists with another type or durability is a `ConfigError`."""
    await topology.ensure(queue)
    ch = await connections.controlling()
    try:
        async with io(f"bind {queue!r} to {exchange!r}", RPC_TIMEOUT):
            try:
                await ch.exchange_declare(exchange, exchange_type=exchange_type, durable=True)
            except mqexc.ChannelPreconditionFailed as exc:
                reason = text(exc.args[0] if exc.args else exc) or ""
                raise ConfigError(
                    f"amqp: exchange {exchange!r} already exists, not as a durable "
                    f"{exchange_type} exchange: declare the consumer with its type "
                    f"(exchange_type=) or delete it ({reason})"
                ) from None
            for key in routing_keys or default_keys(queue, exchange_type):
                await ch.queue_bind(queue, exchange, routing_key=key)
    finally:
        if ch.is_closed:
            connections.control = None


async def publish_to(
    connections: Connections,
    exchange: str,
    routing_key: str,
    body: bytes,
    extra: dict[str, Any],
    within: float,
) -> None:
    """Publish one persistent message to ``exchange`` and wait for its confirm."""
    raw, props = new(body, extra or None)
    async with io(f"publish to exchange {exchange!r}", within):
        ch = await connections.publishing()
        await ch.connection.ready()
        try:
            confirm = await ch.basic_publish(
                raw, exchange=exchange, routing_key=routing_key, properties=props
            )
        except mqexc.ChannelNotFoundEntity:
            connections.publisher = None
            raise ConfigError(f"amqp: no exchange named {exchange!r}") from None
    if not isinstance(confirm, spec.Basic.Ack):
        raise BrokerUnavailable(f"amqp: RabbitMQ did not confirm a publish to {exchange!r}")
