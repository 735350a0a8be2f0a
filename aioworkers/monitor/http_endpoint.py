"""The HTTP endpoint behind ``run --metrics-port``, on one thread of its own (it answers
while the event loop is stuck).

The thread serves every connection through a selector, so a connection that sends its
request slowly, or never, costs a socket and a small buffer, not a thread. Each one gets
``timeout`` seconds to send its request and as long again to take the reply, then it is
closed; past ``max_connections`` the oldest one still sending its request is closed to
make room, so a flood of idle connections can't lock a scraper out. A request is a
request line and headers, at most 8 KiB (no body); each connection carries one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger("aioworkers")

# ``respond(path)`` -> (status, content type, body), for GET and HEAD.
Respond = Callable[[str], tuple[int, str, bytes]]

MAX_REQUEST = 8192
_FAILED = b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


class _Exchange(BaseHTTPRequestHandler):
    """One request parsed, and its reply written, in memory by the standard handler."""

    def __init__(self, request: bytes, address: Any, respond: Respond) -> None:
        # Not BaseRequestHandler.__init__: the selector loop owns the socket.
        self.client_address = address
        self.rfile = io.BytesIO(request)
        self.reply = io.BytesIO()
        self.wfile = self.reply
        self._respond = respond
        self.handle_one_request()

    def do_GET(self) -> None:
        status, kind, body = self._respond(self.path.split("?", 1)[0])
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: " + format, *args)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    address: Any
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None  # what is left to send, once the request is in


def _complete(request: bytearray) -> bool:
    return b"\n\r\n" in request or b"\n\n" in request


class MetricsEndpoint:
    """Serves ``respond`` on ``host:port`` (`start` it; `close` stops it)."""

    def __init__(
        self,
        host: str,
        port: int,
        respond: Respond,
        *,
        timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self._respond = respond
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.setblocking(False)
        self.server_port: int = self._listener.getsockname()[1]
        self._address = f"{host}:{self.server_port}"
        self._wake, self._waker = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._connections: dict[socket.socket, _Connection] = {}  # oldest first
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="aioworkers-metrics", daemon=True)

    def __repr__(self) -> str:
        return (
            f"<MetricsEndpoint {self._address} "
            f"connections={self.connections}/{self.max_connections}>"
        )

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection."""
        if self._stopping:
            return
        self._stopping = True
        if self._thread.is_alive():
            # The thread may be on its way out already, its end of the pipe closed.
            with contextlib.suppress(OSError):
                self._waker.send(b"\0")
            self._thread.join()
        else:  # never started, or already stopped by an error (and closed)
            self._close_all()

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select(self._wait()):
                    try:
                        self._ready(key)
                    except Exception:  # one connection's fault: the endpoint stays up
                        log.exception("metrics endpoint: a connection failed")
                        self._drop(key.data)
                self._expire(time.monotonic())
        except Exception:
            log.exception("metrics endpoint: stopped by an error")
        finally:
            self._close_all()

    def _wait(self) -> float | None:
        if not self._connections:
            return None
        first = min(conn.deadline for conn in self._connections.values())
        return max(0.0, first - time.monotonic())

    def _ready(self, key: selectors.SelectorKey) -> None:
        conn: _Connection | None = key.data
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj is self._wake:
            self._wake.recv(64)
        # Not if an accept in this same round closed it to make room.
        elif conn is not None and conn.sock in self._connections:
            if conn.reply is None:
                self._read(conn)
            else:
                self._send(conn)

    def _accept(self) -> None:
        for _ in range(self.max_connections):  # then serve the others a turn
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors, say: the listener stays readable, so pause
                # rather than spin (this thread serves nothing else meanwhile anyway).
                log.warning("metrics endpoint: accept failed: %s", exc)
                time.sleep(0.5)
                return
            if len(self._connections) >= self.max_connections and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Connection(sock, address, time.monotonic() + self.timeout)
            self._connections[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its request, if there is one."""
        for conn in self._connections.values():
            if conn.reply is None:
                self._drop(conn)
                return True
        return False

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.request += data
        if not data or len(conn.request) > MAX_REQUEST:
            self._drop(conn)
        elif _complete(conn.request):
            conn.reply = memoryview(self._answer(conn))
            conn.deadline = time.monotonic() + self.timeout
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _answer(self, conn: _Connection) -> bytes:
        try:
            exchange = _Exchange(bytes(conn.request), conn.address, self._respond)
        except Exception:
            log.exception("metrics endpoint: a request failed")
            return _FAILED
        return exchange.reply.getvalue()

    def _send(self, conn: _Connection) -> None:
        assert conn.reply is not None
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(conn.reply)  # the client went away: nothing more to send
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            log.debug("metrics endpoint: closed %s after %s s", conn.address, self.timeout)
            self._drop(conn)

    def _drop(self, conn: _Connection | None) -> None:
        if conn is None or self._connections.pop(conn.sock, None) is None:
            return
        self._selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._connections.values()):
            self._drop(conn)
        if self._listener.fileno() == -1:
            return  # closed already
        self._selector.close()
        for sock in (self._listener, self._wake, self._waker):
            sock.close()
