"""Redis Streams broker: one stream per queue, read by a consumer group.

Keys live under ``<prefix>:{<queue>}:`` so every key a script touches hashes to one
Redis Cluster slot: ``stream`` (the jobs), ``delayed`` (a sorted set of ids by eta, in
the server's clock) with ``payloads`` (their bodies), and ``dead`` (the DLQ stream).

A delivery is ours while the stream's pending-entries list (PEL) says this consumer holds
it with the delivery count we were given: every ack, retry, release and dead-letter
checks that in the same script that acts, so a worker that stalled past its lease never
settles an entry another consumer (or a later delivery) now holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from .base import DeadLetter, Delivery, QueueDepth

# Owned = pending for this consumer with the delivery count this worker was handed.
_OWNED = """
local function owned(stream, group, consumer, id, count)
  local p = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  return #p > 0 and tonumber(p[1][4]) == tonumber(count)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: stream. ARGV: group, consumer, id1, count1, ...
# -> 0-based positions of the pairs whose lease is lost: still in the stream, not ours. An
# entry no longer in the stream is settled already, mostly by this same ack retried after
# its reply was lost (else by the worker that took it over): not reported as lost.
_ACK = (
    _OWNED
    + """
local lost = {}
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  elseif #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then
    table.insert(lost, (i - 3) / 2)
  end
end
return lost
"""
)

# KEYS: stream. ARGV: group, consumer, id1, count1, ...
# -> 0-based positions of the pairs whose lease is lost
_EXTEND = (
    _OWNED
    + """
local lost, mine = {}, {}
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    table.insert(mine, ARGV[i])
  else
    table.insert(lost, (i - 3) / 2)
  end
end
if #mine > 0 then
  -- min-idle 0 on ids we just checked are ours; JUSTID leaves the delivery count alone
  table.insert(mine, 'JUSTID')
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return lost
"""
)

# KEYS: stream, delayed, payloads. ARGV: group, consumer, id, count, body, delay_ms, new_id
_RETRY = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local delay = tonumber(ARGV[6])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now_ms() + delay, ARGV[7])
  redis.call('HSET', KEYS[3], ARGV[7], ARGV[5])
else
  redis.call('XADD', KEYS[1], '*', 'b', ARGV[5])
end
return 1
"""
)

# KEYS: stream. ARGV: group, consumer, id1, count1, ... -> number released
_RELEASE = (
    _OWNED
    + """
local n = 0
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    -- a fresh entry: visible at once, and the hand-back is not counted as a delivery
    if #e > 0 then redis.call('XADD', KEYS[1], '*', unpack(e[1][2])) end
    n = n + 1
  end
end
return n
"""
)

# KEYS: stream, dead. ARGV: group, consumer, id, count, field1, value1, ...
_DEAD = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: delayed, payloads. ARGV: delay_ms, id1, body1, ...
_PUBLISH_DELAYED = (
    _OWNED
    + """
local eta = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], eta, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 0
"""
)

# KEYS: stream, delayed, payloads. ARGV: limit -> ms until the next eta, or -1 if none.
# Any number of workers may run it at once: each due id moves exactly once.
_PROMOTE = (
    _OWNED
    + """
local now = now_ms()
local ids = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[1])
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[3], id)
  if body then redis.call('XADD', KEYS[1], '*', 'b', body) end
end
if #ids > 0 then
  redis.call('ZREM', KEYS[2], unpack(ids))
  redis.call('HDEL', KEYS[3], unpack(ids))
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"""
)

# KEYS: stream. ARGV: group, consumer, min_idle_ms, cursor, count
# -> {next cursor, {{id, fields, delivery count}, ...}}
_RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    table.insert(out, {e[1], e[2], p[1][4]})
  end
end
return {r[1], out}
"""

# KEYS: stream. ARGV: group, min_idle_ms, self -> number of consumers removed.
# Consumers of crashed workers stay in the group forever; once they hold nothing and have
# been idle long, drop them. Atomic, so a consumer that just got entries is never dropped.
_PRUNE = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    n = n + 1
  end
