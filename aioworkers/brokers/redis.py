"""Redis Streams broker: one stream per queue, read by a consumer group.

Keys live under ``<prefix>:{<queue>}:`` so every key a script touches hashes to one
Redis Cluster slot: ``stream`` (the jobs), ``delayed`` (a sorted set of ids by eta, in
the server's clock) with ``payloads`` (their bodies), ``dead`` (the DLQ stream) and
``leases`` (deadlines of leases extended past the horizon, below). The scripts are in
`_redis_lua`, the I/O boundary (deadlines, the error table) in `_redis_io`.

A delivery is ours while the stream's pending-entries list (PEL) says this consumer holds
it with the delivery count we were given: every ack, retry, release and dead-letter
checks that in the same script that acts, so a worker that stalled past its lease never
settles an entry another consumer (or a later delivery) now holds.

Leases: an entry a fetch hands out stays pending; any consumer's fetch takes over entries
idle longer than the *horizon* (``XAUTOCLAIM`` min-idle): the broker's
``visibility_timeout``, which an `App` sets to its own for every worker of the app (if
none was given, the lease of the broker's first fetch). A fetch or `extend` with another
lease writes it per entry: an idle time set (``XCLAIM IDLE``) so that the entry is taken
over exactly ``lease`` seconds later, or, for a lease longer than the horizon (Redis
clamps a delivery time in the future), a deadline in ``leases`` that every take-over
honours. With the runtime's calls (lease = horizon) neither costs anything extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..envelope import LUA_ID_PATTERN
from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from . import _redis_dlq
from . import _redis_lua as lua
from ._kit import DueTimers, by_queue, chunks
from ._redis_foreign import RETRY_RAW, ForeignRedis, delivery_of, delivery_of_flat
from ._redis_io import (
    ACL_RULES,
    KEEPALIVE,
    PERMANENT_CODES,
    REPLY_TIMEOUT,
    SEND_RATE,
    TRANSIENT_CODES,
    _GroupLost,
    connect,
    entries_added,
    error_code,
    map_error,
    read_dead_letter,
    redis_io,
    text,
)
from .base import DEFAULT_LEASE, DeadLetter, DeadLetterPage, Delivery, QueueDepth, Screened

__all__ = [
    "ACL_RULES",
    "KEEPALIVE",
    "PERMANENT_CODES",
    "REPLY_TIMEOUT",
    "SEND_RATE",
    "TRANSIENT_CODES",
    "RedisBroker",
    "connect",
    "error_code",
    "map_error",
    "redis_io",
]

_OWN_PARAMS = ("prefix", "group")
_STREAM_ID = re.compile(r"\d+-\d+")
_CHUNK = 500  # ids per script call: well inside Lua's unpack() limit
PRUNE_EVERY = 300.0  # seconds between sweeps for consumers of dead workers
PRUNE_IDLE = 3600.0  # how long a consumer holding nothing must be idle to be dropped
_KEYS_KEPT = 1024  # queues whose key names are kept built (a producer may name any number)
PUBLISH_MARKER_TTL = 60.0  # seconds the server remembers a publish, to drop its re-sends


@dataclass(frozen=True, slots=True)
class _Keys:
    stream: str
    delayed: str
    payloads: str
    dead: str
    leases: str


class RedisBroker(ForeignRedis):  # RawRetry: _redis_foreign
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
        # The lease reclaimers wait for (see the module): the one given, else the first a
        # fetch passes (App.visibility_timeout, as every worker of the app passes it).
        self._horizon: float | None = visibility_timeout
        # Unique per process and per broker: a restarted worker never inherits a PEL.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        # A pooled connection that went stale (server restarted) fails once: redis-py sends
        # the call again on a fresh one before it is reported. Every script is safe to send
        # twice: settles are fenced by the PEL, publishes by a marker.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)
        self._redis, self._reply_timeout = connect(url, client_query, retry=retry)
        self._groups: set[str] = set()
        self._ran_dry: set[str] = set()  # queues whose last read came back short
        self._keys: dict[str, _Keys] = {}
        self._reclaim_at: dict[str, float] = {}
        self._cursor: dict[str, str] = {}
        self._prune_at: dict[str, float] = {}
        self._host = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        register = self._redis.register_script
        self._ack = register(lua.ACK)
        self._extend = register(lua.EXTEND)
        self._retry = register(lua.RETRY)
        self._retry_raw = register(RETRY_RAW)
        self._release = register(lua.RELEASE)
        self._dead = register(lua.DEAD)
        self._publish = register(lua.PUBLISH)
        self._publish_delayed = register(lua.PUBLISH_DELAYED)
        self._promote = register(lua.PROMOTE)
        self._fetch_screened = register(lua.FETCH_SCREENED)
        self._screen_delivered = register(lua.SCREEN_DELIVERED)
        # The state store's cancel-mark key prefix, if it is on this server (see
        # `screen_cancel_marks`).
        self._marks: str | None = None
        self._reclaim = register(lua.RECLAIM)
        self._depth = register(lua.DEPTH)
        self._prune = register(lua.PRUNE)
        self._probe = register(lua.PROBE)
        # A job this process delays moves to its stream on time even while every fetch
        # long-polls (see DueTimers): the move's XADD wakes them.
        self._due = DueTimers(self._move_due)

    def __repr__(self) -> str:
        return f"<RedisBroker {self._host} prefix={self.prefix} consumer={self.consumer}>"

    def _deadline(self, sent: int = 0, wait: float = 0.0) -> float:
        """Seconds one round trip may take that moves about ``sent`` bytes and blocks up
        to ``wait`` seconds on the server."""
        return self._reply_timeout + wait + sent / SEND_RATE

    def _io(self, sent: int = 0, wait: float = 0.0) -> AbstractAsyncContextManager[None]:
        return redis_io(self._deadline(sent, wait))

    def keys(self, queue: str) -> _Keys:
        keys = self._keys.get(queue)
        if keys is None:  # built once a queue (every fetch and ack asks), for so many queues
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            base = f"{self.prefix}:{{{queue}}}"
            names = ("stream", "delayed", "payloads", "dead", "leases")
            keys = self._keys[queue] = _Keys(*(f"{base}:{name}" for name in names))
        return keys

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
            names = ", ".join(text(name) for name in refused)
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

    def screen_cancel_marks(self, server: str, prefix: str) -> bool:
        """`ScreensCancelMarks`: if the state store's cancel marks (keys ``prefix`` + job
        id) are on this broker's server, `fetch_screened` reads them as it fetches."""
        if server != self._host:
            return False
        self._marks = prefix
        return True

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        got, _ = await self.fetch_screened(queue, max_messages=max_messages, wait=wait, lease=lease)
        return got

    async def fetch_screened(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> tuple[list[Delivery], list[Screened | None]]:
        """`fetch`, and per delivery (job id, cancel mark set) as read in the same step,
        or None where not read (see `screen_cancel_marks`)."""
        if self._horizon is None:
            self._horizon = DEFAULT_LEASE if lease is None else lease
        if queue in self._ran_dry:
            # The last read of this queue came back short: the jobs it handed out start
            # before this read is sent (sending it costs more than starting them, and it
            # only waits for the queue): W3's p50 0.55 -> 0.40 ms.
            self._ran_dry.discard(queue)
            await asyncio.sleep(0)
        try:
            got, screened = await self._fetch(queue, max_messages, wait, self._horizon)
        except _GroupLost:
            # The server lost the group (restarted without persistence): recreate it.
            self._groups.discard(queue)
            await self._ensure_group(queue)
            return [], []
        if 0 < len(got) < max_messages:
            self._ran_dry.add(queue)
        if got and lease is not None and lease != self._horizon:
            # Another lease than the horizon: written per entry, as `extend` does.
            await self.extend(got, lease=lease)
        return got, screened

    async def _fetch(
        self, queue: str, max_messages: int, wait: float, horizon: float
    ) -> tuple[list[Delivery], list[Screened | None]]:
        await self._ensure_group(queue)
        k = self.keys(queue)
        if time.monotonic() >= self._reclaim_at.get(queue, 0.0):
            reclaimed = await self._reclaim_expired(queue, max_messages, horizon)
            if reclaimed:
                return reclaimed, [None] * len(reclaimed)
        after = ""
        if self._marks is not None:
            next_eta_ms, out, screened, after = await self._fetch_marked(queue, max_messages)
        else:
            next_eta_ms, out = await self._read_promoted(queue, max_messages)
            screened = [None] * len(out)
        block_ms = int(wait * 1000)
        if int(next_eta_ms) >= 0:
            # Never sleep past the next eta: the job due then is read on time.
            block_ms = min(block_ms, max(int(next_eta_ms), 1))
        if out or block_ms <= 0:
            return out, screened
        if after:
            return await self._block_screened(queue, max_messages, block_ms, after)
        # The deadline is the block plus the reply timeout: an idle read is never cut short.
        async with self._io(wait=block_ms / 1000):
            reply = await self._redis.xreadgroup(
                self.group, self.consumer, {k.stream: ">"}, count=max_messages, block=block_ms
            )
        out = self._deliveries(queue, reply)
        return out, [None] * len(out)

    async def _fetch_marked(
        self, queue: str, max_messages: int
    ) -> tuple[int, list[Delivery], list[Screened | None], str]:
        """Move due delayed jobs, read without blocking, and read the cancel marks of what
        was read: one script. Also returns where a blocking read goes on from (if nothing
        was read: see `_block_screened`)."""
        assert self._marks is not None
        k = self.keys(queue)
        args: list[Any] = [self.group, self.consumer, max_messages, 1000]
        args += [self._marks, LUA_ID_PATTERN]
        async with self._io():
            next_eta_ms, flat, ids, marks, after = await self._fetch_screened(
                keys=[k.stream, k.delayed, k.payloads], args=args
            )
        it = iter(flat)  # id, fields, id, fields, ...
        out = [delivery_of_flat(queue, i, fields, 1) for i, fields in zip(it, it, strict=True)]
        screened: list[Screened | None] = [
            (text(job_id), mark == 1) if job_id else None
            for job_id, mark in zip(ids, marks, strict=True)
        ]
        return int(next_eta_ms), out, screened, text(after)

    async def _block_screened(
        self, queue: str, max_messages: int, block_ms: int, after: str
    ) -> tuple[list[Delivery], list[Screened | None]]:
        """Wait for entries (XREADGROUP BLOCK) and read their cancel marks without a round
        trip more: the script sent behind the read on its connection runs on the server as
        soon as the read is served, so it reads each mark after the job was delivered. It
        finds the entries by ``after`` (`lua.SCREEN_DELIVERED`); each delivery it missed
        (an entry it could not read) is screened by the runtime, as before."""
        assert self._marks is not None
        k = self.keys(queue)
        args: list[Any] = [self.group, self.consumer, after, max_messages, self._marks]
        args.append(LUA_ID_PATTERN)
        # The deadline is the block plus the reply timeout: an idle read is never cut short.
        async with self._io(wait=block_ms / 1000), self._redis.pipeline(transaction=False) as pipe:
            pipe.xreadgroup(
                self.group, self.consumer, {k.stream: ">"}, count=max_messages, block=block_ms
            )
            # EVALSHA, not the script object: a pipeline holding one asks SCRIPT EXISTS first.
            pipe.evalsha(self._screen_delivered.sha, 1, k.stream, *args)
            reply, found = await pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
        out = self._deliveries(queue, reply)
        if not out:
            return out, []
        if isinstance(found, rexc.NoScriptError):  # the server lost its scripts: load it
            try:
                async with self._io():
                    found = await self._screen_delivered(keys=[k.stream], args=args)
            except BrokerUnavailable:
                found = None  # the deliveries are ours all the same: the runtime screens them
        by_entry: dict[str, Screened] = {}
        if isinstance(found, list):
            # Any other error leaves them to the runtime too, rather than to a reclaim.
            for i in range(0, len(found), 3):
                if found[i + 1]:
                    by_entry[text(found[i])] = (text(found[i + 1]), found[i + 2] == 1)
        return out, [by_entry.get(d.message_id) for d in out]

    async def _read_promoted(self, queue: str, max_messages: int) -> tuple[int, list[Delivery]]:
        k = self.keys(queue)
        # One round trip when jobs are waiting: move due delayed jobs, then read without
        # blocking. Only an empty read pays a second, blocking one.
        promote_keys = [k.stream, k.delayed, k.payloads]
        async with self._io(), self._redis.pipeline(transaction=False) as pipe:
            # EVALSHA, not the script object: a pipeline holding a script object first asks
            # SCRIPT EXISTS, a round trip more on every fetch.
            pipe.evalsha(self._promote.sha, 3, *promote_keys, 1000)
            pipe.xreadgroup(self.group, self.consumer, {k.stream: ">"}, count=max_messages)
            next_eta_ms, reply = await pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
            if isinstance(next_eta_ms, rexc.NoScriptError):  # the server lost its scripts
                next_eta_ms = await self._promote(keys=promote_keys, args=[1000])
            elif isinstance(next_eta_ms, Exception):
                raise next_eta_ms
        return int(next_eta_ms), self._deliveries(queue, reply)

    @staticmethod
    def _deliveries(queue: str, reply: Any) -> list[Delivery]:
        """The deliveries in redis-py's XREADGROUP reply, of any protocol and shape."""
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        out = []
        for _stream, entries in reply or ():
            for entry in entries:
                if isinstance(entry, list):  # RESP3 (parse_xread_resp3): one list deeper
                    out += [delivery_of(queue, i, fields, 1) for i, fields in entry]
                else:
                    out.append(delivery_of(queue, entry[0], entry[1], 1))
        return out

    async def _reclaim_expired(self, queue: str, count: int, lease: float) -> list[Delivery]:
        """Take over entries whose lease ran out (their worker died): idle longer than
        ``lease``, the horizon, unless leased until a later deadline."""
        args: list[Any] = [
            self.group,
            self.consumer,
            int(lease * 1000),
            self._cursor.get(queue, "0-0"),
            count,
        ]
        async with self._io():
            k = self.keys(queue)
            cursor, entries = await self._reclaim(keys=[k.stream, k.leases], args=args)
        cursor = text(cursor)
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
            delivery_of_flat(queue, entry_id, fields, int(n)) for entry_id, fields, n in entries
        ]

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: entries are only read on `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = []
        for queue, group in by_queue(deliveries).items():
            stream = self.keys(queue).stream
            for chunk in chunks(group, _CHUNK):
                # One argument for the batch: 'id count id count ...' (stream ids, integers).
                packed = " ".join([f"{d.message_id} {d.count}" for d in chunk])
                try:
                    async with self._io(sent=len(packed)):
                        args = [self.group, self.consumer, packed]
                        positions = await self._ack(keys=[stream], args=args)
                except _GroupLost:
                    # The group is gone (server restarted empty): nothing here is ours.
                    self._groups.discard(queue)
                    lost.extend(chunk)
                    continue
                lost.extend(chunk[int(i)] for i in positions)
        return lost

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        horizon = lease if self._horizon is None else self._horizon
        head = [int(lease * 1000), int(horizon * 1000)]
        return await self._each_chunk(self._extend, deliveries, head, leases=True)

    async def _each_chunk(
        self,
        script: Any,
        deliveries: Sequence[Delivery],
        head: Sequence[Any] = (),
        *,
        leases: bool = False,
    ) -> list[Delivery]:
        """Run a script that returns the positions of lost leases on every chunk of the
        deliveries of each queue; returns the lost ones."""
        lost: list[Delivery] = []
        for queue, group in by_queue(deliveries).items():
            k = self.keys(queue)
            keys = [k.stream, k.leases] if leases else [k.stream]
            for chunk in chunks(group, _CHUNK):
                try:
                    positions = await self._owned_call(script, keys, chunk, head=head)
                except LeaseLost:  # not ours any more: nothing to act on
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
        if delay > 0:
            self._due.after(delivery.queue, delay)

    async def _move_due(self, queue: str) -> None:
        k = self.keys(queue)
        async with self._io():
            await self._promote(keys=[k.stream, k.delayed, k.payloads], args=[1000])

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """A fresh entry, visible at once; its deliveries count again from 1 (the PEL's
        count does not travel with it), so a hand-back never makes a job look poisonous."""
        for queue, group in by_queue(deliveries).items():
            stream = self.keys(queue).stream
            for chunk in chunks(group, _CHUNK):
                with contextlib.suppress(LeaseLost):  # not ours any more: nothing to hand back
                    await self._owned_call(self._release, [stream], chunk)

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """`DeadLetterWriter`: a body that was never a delivery here (a push request)."""
        async with self._io(sent=len(body)):
            fields: dict[Any, Any] = {"b": body, **letter.facts()}
            await self._redis.xadd(self.keys(queue).dead, fields)

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
        *,
        head: Sequence[Any] = (),
    ) -> Any:
        args: list[Any] = [self.group, self.consumer, *head]
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
        added, length = entries_added(stream)
        return {"added": added, "left": added - length, "dead": entries_added(dead)[0]}

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        # Dead letters carry bodies and tracebacks: allow for reading a few KiB each.
        async with self._io(sent=limit * 16_384):
            entries: Any = await self._redis.xrange(self.keys(queue).dead, count=limit)
        return [read_dead_letter(queue, text(entry_id), fields) for entry_id, fields in entries]

    async def dead_letter_page(
        self, queue: str, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """`DeadLetterPages`: XREVRANGE / XRANGE by entry id, at most ``limit + 2`` read."""
        limit = max(limit, 1)
        async with self._io(sent=limit * 16_384):
            dead = self.keys(queue).dead
            return await _redis_dlq.page(
                self._redis, queue, dead, before=before, after=after, limit=limit
            )

    async def dead_letters_by_id(self, queue: str, entry_ids: Collection[str]) -> list[DeadLetter]:
        async with self._io(sent=len(entry_ids) * 16_384):
            return await _redis_dlq.by_id(self._redis, queue, self.keys(queue).dead, entry_ids)

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
        for chunk in chunks(ids, _CHUNK):
            async with self._io():
                removed += int(await self._redis.xdel(dead, *chunk))
        return removed

    async def aclose(self) -> None:
        """Remove this consumer from its groups if it holds nothing, and disconnect."""
        await self._due.aclose()
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
