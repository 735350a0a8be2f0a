"""HTTP push: run jobs on Cloud Run and other platforms that push each message to an HTTP
endpoint and read the status code (Pub/Sub push, Cloud Tasks, Eventarc, any HTTP push).

```python
push = aioworkers.push_app(app, auth=aioworkers.push.bearer_token(token))
# uvicorn module:push,  or  api.mount("/push", push)
```

Each request runs one job through the same runtime as a worker and the Lambda adapter
(decode, gates, idempotency claim, handler, outcome, the inline settle strategy). 2xx:
ok (204), duplicate, dead-lettered, cancelled (200): the platform drops the message. 503
with ``Retry-After``: a retry, a deferral or a released job: the platform redelivers it.
Dead letters (decode errors, ``Reject``, retries spent by the platform's attempt or the
envelope's, ``max_deliveries``) go to the app's broker DLQ before the 2xx. 401: no or a
wrong token; 429: ``max_concurrency`` jobs already in flight; 404/405: no such route.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

import orjson

from ._push_auth import Auth, bearer_token, google_oidc, no_auth
from ._push_read import Pushed, read_job, read_pubsub
from ._push_run import PushRunner
from .app import App
from .brokers.base import DeadLetterWriter
from .envelope import now_ms
from .errors import ConfigError, DecodeError
from .task import Call

log = logging.getLogger("aioworkers")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The default cap on a job's run: Cloud Run's default request timeout (300 s) less time to
# settle and answer. Pub/Sub waits up to the subscription's ack deadline (at most 600 s).
DEFAULT_TIMEOUT = 270.0
# Room for the Pub/Sub wrapper around a base64 body (4/3 of it) and its attributes.
WRAPPER_ROOM = 64 * 1024


class PushApp:
    """The ASGI app `push_app` returns: ``POST /pubsub``, ``POST /job``, ``GET /healthz``
    (relative to where it is mounted)."""

    def __init__(
        self,
        app: App,
        *,
        auth: Auth,
        max_concurrency: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.app = app
        self.auth = auth
        self.max_concurrency = max_concurrency
        self.runner = PushRunner(app, timeout=timeout)
        self.in_flight = 0
        self.counts: Counter[str] = Counter()
        self._started: asyncio.Lock | None = None
        self._hooks_ran = False

    def __repr__(self) -> str:
        limit = self.max_concurrency if self.max_concurrency is not None else "-"
        return f"<PushApp {self.app.broker_name} in_flight={self.in_flight}/{limit}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = _route_path(scope)
        routes = {"/pubsub": read_pubsub, "/job": read_job}
        if path == "/healthz":
            if scope["method"] not in ("GET", "HEAD"):
                await _answer(send, 405, {"error": "method not allowed"})
                return
            body = {"status": "ok", "in_flight": self.in_flight, "outcomes": dict(self.counts)}
            await _answer(send, 200, body)
        elif path not in routes:
            await _answer(send, 404, {"error": "not found"})
        elif scope["method"] != "POST":
            await _answer(send, 405, {"error": "method not allowed"})
        else:
            await self._push(scope, receive, send, routes[path])

    async def _push(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        read: Callable[[bytes, Mapping[str, str]], Pushed],
    ) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if not await self.auth(headers, query):
            await _answer(send, 401, {"error": "unauthorized"}, {"www-authenticate": "Bearer"})
            return
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            await _answer(send, 429, {"error": "busy"}, {"retry-after": "1"})
            return
        self.in_flight += 1
        try:
            await self._start()
            raw, whole = await _read_body(
                receive, self.app.max_message_size * 4 // 3 + WRAPPER_ROOM
            )
            if raw is None:
                return  # the client went away: nothing was run, nothing to answer
            pushed = read(raw, headers)
            if not whole:
                size = self.app.max_message_size
                why = f"the request is over {size} bytes"
                invalid = DecodeError("payload_too_large", why)
                pushed = Pushed(raw[:1024], pushed.message_id, invalid=invalid)
            result = await self.runner.run(pushed, query.get("queue"))
        finally:
            self.in_flight -= 1
        self.counts[result.outcome] += 1
        await _answer(send, result.status, result.body or None, result.headers)

    async def _start(self) -> None:
        """The app's startup hooks, once, before the first job (a mounted app gets no
        lifespan events of its own)."""
        if self._hooks_ran:
            return
        if self._started is None:
            self._started = asyncio.Lock()
        async with self._started:
            if not self._hooks_ran:
                await self.app.run_hooks("startup")
                self._hooks_ran = True

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._hooks_ran:
                    await self.app.run_hooks("shutdown")
                await self.app.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _route_path(scope: Scope) -> str:
    """The path below where the app is mounted (Starlette's Mount keeps the full path in
    ``path`` and the mount point in ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


async def _read_body(receive: Receive, limit: int) -> tuple[bytes | None, bool]:
    """The body, at most ``limit`` bytes kept (False: there was more); None if the client
    disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        if size <= limit:
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body[: limit + 1], size <= limit


async def _answer(
    send: Send, status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str] = {}
) -> None:
    content = orjson.dumps(body) if body is not None else b""
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    if body is not None:
        raw.append((b"content-type", b"application/json"))
    raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def push_app(
    app: App,
    *,
    auth: Auth | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> PushApp:
    """The ASGI app that runs ``app``'s jobs from HTTP pushes (see the module doc).

    ``auth`` is required: `bearer_token`, `google_oidc`, or `no_auth` to disable it.
    ``max_concurrency`` bounds the jobs in flight (429 beyond). ``timeout`` caps each
    job's run (a task's own ``timeout`` if shorter), below the platform's request
    deadline. The app's broker must be able to write dead letters directly
    (`DeadLetterWriter`: Redis, SQLite, PostgreSQL, SQS, memory)."""
    if auth is None:
        raise ConfigError(
            "push_app() needs auth=: aioworkers.push.bearer_token(token), "
            "aioworkers.push.google_oidc(audience), or aioworkers.push.no_auth() to disable it"
        )
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
    if not isinstance(app.broker, DeadLetterWriter):
        raise ConfigError(
            f"push_app() dead-letters into the app's broker, and {app.broker_name} cannot "
            "write a dead letter directly: use redis://, sqlite://, postgresql:// or sqs://"
        )
    return PushApp(app, auth=auth, max_concurrency=max_concurrency, timeout=timeout)


def envelope(app: App, call: Call) -> tuple[bytes, str]:
    """The envelope ``task.enqueue`` would publish for ``call``, and its job id: the bytes
    to publish to a Pub/Sub topic or put in a Cloud Tasks task's body."""
    _, body, job_id = app._encode(replace(call, delay=0.0), now_ms())
    return body, job_id


