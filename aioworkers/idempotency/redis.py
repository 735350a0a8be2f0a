"""The Redis idempotency store: one string key per idempotency key, changed only by Lua
scripts, so every operation is one atomic step on the server.

A key holds ``c:<owner>`` while claimed (expiring with the lease) and ``d`` once done
(expiring after the TTL). Each script touches one key (as Redis Cluster would require);
`extend` pipelines one script call per key into a single round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..brokers._redis_io import connect, redis_io
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

_RESULTS: dict[bytes, ClaimResult] = {b"claimed": "claimed", b"done": "done", b"busy": "busy"}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore:
    """``redis://[:password@]host[:port][/db][?prefix=aioworkers:idempotency]``

    Keys are ``<prefix>:<key>``. ``socket_timeout`` (default 5 s) bounds each call.
    Other query parameters go to redis-py; ``rediss://`` uses TLS with certificate
    verification on. Client errors are mapped as the broker's are (`redis_io`): a server
    that is unreachable, loading, busy or read-only is `StoreUnavailable` (the job is
    deferred, not counted as a delivery); a refused permission or credential is a
    `ConfigError` that says what to fix.
    """

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = prefix or query.pop("prefix", "") or DEFAULT_PREFIX
        self._host = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        # Few, quick client-side retries: the runtime retries the job itself, and a call
        # that hangs on a dead server would hold a worker slot.
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2)
        self._redis, self._reply_timeout = connect(url, query, retry=retry)
        register = self._redis.register_script
        self._claim = register(_CLAIM)
        self._extend = register(_EXTEND)
        self._complete = register(_COMPLETE)
        self._release = register(_RELEASE)

    def __repr__(self) -> str:
        return f"<RedisStore {self._host} prefix={self.prefix}>"

    def _io(self) -> AbstractAsyncContextManager[None]:
        return redis_io(self._reply_timeout, StoreUnavailable)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        async with self._io():
            got = await self._claim(keys=[self._key(key)], args=[owner, _ms(lease)])
        return _RESULTS[got]

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not claims:
            return []
        ms = _ms(lease)
        async with self._io(), self._redis.pipeline(transaction=False) as pipe:
            for key, owner in claims:
                await self._extend(keys=[self._key(key)], args=[owner, ms], client=pipe)
            results: list[Any] = await pipe.execute()
        return [claim for claim, kept in zip(claims, results, strict=True) if kept != 1]

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        async with self._io():
            done = await self._complete(keys=[self._key(key)], args=[owner, _ms(ttl)])
        return bool(done == 1)

    async def release(self, key: str, owner: str) -> bool:
        async with self._io():
            freed = await self._release(keys=[self._key(key)], args=[owner])
        return bool(freed == 1)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
