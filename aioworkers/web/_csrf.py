"""CSRF protection for the dashboard's forms: a random nonce in a ``SameSite=Strict``,
``HttpOnly`` cookie, and in each form a token that is the nonce signed with the
dashboard's secret. A POST must carry a token that matches its cookie, and must not come
from another site (``Origin`` and ``Sec-Fetch-Site``, when the browser sends them)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "aioworkers_csrf"
FIELD = "csrf"


class Csrf:
    def __init__(self, secret: bytes | None = None) -> None:
        # Random per dashboard unless given: a restart only asks for a reload of the form.
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def token(self, request: Request) -> str:
        """The token for this request's forms (a new nonce if its cookie has none yet:
        `set_cookie` sends it)."""
        nonce = request.cookies.get(COOKIE, "")
        if not _well_formed(nonce):
            nonce = request.state.csrf_nonce = secrets.token_urlsafe(24)
        return self._sign(nonce)

    @staticmethod
    def set_cookie(request: Request, response: Response) -> None:
        nonce = getattr(request.state, "csrf_nonce", None)
        if nonce is not None:
            response.set_cookie(
                COOKIE,
                nonce,
                path=_path(request),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )

    def valid(self, request: Request, token: str) -> bool:
        """Whether a POST carrying ``token`` is a form this dashboard gave this browser."""
        nonce = request.cookies.get(COOKIE, "")
        if not _well_formed(nonce) or not token:
            return False
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is not None and not _same_origin(origin, request):
            return False
        return hmac.compare_digest(self._sign(nonce).encode(), token.encode())


def _well_formed(nonce: str) -> bool:
    plain = nonce.replace("-", "").replace("_", "")
    return 16 <= len(nonce) <= 64 and nonce.isascii() and plain.isalnum()


def _path(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


def _same_origin(origin: str, request: Request) -> bool:
    # The host only: behind a proxy that ends TLS the page is https, the request http.
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()
