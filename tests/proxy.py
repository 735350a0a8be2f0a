"""A TCP proxy for network fault tests: it forwards bytes between a client and a server
until told to misbehave.

- `pause` black-holes every connection: sockets stay open, bytes in either direction are
  read and dropped (what a dead link or a silently dropped NAT entry looks like to both
  ends); `resume` forwards again, for old and new connections alike.
- `drop_next_reply` lets the next request through but discards the server's answer and
  closes that connection: the request was applied, the client never hears so.
- `close_all` closes every open connection at once (a server restart, seen from the client).
"""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """``async with Proxy(host, port) as proxy:`` listens on ``127.0.0.1:proxy.port``."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.paused = False
        self.connections = 0  # accepted so far
        self.dropped_replies = 0
        self._drop_reply = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "forwarding"
        return f"<Proxy :{self.port} -> {self.upstream[0]}:{self.upstream[1]} {state}>"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def drop_next_reply(self) -> None:
        self._drop_reply = True

    async def close_all(self) -> None:
        for writer in list(self._open):
            writer.close()
        for writer in list(self._open):
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._open.clear()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.close_all()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._open.discard(client_w)
            return
        self._open.add(server_w)
        ends = (client_w, server_w)
        for task in (
            asyncio.create_task(self._pump(client_r, server_w, ends, reply=False)),
            asyncio.create_task(self._pump(server_r, client_w, ends, reply=True)),
        ):
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        reply: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.paused:
                    continue  # black hole: read and forget
                if reply and self._drop_reply:
                    self._drop_reply = False
                    self.dropped_replies += 1
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            for end in ends:
                end.close()
                self._open.discard(end)
