"""Who may see the dashboard: the ``auth`` callable, its two ready-made kinds, and the
one case that needs none (read-only, served on loopback, to loopback)."""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import ipaddress
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

AuthResult = bool | Response
Auth = Callable[[Request], AuthResult | Awaitable[AuthResult]]
"""Takes the request; returns True to let it through, False for a 401, or a `Response` to
send instead (a redirect to the application's own login page, say)."""

REALM = "aioworkers"


def _equal(given: str, expected: str) -> bool:
    # Constant time: the comparison must not tell how much of a guess was right.
    return hmac.compare_digest(given.encode(), expected.encode())


def basic_auth(username: str, password: str) -> Auth:
    """HTTP Basic authentication against one user: a request without the right
    ``Authorization`` header gets a 401 with a ``WWW-Authenticate`` challenge, so a
    browser asks for the login."""
    if not username or not password:
        raise ValueError("basic_auth needs a non-empty username and password")
    challenge = {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}

    def check(request: Request) -> AuthResult:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, given = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            # Both compared, always: which one was wrong is not told by the time taken.
            if sep and _equal(user, username) & _equal(given, password):
                return True
        return PlainTextResponse("login required", status_code=401, headers=challenge)

    return check


def bearer_token(token: str) -> Auth:
    """``Authorization: Bearer <token>`` (for a proxy or a script in front of the
    dashboard): anything else gets a 401 with a ``WWW-Authenticate: Bearer`` challenge."""
    if len(token) < 16:
        raise ValueError("bearer_token needs a token of at least 16 characters")
    challenge = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}

    def check(request: Request) -> AuthResult:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _equal(given.strip(), token):
            return True
        return PlainTextResponse("a bearer token is required", status_code=401, headers=challenge)

    return check


def loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_only(request: Request) -> bool:
    """Served on a loopback address, to a loopback client, not through a proxy (one on
    this machine would make every remote visitor look local)."""
    server = request.scope.get("server")
    client = request.client
    proxied = "forwarded" in request.headers or "x-forwarded-for" in request.headers
    return (
        not proxied
        and loopback(server[0] if server else None)
        and loopback(client.host if client else None)
    )


async def check(request: Request, auth: Auth | None) -> Response | None:
    """None if the request may go on, else the response that refuses it."""
    if auth is None:
        if local_only(request):
            return None
        return PlainTextResponse(
            "this read-only dashboard has no auth, so it answers loopback clients of a "
            "loopback address only: give dashboard(app, auth=...)",
            status_code=403,
        )
    result = auth(request)
    if inspect.isawaitable(result):
        result = await result
    if result is True:
        return None
    if isinstance(result, Response):
        return result
    return PlainTextResponse("not authorized", status_code=401)
