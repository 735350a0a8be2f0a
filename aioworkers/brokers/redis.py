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

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..errors import AioworkersError, BrokerUnavailable, ConfigError, LeaseLost, redact
from .base import DEFAULT_LEASE, DeadLetter, Delivery, QueueDepth

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

# A publish is one script call that first sets a marker named by a token the call carries:
# redis-py sends a call again on a fresh connection when the first one's reply was lost,
# and that second send finds the marker and adds nothing. Marker and entries are written
# together, so either both or neither exist.
_MARKED = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'PX', ARGV[1]) then return 0 end
"""

# KEYS: marker, stream. ARGV: marker ttl ms, body1, ... -> 1, or 0 if sent before
_PUBLISH = (
    _MARKED
    + """
for i = 2, #ARGV do redis.call('XADD', KEYS[2], '*', 'b', ARGV[i]) end
return 1
"""
)

# KEYS: marker, delayed, payloads. ARGV: marker ttl ms, delay_ms, id1, body1, ...
_PUBLISH_DELAYED = (
    _OWNED
    + _MARKED
    + """
local eta = now_ms() + tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], eta, ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
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

# KEYS: a key in the queue's slot that never exists. ARGV: group, consumer
# -> the commands aioworkers uses that the ACL user may not run. Each is tried so that it
# changes nothing (on a missing key, XX, NOMKSTREAM); any answer but a refusal means allowed.
_PROBE = """
local k, g, c = KEYS[1], ARGV[1], ARGV[2]
local refused = {}
local function try(...)
  local args = {...}
  local ok, err = pcall(redis.call, unpack(args))
  if ok then return true end
  local text = type(err) == 'table' and err.err or tostring(err)
  if text:find('NOPERM', 1, true) or text:find("can't run", 1, true) then
    local name = args[1]
    if name == 'XGROUP' or name == 'XINFO' then name = name .. ' ' .. args[2] end
    table.insert(refused, name)
    return false
  end
  return true
end
try('XGROUP', 'CREATE', k, g, '0')
try('XREADGROUP', 'GROUP', g, c, 'COUNT', 1, 'STREAMS', k, '>')
try('XADD', k, 'NOMKSTREAM', '*', 'b', '')
try('XACK', k, g, '0-1')
try('XDEL', k, '0-1')
try('XRANGE', k, '-', '+', 'COUNT', 1)
try('XLEN', k)
try('XPENDING', k, g)
try('XCLAIM', k, g, c, 0, '0-1', 'JUSTID')
try('XAUTOCLAIM', k, g, c, 0, '0-0')
try('XINFO', 'CONSUMERS', k, g)
try('XINFO', 'STREAM', k)
try('XGROUP', 'DELCONSUMER', k, g, c)
try('ZADD', k, 'XX', 0, 'm')
try('ZRANGE', k, 0, 0)
try('ZREM', k, 'm')
try('ZCARD', k)
try('HGET', k, 'f')
try('SET', k, 1, 'XX')
try('DEL', k)
try('TIME')
-- HSET alone always writes: tried only where the HDEL that undoes it is allowed.
if try('HDEL', k, 'f') and try('HSET', k, 'f', '') then redis.call('HDEL', k, 'f') end
return refused
"""

_OWN_PARAMS = ("prefix", "group")
_STREAM_ID = re.compile(r"\d+-\d+")
_CHUNK = 500  # ids per script call: well inside Lua's unpack() limit
PRUNE_EVERY = 300.0  # seconds between sweeps for consumers of dead workers
PRUNE_IDLE = 3600.0  # how long a consumer holding nothing must be idle to be dropped
PUBLISH_MARKER_TTL = 60.0  # seconds the server remembers a publish, to drop its re-sends


@dataclass(frozen=True, slots=True)
class _Keys:
    stream: str
    delayed: str
    payloads: str
    dead: str


# -- the I/O boundary: every round trip gets a deadline and its errors mapped -------------