def publish_request(
    app: App,
    call: Call | bytes,
    *,
    platform: str = "pubsub",
    url: str = "http://localhost:8080",
    token: str | None = None,
    attempt: int = 1,
) -> Any:
    """The ``httpx.Request`` a ``platform`` (``"pubsub"`` or ``"cloudtasks"``) would send
    to the push app at ``url`` for ``call`` (``task.call(...)``, or an envelope from
    `envelope`, to push one message again) on its ``attempt``: for testing a push
    deployment locally (``await client.send(request)``)."""
    import base64

    import httpx

    if isinstance(call, bytes):
        body, job_id = call, hashlib.sha256(call).hexdigest()[:32]
    else:
        body, job_id = envelope(app, call)
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    if platform == "pubsub":
        doc = {
            "message": {"data": base64.b64encode(body).decode(), "messageId": job_id},
            "subscription": "projects/local/subscriptions/aioworkers",
            "deliveryAttempt": attempt,
        }
        return httpx.Request("POST", f"{url.rstrip('/')}/pubsub", json=doc, headers=headers)
    if platform == "cloudtasks":
        headers |= {
            "content-type": "application/octet-stream",
            "x-cloudtasks-taskname": job_id,
            "x-cloudtasks-taskretrycount": str(attempt - 1),
        }
        return httpx.Request("POST", f"{url.rstrip('/')}/job", content=body, headers=headers)
    raise ValueError(f"platform must be 'pubsub' or 'cloudtasks', got {platform!r}")


__all__ = [
    "Auth",
    "PushApp",
    "bearer_token",
    "envelope",
    "google_oidc",
    "no_auth",
    "publish_request",
    "push_app",
]
