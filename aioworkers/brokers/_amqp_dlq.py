"""The DLQ of a RabbitMQ queue (``<queue>.dead``), listed by getting messages on a channel
of its own and handing them back when it closes; removing entries by id reads it all."""

from __future__ import annotations

from collections.abc import Collection

from aiormq import exceptions as mqexc
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from ._amqp_connections import Connections
from ._amqp_errors import RPC_TIMEOUT, SETTLE_TIMEOUT, io
from ._amqp_messages import ENTRY, headers, read_dead_letter, tag, text
from .base import DeadLetter


async def _get_dead(ch: AbstractChannel, queue: str, limit: int | None) -> list[DeliveredMessage]:
    got: list[DeliveredMessage] = []
    while limit is None or len(got) < limit:
        async with io("read the DLQ", RPC_TIMEOUT):  # each get: the DLQ may be long
            try:
                message = await ch.basic_get(f"{queue}.dead")
            except mqexc.ChannelNotFoundEntity:
                break
        if not isinstance(message.delivery, spec.Basic.GetOk):
            break
        got.append(message)
    return got


async def dead_letters(connections: Connections, queue: str, limit: int) -> list[DeadLetter]:
    """The oldest ``limit`` entries."""
    async with connections.reader() as ch:
        got = await _get_dead(ch, queue, limit)
        return [read_dead_letter(queue, m) for m in got]


async def remove_dead_letters(
    connections: Connections, queue: str, entry_ids: Collection[str] | None
) -> int:
    """Delete entries by ``entry_id`` (all for None): purge, or read the whole DLQ (O(n))."""
    if entry_ids is None:
        async with connections.reader() as ch, io("purge the DLQ", RPC_TIMEOUT):
            try:
                ok = await ch.queue_purge(f"{queue}.dead")
            except mqexc.ChannelNotFoundEntity:
                return 0
            return int(ok.message_count or 0)
    wanted = set(entry_ids)
    removed = 0
    async with connections.reader() as ch:
        for message in await _get_dead(ch, queue, None):
            if text(headers(message).get(ENTRY)) in wanted:
                async with io("ack a DLQ entry", SETTLE_TIMEOUT):
                    await ch.basic_ack(tag(message))
                removed += 1
    return removed