REPLY_TIMEOUT = 5.0  # seconds a reply may take beyond the command's own blocking wait
SEND_RATE = 1 << 20  # bytes/s a deadline allows for what a call sends or reads, at worst
# Keepalive finds a peer that vanished under an idle pooled connection (host gone, NAT entry
# dropped) within about 90 s, and keeps middleboxes that drop idle flows (cloud load
# balancers: 350 s) seeing traffic. A call in flight is bounded by its deadline instead.
KEEPALIVE = {
    opt: value
    for name, value in (
        ("TCP_KEEPIDLE", 60),  # Linux
        ("TCP_KEEPALIVE", 60),  # macOS's name for the same
        ("TCP_KEEPINTVL", 10),
        ("TCP_KEEPCNT", 3),
    )
    if (opt := getattr(socket, name, None)) is not None
}

# What an error reply means here, by its code: the reply's first word (an error raised in
# a script keeps it on Redis >= 7; Redis 6 quotes it inside an ERR).
# Transient: the same call succeeds again once the server recovers by itself or an operator
# fixes it, with nothing to change on the worker's side: back off and retry, keeping jobs.
# (Any code not listed as permanent is treated so; these are listed to be found in an ERR.)
TRANSIENT_CODES = frozenset(
    {
        "BUSY",  # another client's script ran past busy-reply-threshold: until it ends or is killed
        "LOADING",  # a restarted server loading its data
        "READONLY",  # a replica that was the primary before a failover
        "MASTERDOWN",  # a replica that lost its primary
        "NOREPLICAS",  # fewer replicas than min-replicas-to-write
        "TRYAGAIN",  # a cluster moving slots
        "CLUSTERDOWN",  # a cluster failing over
        # Writes refused since an RDB save failed (disk full or unwritable): they resume as
        # soon as a save succeeds, so workers wait (warning with the reply) instead of
        # exiting and needing a restart once the disk is fixed.
        "MISCONF",
        "OOM",  # maxmemory reached with noeviction: acks and trims free memory
        "NOSCRIPT",  # a SCRIPT FLUSH raced a pipeline's script check: loaded again next call
    }
)
# What a Redis ACL user needs, besides its keys (~<prefix>:*), for everything the broker
# and the idempotency store do.
ACL_RULES = (
    "+@stream",
    "+@sortedset",
    "+@hash",
    "+@scripting",
    "+get",
    "+set",
    "+pexpire",
    "+del",
    "+time",
)
# Permanent: the same call fails until the configuration changes. What to fix:
_AUTH = (
    "Redis refused the credentials, or needs some: check the user name and password in "
    "the URL (redis://user:password@host)"
)
_CLUSTER = "this is a Redis Cluster node: aioworkers' redis:// broker needs a single server"
PERMANENT_CODES = {
    "NOPERM": "the Redis user may not run a command or reach a key aioworkers needs: grant it "
    f"(ACL SETUSER <user> {' '.join(ACL_RULES)} ~<prefix>:*) or use another user",
    "WRONGPASS": _AUTH,
    "NOAUTH": _AUTH,
    "WRONGTYPE": "a key under aioworkers' prefix holds a value aioworkers did not write: "
    "delete the key, or choose another prefix (?prefix=...)",
    "MOVED": _CLUSTER,
    "ASK": _CLUSTER,
    # Not a code Redis sends: what `error_code` makes of an unknown command.
    "UNKNOWN": "aioworkers needs Redis >= 6.2 (XAUTOCLAIM, ZRANGE BYSCORE, XADD NOMKSTREAM)",
}
# Replies whose code is a plain ERR, by what their text says.
_ERR_TEXT = (
    ("can't run this command", "NOPERM"),  # an ACL refusal inside a script (Redis 7.0)
    ("unknown command", "UNKNOWN"),
    ("unknown redis command", "UNKNOWN"),  # inside a script
    ("script killed by user", "BUSY"),  # ours, SCRIPT KILLed by an operator: nothing applied
)
# redis-py strips the code from the replies it has a class for.
_CLASS_CODES: dict[type[rexc.ResponseError], str] = {
    rexc.NoScriptError: "NOSCRIPT",
    rexc.ReadOnlyError: "READONLY",
    rexc.NoPermissionError: "NOPERM",
    rexc.OutOfMemoryError: "OOM",
    rexc.TryAgainError: "TRYAGAIN",
    rexc.ClusterDownError: "CLUSTERDOWN",
    rexc.MasterDownError: "MASTERDOWN",
    rexc.MovedError: "MOVED",
    rexc.AskError: "ASK",
    rexc.AuthenticationWrongNumberOfArgsError: "WRONGPASS",
}
_CODES = sorted({*TRANSIENT_CODES, *PERMANENT_CODES, "NOGROUP"} - {"UNKNOWN"})
_CODE = re.compile(rf"(?<![A-Za-z])-?({'|'.join(_CODES)}) ")


