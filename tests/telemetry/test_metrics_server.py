"""The ``/metrics`` and ``/healthz`` endpoint under a flood of connections that send half
a request and then nothing: they hold no thread, are closed after the timeout, and past
the connection limit the oldest make room, so a scrape still answers.

These tests use the real clock: the endpoint's timeout is what is under test (0.5 s here
instead of the default 5 s)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing

import pytest

from aioworkers.monitor.health import Health, serve
from aioworkers.monitor.http_endpoint import MetricsEndpoint

HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"  # no blank line: never ends


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _serve(**options: float) -> MetricsEndpoint:
    return serve("127.0.0.1", 0, Health(), **options)


def _idle(server: MetricsEndpoint, stack: ExitStack, n: int) -> list[socket.socket]:
    """``n`` connections that each send half a request and stay open."""
    found = []
    for _ in range(n):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.server_port)))
        sock.sendall(HALF_REQUEST)
        found.append(sock)
    return found


def _get(server: MetricsEndpoint, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    with closing(conn):
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.read()


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed ``sock`` (within ``wait`` seconds)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_hold_no_thread_and_a_scrape_still_answers(sockets: ExitStack) -> None:
    # Threads of earlier tests may end meanwhile (a SQLite broker's, once collected):
    # count only the ones started here.
    before = set(threading.enumerate())
    server = _serve(timeout=30, max_connections=300)
    try:
        _idle(server, sockets, 250)
        # Answered after the server took every idle connection (it accepts in order).
        status, body = _get(server, "/metrics")
        assert status == 200
        assert b"# TYPE" in body
        assert len(set(threading.enumerate()) - before) <= 1  # the server's one thread
        assert server.connections >= 250  # (the scrape's may not be closed yet)
    finally:
        server.close()
    assert set(threading.enumerate()) - before == set()
    assert server.connections == 0


def test_idle_connections_are_closed_after_the_timeout(sockets: ExitStack) -> None:
    server = _serve(timeout=0.5, max_connections=300)
    try:
        opened = [(time.monotonic(), *_idle(server, sockets, 1)) for _ in range(250)]
        assert _get(server, "/metrics")[0] == 200
        for opened_at, sock in opened:
            assert _closed_by_server(sock, wait=10)
            assert time.monotonic() - opened_at >= 0.5  # not before its timeout
        assert server.connections == 0
    finally:
        server.close()


def test_past_the_limit_the_oldest_idle_connection_makes_room(sockets: ExitStack) -> None:
    server = _serve(timeout=30, max_connections=16)
    try:
        idle = _idle(server, sockets, 50)
        assert _get(server, "/healthz")[0] == 503  # no worker is watched: unhealthy
        assert server.connections <= 16
        # Accepted in order: all but the newest 15 idle ones were closed to make room.
        assert all(_closed_by_server(sock, wait=10) for sock in idle[:35])
        assert not any(_closed_by_server(sock, wait=0.01) for sock in idle[35:])
    finally:
        server.close()


def test_a_request_sent_byte_by_byte_is_cut_at_the_timeout() -> None:
    server = _serve(timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port)) as sock:
            started = time.monotonic()
            sock.settimeout(0.05)
            # A byte every 50 ms never lets a read time out; the request's deadline does.
            for byte in b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 200:
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                pytest.fail("the endpoint kept a request that dribbled in for 11 s")
            assert time.monotonic() - started >= 0.5
    finally:
        server.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/metrics?x=1", 200),
        ("HEAD", "/metrics", 200),
        ("GET", "/nope", 404),
        ("POST", "/metrics", 501),
    ],
)
def test_requests_are_answered_as_before(method: str, path: str, status: int) -> None:
    server = _serve()
    try:
        assert _get(server, path, method)[0] == status
    finally:
        server.close()