end
return n
"""

# KEYS: stream, delayed, dead. ARGV: group -> {ready, in_flight, delayed, dead}
_DEPTH = """
local len = redis.call('XLEN', KEYS[1])
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
local pending = 0
if ok then pending = tonumber(p[1]) end
return {len - pending, pending, redis.call('ZCARD', KEYS[2]), redis.call('XLEN', KEYS[3])}
"""

_OWN_PARAMS = ("prefix", "group")
_STREAM_ID = re.compile(r"\d+-\d+")
_CHUNK = 500  # ids per script call: well inside Lua's unpack() limit
PRUNE_EVERY = 300.0  # seconds between sweeps for consumers of dead workers
PRUNE_IDLE = 3600.0  # how long a consumer holding nothing must be idle to be dropped


@dataclass(frozen=True, slots=True)
class _Keys:
    stream: str
    delayed: str
    payloads: str
    dead: str


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    """Client errors become `BrokerUnavailable`: the runtime backs off and tries again."""
    try:
        yield
    except (
        rexc.ConnectionError,
        rexc.TimeoutError,
        rexc.ReadOnlyError,
        rexc.BusyLoadingError,
    ) as exc:
        # Also a replica that was the primary before a failover, and a server loading its
        # data after a restart: both answer again soon.
        raise BrokerUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


def _nogroup(exc: rexc.ResponseError) -> bool:
    return "NOGROUP" in str(exc)


class RedisBroker:
    """``redis://[:password@]host[:port][/db][?prefix=aioworkers&group=workers]``

    Other query parameters go to redis-py (``socket_timeout``, ...); ``rediss://`` uses
    TLS with certificate verification on.
    """

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout: float = 30.0,
        consumer: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = query.get("prefix", "aioworkers")
        self.group = query.get("group", "workers")
        if not self.prefix or not self.group:
            raise ConfigError("redis URL: 'prefix' and 'group' must not be empty")
        client_query = urlencode({k: v for k, v in query.items() if k not in _OWN_PARAMS})
        self.visibility_timeout = visibility_timeout
        # Unique per process and per broker: a restarted worker never inherits a PEL.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._redis: aioredis.Redis = aioredis.from_url(
            urlunsplit(parts._replace(query=client_query)),
            # A pooled connection that went stale (server restarted) fails once: retry on
            # a fresh one before reporting BrokerUnavailable. Scripts are fenced, so a
            # retried settle can never act twice.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
            retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
        )
        self._groups: set[str] = set()
        self._reclaim_at: dict[str, float] = {}
        self._cursor: dict[str, str] = {}
        self._prune_at: dict[str, float] = {}
        self._host = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        register = self._redis.register_script
        self._ack = register(_ACK)
        self._extend = register(_EXTEND)
        self._retry = register(_RETRY)
        self._release = register(_RELEASE)
        self._dead = register(_DEAD)
        self._publish_delayed = register(_PUBLISH_DELAYED)
        self._promote = register(_PROMOTE)
        self._reclaim = register(_RECLAIM)
        self._depth = register(_DEPTH)
        self._prune = register(_PRUNE)

    def __repr__(self) -> str:
        return f"<RedisBroker {self._host} prefix={self.prefix} consumer={self.consumer}>"

    def keys(self, queue: str) -> _Keys:
        base = f"{self.prefix}:{{{queue}}}"
        return _Keys(f"{base}:stream", f"{base}:delayed", f"{base}:payloads", f"{base}:dead")

    async def _ensure_group(self, queue: str) -> None:
        if queue in self._groups:
            return
        try:
            # From id 0, so jobs published before the first worker started are read too.
            await self._redis.xgroup_create(self.keys(queue).stream, self.group, "0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(queue)

    # -- producer -------------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        k = self.keys(queue)
        async with _mapped():
            if delay > 0:
                for start in range(0, len(bodies), _CHUNK):
                    args: list[Any] = [int(delay * 1000)]
                    for body in bodies[start : start + _CHUNK]:
                        args += [os.urandom(10).hex(), body]
                    await self._publish_delayed(keys=[k.delayed, k.payloads], args=args)
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                for body in bodies:
                    pipe.xadd(k.stream, {"b": body})
                await pipe.execute()

    # -- consumer -------------------------------------------------------------------------

    async def fetch(self, queue: str, *, max_messages: int, wait: float) -> list[Delivery]:
        async with _mapped():
            try:
                return await self._fetch(queue, max_messages, wait)
            except rexc.ResponseError as exc:
                if not _nogroup(exc):
                    raise
                # The server lost the group (restarted without persistence): recreate it.
                self._groups.discard(queue)
                await self._ensure_group(queue)
                return []

    async def _fetch(self, queue: str, max_messages: int, wait: float) -> list[Delivery]:
        await self._ensure_group(queue)
        k = self.keys(queue)
        if time.monotonic() >= self._reclaim_at.get(queue, 0.0):
            reclaimed = await self._reclaim_expired(queue, max_messages)
            if reclaimed:
                return reclaimed
        # One round trip when jobs are waiting: move due delayed jobs, then read without
        # blocking. Only an empty read pays a second, blocking one.
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._promote(keys=[k.stream, k.delayed, k.payloads], args=[1000], client=pipe)
            pipe.xreadgroup(self.group, self.consumer, {k.stream: ">"}, count=max_messages)
            next_eta_ms, reply = await pipe.execute()
        out = self._deliveries(queue, reply)
        block_ms = int(wait * 1000)
        if int(next_eta_ms) >= 0:
            # Never sleep past the next eta: the job due then is read on time.
            block_ms = min(block_ms, max(int(next_eta_ms), 1))
        if out or block_ms <= 0:
            return out
        reply = await self._redis.xreadgroup(
            self.group, self.consumer, {k.stream: ">"}, count=max_messages, block=block_ms
        )
        return self._deliveries(queue, reply)

    @staticmethod
    def _deliveries(queue: str, reply: Any) -> list[Delivery]:
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        return [
            Delivery(queue, _s(entry_id), _body(fields), 1)
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]

    async def _reclaim_expired(self, queue: str, count: int) -> list[Delivery]:
        """Take over entries idle longer than the visibility timeout (their worker died)."""
        cursor, entries = await self._reclaim(
            keys=[self.keys(queue).stream],
            args=[
                self.group,
                self.consumer,
                int(self.visibility_timeout * 1000),
                self._cursor.get(queue, "0-0"),
                count,
            ],
        )
        cursor = _s(cursor)
        self._cursor[queue] = cursor
        # Follow the cursor at once while it has more; rescan from the start later.
        pause = 0.0 if cursor != "0-0" else min(self.visibility_timeout / 2, 5.0)
        self._reclaim_at[queue] = time.monotonic() + pause
        if cursor == "0-0" and time.monotonic() >= self._prune_at.get(queue, 0.0):
            self._prune_at[queue] = time.monotonic() + PRUNE_EVERY
            idle_ms = int(max(PRUNE_IDLE, 10 * self.visibility_timeout) * 1000)
            await self._prune(
                keys=[self.keys(queue).stream], args=[self.group, idle_ms, self.consumer]
            )
        return [
            Delivery(queue, _s(entry_id), _body(_pairs(fields)), int(n))
            for entry_id, fields, n in entries
        ]

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: entries are only read on `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        for queue, group in _by_queue(deliveries).items():
            stream = self.keys(queue).stream
            for start in range(0, len(group), _CHUNK):
                chunk = group[start : start + _CHUNK]
                try:
                    positions = await self._owned_call(self._ack, [stream], chunk)
                except LeaseLost:  # not ours any more: nothing to ack
                    lost.extend(chunk)
                    continue
                lost.extend(chunk[int(i)] for i in positions)
        return lost

    async def extend(self, deliveries: Sequence[Delivery], *, visibility: float) -> list[Delivery]:
        # XCLAIM resets the idle time to 0 and reclaimers take entries idle longer than
        # visibility_timeout, so a lease here always lasts that long from the last extend
        # (Redis clamps a delivery time in the future); ``visibility`` is that same value
        # in the runtime, which extends every visibility/3.
        lost: list[Delivery] = []
        for queue, group in _by_queue(deliveries).items():
            stream = self.keys(queue).stream
            for start in range(0, len(group), _CHUNK):
                chunk = group[start : start + _CHUNK]
                try:
                    positions = await self._owned_call(self._extend, [stream], chunk)
                except LeaseLost:
                    lost.extend(chunk)
                    continue
                lost.extend(chunk[int(i)] for i in positions)
        return lost

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        k = self.keys(delivery.queue)
        extra = [body, int(delay * 1000), os.urandom(10).hex()]
        done = await self._owned_call(
            self._retry, [k.stream, k.delayed, k.payloads], [delivery], extra
        )
        if not done:
            raise LeaseLost(f"{delivery!r} is no longer held by {self.consumer}")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        for queue, group in _by_queue(deliveries).items():
            stream = self.keys(queue).stream
            for start in range(0, len(group), _CHUNK):
                with contextlib.suppress(LeaseLost):  # not ours any more: nothing to hand back
                    await self._owned_call(self._release, [stream], group[start : start + _CHUNK])

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        k = self.keys(delivery.queue)
        fields: dict[str, Any] = {"b": delivery.body, **letter.facts()}
        extra = [x for name, value in fields.items() for x in (name, value)]
        done = await self._owned_call(self._dead, [k.stream, k.dead], [delivery], extra)
        if not done:
            raise LeaseLost(f"{delivery!r} is no longer held by {self.consumer}")

    async def _owned_call(
        self,
        script: Any,
        keys: list[str],
        deliveries: Sequence[Delivery],
        extra: Sequence[Any] = (),
    ) -> Any:
        args: list[Any] = [self.group, self.consumer]
        for d in deliveries:
            args += [d.message_id, d.count]
        if extra:
            # Single-delivery scripts take their extra arguments after the one id/count pair.
            args += list(extra)
        async with _mapped():
            try:
                return await script(keys=keys, args=args)
            except rexc.ResponseError as exc:
                if _nogroup(exc):
                    # The group is gone (server restarted empty): nothing here is ours.
                    self._groups.discard(deliveries[0].queue)
                    raise LeaseLost(f"consumer group {self.group!r} no longer exists") from exc
                raise

    # -- introspection --------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        k = self.keys(queue)
        async with _mapped():
            ready, in_flight, delayed, dead = await self._depth(
                keys=[k.stream, k.delayed, k.dead], args=[self.group]
            )
        return QueueDepth(int(ready), int(in_flight), int(delayed), int(dead))

    async def totals(self, queue: str) -> dict[str, int]:
        """Counters for rates (``aioworkers stats --watch``), not part of the Broker protocol:
        ``added``, entries ever added to the ready stream (new jobs, and retries as they
        become ready); ``left``, those that left it (acked, retried or dead-lettered);
        ``dead``, dead letters ever written. They restart from 0 if a key is deleted."""
        k = self.keys(queue)
        async with _mapped(), self._redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("XINFO", "STREAM", k.stream)
            pipe.execute_command("XINFO", "STREAM", k.dead)
            stream, dead = await pipe.execute(raise_on_error=False)
        added, length = _added(stream)
        return {"added": added, "left": added - length, "dead": _added(dead)[0]}

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        async with _mapped():
            entries: Any = await self._redis.xrange(self.keys(queue).dead, count=limit)
        return [_dead_letter(queue, _s(entry_id), fields) for entry_id, fields in entries]

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        dead = self.keys(queue).dead
        async with _mapped():
            if entry_ids is None:
                n = int(await self._redis.xlen(dead))
                await self._redis.delete(dead)
                return n
            # XDEL rejects anything that is not a stream id; such an id names no entry.
            ids = [i for i in entry_ids if _STREAM_ID.fullmatch(i)]
            removed = 0
            for start in range(0, len(ids), _CHUNK):
                removed += int(await self._redis.xdel(dead, *ids[start : start + _CHUNK]))
            return removed

    async def aclose(self) -> None:
        """Remove this consumer from its groups if it holds nothing, and disconnect."""
        try:
            async with _mapped():
                for queue in self._groups:
                    stream = self.keys(queue).stream
                    pending = await self._redis.xpending_range(
                        stream, self.group, "-", "+", 1, consumername=self.consumer
                    )
                    if not pending:
                        await self._redis.xgroup_delconsumer(stream, self.group, self.consumer)
        except (BrokerUnavailable, rexc.ResponseError):
            pass  # best effort: an idle consumer entry is harmless
        finally:
            await self._redis.aclose()


def _added(info: Any) -> tuple[int, int]:
    """``(entries-added, length)`` from an XINFO STREAM reply; zeros for a missing key."""
    if not isinstance(info, list | dict):
        return 0, 0  # no such key (an error reply)
    fields = info if isinstance(info, dict) else _pairs(info)
    get = {_s(key): value for key, value in fields.items()}
    length = int(get.get("length", 0))
    # entries-added needs Redis >= 7; before that, the length is the best there is.
    return int(get.get("entries-added", length)), length


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _body(fields: dict[Any, Any]) -> bytes:
    body = fields.get(b"b")
    if isinstance(body, bytes):
        return body
    # Not written by aioworkers (someone XADDed by hand): pass the fields on as they are,
    # so the decode pipeline dead-letters it with a reason instead of dropping it.
    return repr({_s(k): v for k, v in fields.items()}).encode()


def _by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[Delivery]]:
    groups: dict[str, list[Delivery]] = {}
    for d in deliveries:
        groups.setdefault(d.queue, []).append(d)
    return groups


def _dead_letter(queue: str, entry_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
    f = {_s(k): v for k, v in raw.items()}

    def text(name: str) -> str | None:
        value = f.get(name)
        return None if value is None else _s(value)

    return DeadLetter.from_facts(text, queue=queue, entry_id=entry_id, body=f.get("b", b""))