def error_code(exc: rexc.ResponseError) -> str:
    """The code of an error reply, as Redis sent it, or ``UNKNOWN`` for an unknown command."""
    by_class = _CLASS_CODES.get(type(exc))
    if by_class is not None:
        return by_class
    text = str(exc)
    if match := _CODE.search(text):
        return match.group(1)
    lowered = text.lower()
    for fragment, code in _ERR_TEXT:
        if fragment in lowered:
            return code
    return text.split(" ", 1)[0]


def map_error(exc: rexc.RedisError, unavailable: type[AioworkersError]) -> Exception | None:
    """What a redis-py error becomes: ``unavailable`` (transient: back off and retry), a
    `ConfigError` saying what to fix (permanent), or None for an error that is not the
    server's (a bad argument: a bug, raised as it is)."""
    text = f"redis: {type(exc).__name__}: {redact(str(exc))}"
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return ConfigError(f"{text}: {_AUTH}")
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.InvalidResponse):
        # Unreachable, refused, reset, too many clients, LOADING (a ConnectionError), or a
        # garbled reply (the connection is dropped): a fresh connection later may work.
        return unavailable(text)
    if not isinstance(exc, rexc.ResponseError):
        return None
    code = error_code(exc)
    if code in PERMANENT_CODES:
        return ConfigError(f"{text}: {PERMANENT_CODES[code]}")
    if code == "NOGROUP" and issubclass(unavailable, BrokerUnavailable):
        return _GroupLost(text)
    # Listed transient codes, and replies no table knows (a newer server's): retrying
    # loses nothing and shows the reply in every warning, where an exit would orphan the
    # jobs in flight.
    return unavailable(text)


class _GroupLost(BrokerUnavailable):
    """NOGROUP: the server lost the consumer group (restarted without persistence)."""


@asynccontextmanager
async def redis_io(
    deadline: float, unavailable: type[AioworkersError] = BrokerUnavailable
) -> AsyncIterator[None]:
    """Around every Redis round trip (httpcore's ``map_exceptions``): no reply within
    ``deadline`` seconds and transient errors become ``unavailable``, permanent ones a
    `ConfigError` (see `map_error`)."""
    try:
        # Cancelling redis-py mid-command drops that connection (never reused half-read),
        # so a black-holed link costs one connection and this deadline, not a hang.
        async with asyncio.timeout(deadline):
            yield
    except TimeoutError as exc:
        raise unavailable(f"redis: no reply within {deadline:.3g}s") from exc
    except rexc.RedisError as exc:
        mapped = map_error(exc, unavailable)
        if mapped is None:
            raise
        raise mapped from exc


def connect(url: str, query: dict[str, str], *, retry: Retry) -> tuple[aioredis.Redis, float]:
    """A redis-py client with deliberate socket settings, and its reply timeout: the URL's
    ``socket_timeout`` (default `REPLY_TIMEOUT`), applied by `redis_io` per call on top of
    the call's own blocking wait rather than per socket read by redis-py, so that a
    blocking read (XREADGROUP BLOCK) is never cut short by it."""
    query = dict(query)
    given = query.pop("socket_timeout", None)
    try:
        reply_timeout = REPLY_TIMEOUT if given is None else float(given)
    except ValueError:
        reply_timeout = 0.0
    if not reply_timeout > 0:  # NaN too
        raise ConfigError(f"redis URL: socket_timeout must be > 0 seconds, got {given!r}")
    parts = urlsplit(url)
    client: aioredis.Redis = aioredis.from_url(
        urlunsplit(parts._replace(query=urlencode(query))),
        retry=retry,
        retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
        socket_timeout=None,  # redis_io's deadlines instead
        socket_connect_timeout=reply_timeout,  # the URL may set another
        socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE,
    )
    return client, reply_timeout


