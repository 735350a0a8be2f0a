"""The Redis idempotency store: one string key per idempotency key, changed only by Lua
scripts, so every operation is one atomic step on the server.

A key holds ``c:<owner>`` while claimed (expiring with the lease) and ``d`` once done
(expiring after the TTL). Each script touches one key (as Redis Cluster would require);
`extend` pipelines one script call per key into a single round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..errors import redact
from .base import ClaimResult, StoreUnavailable, check_times

DEFAULT_PREFIX = "aioworkers:idempotency"

# KEYS: key. ARGV: owner, lease ms -> 'claimed' | 'done' | 'busy'
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 'claimed'
end
if v == 'd' then return 'done' end
return 'busy'
"""

# KEYS: key. ARGV: owner, lease ms -> 1 if extended, 0 if the owner no longer holds it
_EXTEND = """
if redis.call('GET', KEYS[1]) ~= 'c:' .. ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: key. ARGV: owner, ttl ms -> 1 if completed, 0 if the owner no longer holds it
_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= 'c:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'd', 'PX', ARGV[2])
return 1
"""

# KEYS: key. ARGV: owner -> 1 if released, 0 if the owner no longer holds it
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= 'c:' .. ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# Errors after which the same call may well succeed: the runtime retries the job later.
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError)


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {redact(str(exc))}") from exc


_RESULTS: dict[bytes, ClaimResult] = {b"claimed": "claimed", b"done": "done", b"busy": "busy"}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore:
    """``redis://[:password@]host[:port][/db][?prefix=aioworkers:idempotency]``

    Keys are ``<prefix>:<key>``. Other query parameters go to redis-py
    (``socket_timeout``, ...); ``rediss://`` uses TLS with certificate verification on.
    """

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = prefix or query.pop("prefix", "") or DEFAULT_PREFIX
        self._host = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        # Few, quick client-side retries: the runtime retries the job itself, and a call
        # that hangs on a dead server would hold a worker slot.
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2)
        self._redis: aioredis.Redis = aioredis.from_url(
            urlunsplit(parts._replace(query=urlencode(query))), retry=retry
        )
        register = self._redis.register_script
        self._claim = register(_CLAIM)
        self._extend = register(_EXTEND)
        self._complete = register(_COMPLETE)
        self._release = register(_RELEASE)

    def __repr__(self) -> str:
        return f"<RedisStore {self._host} prefix={self.prefix}>"

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        async with _mapped():
            got = await self._claim(keys=[self._key(key)], args=[owner, _ms(lease)])
        return _RESULTS[got]

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not claims:
            return []
        ms = _ms(lease)
        async with _mapped(), self._redis.pipeline(transaction=False) as pipe:
            for key, owner in claims:
                await self._extend(keys=[self._key(key)], args=[owner, ms], client=pipe)
            results: list[Any] = await pipe.execute()
        return [claim for claim, kept in zip(claims, results, strict=True) if kept != 1]

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        async with _mapped():
            done = await self._complete(keys=[self._key(key)], args=[owner, _ms(ttl)])
        return bool(done == 1)

    async def release(self, key: str, owner: str) -> bool:
        async with _mapped():
            freed = await self._release(keys=[self._key(key)], args=[owner])
        return bool(freed == 1)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
