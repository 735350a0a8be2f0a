"""The connections and channels of the RabbitMQ broker.

Two connections: one only publishes, the other consumes, acks and declares. RabbitMQ's
memory and disk alarms block a connection that publishes (it stops reading it), so acks
and a shutdown never wait behind a blocked publish. Channels: publisher confirms on the
publishing connection; on the main one, a consuming channel (acks and nacks go there, and
its *generation* counts how many it replaced: a delivery of an older one is no longer
ours), one for declarations and one for passive declares (a miss closes it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection

from ..errors import BrokerUnavailable
from ._amqp_errors import CLOSE_TIMEOUT, CONNECT_TIMEOUT, io


def alive(ch: AbstractChannel | None) -> bool:
    return ch is not None and not ch.is_closed


class Connections:
    """Opened on first use, again after they close; ``url`` without aioworkers' options."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: AbstractConnection | None = None  # consuming, acks, declarations
        self._pconn: AbstractConnection | None = None  # publishing only
        self._connecting = {"main": asyncio.Lock(), "publish": asyncio.Lock()}
        self.consumer: AbstractChannel | None = None  # consuming: acks and nacks go here
        self.control: AbstractChannel | None = None  # declarations
        self.probe: AbstractChannel | None = None  # passive declares (a miss closes it)
        self.publisher: AbstractChannel | None = None  # publisher confirms (on ``_pconn``)
        self.gen = 0  # the consuming channel's generation

    @property
    def current(self) -> AbstractConnection | None:
        """The main connection if it was opened (it may have closed since)."""
        return self._conn

    async def _connect(self, purpose: str) -> AbstractConnection:
        async with io("connect", CONNECT_TIMEOUT):
            # Named for `rabbitmqctl list_connections` and the management UI.
            return await aiormq.connect(
                self._url, client_properties={"connection_name": f"aioworkers {purpose}"}
            )

    async def main(self) -> AbstractConnection:
        """The main connection: consuming, acks, declarations; it never publishes."""
        conn = self._conn
        if conn is None or conn.is_closed:
            async with self._connecting["main"]:
                if self._conn is None or self._conn.is_closed:
                    self._conn = None
                    self._conn = await self._connect("main")
                conn = self._conn
        return conn

    async def _publishing(self) -> AbstractConnection:
        conn = self._pconn
        if conn is None or conn.is_closed:
            async with self._connecting["publish"]:
                if self._pconn is None or self._pconn.is_closed:
                    self._pconn = None
                    self._pconn = await self._connect("publish")
                conn = self._pconn
        return conn

    async def channel(self, conn: AbstractConnection, *, confirms: bool = False) -> AbstractChannel:
        async with io("open a channel", CONNECT_TIMEOUT):
            return await conn.channel(publisher_confirms=confirms, on_return_raises=confirms)

    async def publishing(self) -> AbstractChannel:
        if not alive(self.publisher):
            self.publisher = await self.channel(await self._publishing(), confirms=True)
        assert self.publisher is not None
        return self.publisher

    async def controlling(self) -> AbstractChannel:
        if not alive(self.control):
            self.control = await self.channel(await self.main())
        assert self.control is not None
        return self.control

    async def probing(self) -> AbstractChannel:
        if not alive(self.probe):
            self.probe = await self.channel(await self.main())
        assert self.probe is not None
        return self.probe

    async def consuming(self, replaced: Callable[[int], None]) -> AbstractChannel:
        """The consuming channel; a new one (the first, or after the last closed) is a new
        generation: ``replaced(gen)`` runs once it is open."""
        if not alive(self.consumer):
            ch = await self.channel(await self.main())
            self.gen += 1
            self.consumer = ch
            replaced(self.gen)
        assert self.consumer is not None
        return self.consumer

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AbstractChannel]:
        """A channel of its own: closing it hands back, in place, whatever it got."""
        ch = await self.channel(await self.main())
        try:
            yield ch
        finally:
            with contextlib.suppress(BrokerUnavailable):
                async with io("close a channel", CLOSE_TIMEOUT):
                    await ch.close()

    async def aclose(self) -> None:
        conns, self._conn, self._pconn = (self._conn, self._pconn), None, None
        self.consumer = self.control = self.probe = self.publisher = None
        await asyncio.gather(*(_close(c) for c in conns if c is not None))


async def _close(conn: AbstractConnection) -> None:
    if conn.is_closed:
        return
    # Bounded: a connection blocked by a resource alarm is not read, so its close is not
    # answered; the client then drops the socket on its own.
    with contextlib.suppress(BrokerUnavailable):
        async with io("close the connection", CLOSE_TIMEOUT):
            await conn.close()
