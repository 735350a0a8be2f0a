"""Who may push jobs: a shared bearer token, or a Google-signed OIDC token (Pub/Sub push
and Cloud Tasks with an OIDC service account), checked before anything is read or run."""

from __future__ import annotations

import hmac
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio

from .errors import ConfigError

GOOGLE_CERTS = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
CERTS_TTL = 3600.0


class Auth(Protocol):
    """Says whether a push request may run: ``await auth(headers, query)`` (header names
    lower-case)."""

    async def __call__(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool: ...


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class BearerToken:
    """``Authorization: Bearer <token>``, or ``?token=<token>`` in the push endpoint's URL
    (a Pub/Sub push subscription without OIDC can set no header)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("bearer_token() needs a non-empty token")
        self._token = token.encode()

    def __repr__(self) -> str:
        return "<BearerToken ***>"

    async def __call__(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        given = _bearer(headers) or query.get("token") or ""
        # Constant time: the comparison must not tell how much of a guess was right.
        return hmac.compare_digest(given.encode(), self._token)


class NoAuth:
    """Every request runs: for a service that only a private network or an authenticating
    proxy can reach."""

    def __repr__(self) -> str:
        return "<NoAuth>"

    async def __call__(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        return True


Certs = Mapping[str, str] | Callable[[], Awaitable[Mapping[str, str]]]


class GoogleOidc:
    """A Google-signed ID token in ``Authorization: Bearer``: signature (Google's certs),
    expiry, ``aud`` = ``audience``, ``iss`` one of Google's, and ``email`` (the push
    subscription's or queue's service account) when given. Needs ``google-auth``
    (``pip install 'aio-job-workers[push]'``)."""

    def __init__(
        self,
        audience: str,
        *,
        email: str | None = None,
        certs: Certs | None = None,
        issuers: tuple[str, ...] = GOOGLE_ISSUERS,
    ) -> None:
        try:
            from google.auth import jwt
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ConfigError(
                "google_oidc() needs google-auth: pip install 'aio-job-workers[push]'"
            ) from exc
        # google-auth is untyped: its decode is called through a typed name.
        self._decode: Callable[..., dict[str, Any]] = jwt.decode
        self.audience, self.email, self.issuers = audience, email, issuers
        self._certs = certs if certs is not None else self._google_certs
        self._cached: tuple[float, Mapping[str, str]] | None = None

    def __repr__(self) -> str:
        return f"<GoogleOidc audience={self.audience!r}>"

    async def __call__(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        token = _bearer(headers)
        if token is None:
            return False
        certs = self._certs if isinstance(self._certs, Mapping) else await self._certs()
        try:
            claims = self._decode(
                token, certs=dict(certs), audience=self.audience, clock_skew_in_seconds=10
            )
        except (ValueError, KeyError):  # google-auth raises ValueError subclasses
            return False
        if claims.get("iss") not in self.issuers:
            return False
        if self.email is not None:
            return claims.get("email") == self.email and claims.get("email_verified") is True
        return True

    async def _google_certs(self) -> Mapping[str, str]:
        """Google's signing certs, fetched at most once an hour."""
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > CERTS_TTL:
            certs = await anyio.to_thread.run_sync(_fetch_json, GOOGLE_CERTS)
            self._cached = (now, certs)
        return self._cached[1]


def _fetch_json(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=10) as reply:  # a fixed https URL
        doc = json.loads(reply.read())
    return {str(k): str(v) for k, v in doc.items()}


def bearer_token(token: str) -> BearerToken:
    """Pushes must carry ``token``: ``Authorization: Bearer <token>`` or ``?token=``."""
    return BearerToken(token)


def google_oidc(
    audience: str, *, email: str | None = None, certs: Certs | None = None
) -> GoogleOidc:
    """Pushes must carry a Google-signed OIDC token for ``audience`` (by default the push
    endpoint's URL), from service account ``email`` if given. ``certs``: ``{kid: PEM
    certificate}`` or an async callable returning one (tests); by default Google's."""
    return GoogleOidc(audience, email=email, certs=certs)


def no_auth() -> NoAuth:
    """Explicitly no authentication (``push_app`` refuses ``auth=None``)."""
    return NoAuth()