class RedisBroker:
    """``redis://[:password@]host[:port][/db][?prefix=aioworkers&group=workers]``

    ``socket_timeout`` (default 5 s) bounds how long any call waits for its reply beyond
    its own blocking wait (see `connect`). Other query parameters go to redis-py;
    ``rediss://`` uses TLS with certificate verification on.
    """

    messaging_system = "redis"

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout: float | None = None,
        consumer: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = query.get("prefix", "aioworkers")
        self.group = query.get("group", "workers")
        if not self.prefix or not self.group:
            raise ConfigError("redis URL: 'prefix' and 'group' must not be empty")
        client_query = {k: v for k, v in query.items() if k not in _OWN_PARAMS}
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        # Unique per process and per broker: a restarted worker never inherits a PEL.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        # A pooled connection that went stale (server restarted) fails once: redis-py sends
        # the call again on a fresh one before it is reported. Every script is safe to send
        # twice: settles are fenced by the PEL, publishes by a marker.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)
        self._redis, self._reply_timeout = connect(url, client_query, retry=retry)
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
        self._publish = register(_PUBLISH)
        self._publish_delayed = register(_PUBLISH_DELAYED)
        self._promote = register(_PROMOTE)
        self._reclaim = register(_RECLAIM)
        self._depth = register(_DEPTH)
        self._prune = register(_PRUNE)
        self._probe = register(_PROBE)

    def __repr__(self) -> str:
        return f"<RedisBroker {self._host} prefix={self.prefix} consumer={self.consumer}>"

    def _deadline(self, sent: int = 0, wait: float = 0.0) -> float:
        """Seconds one round trip may take that moves about ``sent`` bytes and blocks up
        to ``wait`` seconds on the server."""
        return self._reply_timeout + wait + sent / SEND_RATE

    def _io(self, sent: int = 0, wait: float = 0.0) -> AbstractAsyncContextManager[None]:
        return redis_io(self._deadline(sent, wait))

    def keys(self, queue: str) -> _Keys:
        base = f"{self.prefix}:{{{queue}}}"
        return _Keys(f"{base}:stream", f"{base}:delayed", f"{base}:payloads", f"{base}:dead")

    async def _ensure_group(self, queue: str) -> None:
        if queue in self._groups:
            return
        stream = self.keys(queue).stream
        async with self._io():
            try:
                # From id 0, so jobs published before the first worker started are read too.
                await self._redis.xgroup_create(stream, self.group, "0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        # At start-up, not at the first ack: a command the ACL user may not run.
        async with self._io():
            refused = await self._probe(keys=[f"{stream}:probe"], args=[self.group, self.consumer])
        if refused:
            names = ", ".join(_s(name) for name in refused)
            raise ConfigError(
                f"redis: the user in the URL may not run {names}, which aioworkers needs on "
                f"keys {self.prefix}:*: grant them (ACL SETUSER), or use another user"
            )
        self._groups.add(queue)

    # -- producer -------------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        k = self.keys(queue)
        for start in range(0, len(bodies), _CHUNK):
            chunk = bodies[start : start + _CHUNK]
            deadline = self._deadline(sent=sum(map(len, chunk)))
            # redis-py re-sends a call whose reply was lost only within its deadline; the
            # marker outlives that by far, so the server drops every re-send. A publish the
            # caller repeats after BrokerUnavailable is a new one, though, and may enqueue
            # the job twice (README, "Redis Streams").
            marker = f"{self.prefix}:{{{queue}}}:published:{os.urandom(10).hex()}"
            ttl_ms = int(max(PUBLISH_MARKER_TTL, 10 * deadline) * 1000)
            args: list[Any] = [ttl_ms]
            async with redis_io(deadline):
                if delay > 0:
                    args.append(int(delay * 1000))
                    for body in chunk:
                        args += [os.urandom(10).hex(), body]
                    await self._publish_delayed(keys=[marker, k.delayed, k.payloads], args=args)
                else:
                    await self._publish(keys=[marker, k.stream], args=[*args, *chunk])

    # -- consumer -------------------------------------------------------------------------

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        try:
            lease = self._lease if lease is None else lease
            return await self._fetch(queue, max_messages, wait, lease)
        except _GroupLost:
            # The server lost the group (restarted without persistence): recreate it.
            self._groups.discard(queue)
            await self._ensure_group(queue)
            return []

    async def _fetch(
        self, queue: str, max_messages: int, wait: float, lease: float
    ) -> list[Delivery]:
        await self._ensure_group(queue)
        k = self.keys(queue)
        if time.monotonic() >= self._reclaim_at.get(queue, 0.0):
            reclaimed = await self._reclaim_expired(queue, max_messages, lease)
            if reclaimed:
                return reclaimed
        # One round trip when jobs are waiting: move due delayed jobs, then read without
        # blocking. Only an empty read pays a second, blocking one.
        async with self._io(), self._redis.pipeline(transaction=False) as pipe:
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
        # The deadline is the block plus the reply timeout: an idle read is never cut short.
        async with self._io(wait=block_ms / 1000):
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

    async def _reclaim_expired(self, queue: str, count: int, lease: float) -> list[Delivery]:
        """Take over entries idle longer than ``lease`` (their worker died)."""
        args: list[Any] = [
            self.group,
            self.consumer,
            int(lease * 1000),
            self._cursor.get(queue, "0-0"),
            count,
        ]
        async with self._io():
            cursor, entries = await self._reclaim(keys=[self.keys(queue).stream], args=args)
        cursor = _s(cursor)
        self._cursor[queue] = cursor
        # Follow the cursor at once while it has more; rescan from the start later.
        pause = 0.0 if cursor != "0-0" else min(lease / 2, 5.0)
        self._reclaim_at[queue] = time.monotonic() + pause
        if cursor == "0-0" and time.monotonic() >= self._prune_at.get(queue, 0.0):
            self._prune_at[queue] = time.monotonic() + PRUNE_EVERY
            idle_ms = int(max(PRUNE_IDLE, 10 * lease) * 1000)
            async with self._io():
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

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
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
        sent = sum(len(x) for x in extra if isinstance(x, bytes | str))
        try:
            async with self._io(sent=sent):
                return await script(keys=keys, args=args)
        except _GroupLost as exc:
            # The group is gone (server restarted empty): nothing here is ours.
            self._groups.discard(deliveries[0].queue)
            raise LeaseLost(f"consumer group {self.group!r} no longer exists") from exc

    # -- introspection --------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        k = self.keys(queue)
        async with self._io():
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
        async with self._io(), self._redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("XINFO", "STREAM", k.stream)
            pipe.execute_command("XINFO", "STREAM", k.dead)
            stream, dead = await pipe.execute(raise_on_error=False)
            for reply in (stream, dead):
                # A missing key is zeros; any other error (BUSY, ...) is mapped, not zeros.
                if isinstance(reply, rexc.ResponseError) and "no such key" not in str(reply):
                    raise reply
        added, length = _added(stream)
        return {"added": added, "left": added - length, "dead": _added(dead)[0]}

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        # Dead letters carry bodies and tracebacks: allow for reading a few KiB each.
        async with self._io(sent=limit * 16_384):
            entries: Any = await self._redis.xrange(self.keys(queue).dead, count=limit)
        return [_dead_letter(queue, _s(entry_id), fields) for entry_id, fields in entries]

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        dead = self.keys(queue).dead
        if entry_ids is None:
            async with self._io():
                n = int(await self._redis.xlen(dead))
                await self._redis.delete(dead)
            return n
        # XDEL rejects anything that is not a stream id; such an id names no entry.
        ids = [i for i in entry_ids if _STREAM_ID.fullmatch(i)]
        removed = 0
        for start in range(0, len(ids), _CHUNK):
            async with self._io():
                removed += int(await self._redis.xdel(dead, *ids[start : start + _CHUNK]))
        return removed

    async def aclose(self) -> None:
        """Remove this consumer from its groups if it holds nothing, and disconnect."""
        try:
            for queue in self._groups:
                stream = self.keys(queue).stream
                async with self._io():
                    pending = await self._redis.xpending_range(
                        stream, self.group, "-", "+", 1, consumername=self.consumer
                    )
                    if not pending:
                        await self._redis.xgroup_delconsumer(stream, self.group, self.consumer)
        except (BrokerUnavailable, ConfigError):
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
