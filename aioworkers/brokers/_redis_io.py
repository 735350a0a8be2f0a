"""The Redis I/O boundary, shared by the Redis broker and idempotency store: every round
trip gets a deadline, and redis-py's errors become ours by one table (`map_error`); and
how the broker's replies are read."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry

from ..errors import AioworkersError, BrokerUnavailable, ConfigError, redact
from ._kit import map_exceptions
from .base import DeadLetter

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
# and the state store do (the store's job waits: lists).
ACL_RULES = (
    "+@stream",
    "+@sortedset",
    "+@hash",
    "+@list",
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


def _mapper(unavailable: type[AioworkersError]) -> Callable[[BaseException], BaseException | None]:
    def mapped(exc: BaseException) -> BaseException | None:
        assert isinstance(exc, rexc.RedisError)
        return map_error(exc, unavailable)

    return mapped


# One table per error that stands for "transient" (the broker's, the store's): built once.
_TABLES: dict[type[AioworkersError], map_exceptions] = {}


@asynccontextmanager
async def redis_io(
    deadline: float, unavailable: type[AioworkersError] = BrokerUnavailable
) -> AsyncIterator[None]:
    """Around every Redis round trip: no reply within ``deadline`` seconds and transient
    errors become ``unavailable``, permanent ones a `ConfigError` (the table: `map_error`)."""
    table = _TABLES.get(unavailable)
    if table is None:
        table = _TABLES[unavailable] = map_exceptions({rexc.RedisError: _mapper(unavailable)})
    try:
        with table:
            # Cancelling redis-py mid-command drops that connection (never reused
            # half-read), so a black-holed link costs one connection and this deadline,
            # not a hang.
            async with asyncio.timeout(deadline):
                yield
    except TimeoutError as exc:
        raise unavailable(f"redis: no reply within {deadline:.3g}s") from exc


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


# -- replies, read -----------------------------------------------------------------------


def entries_added(info: Any) -> tuple[int, int]:
    """``(entries-added, length)`` from an XINFO STREAM reply; zeros for a missing key."""
    if not isinstance(info, list | dict):
        return 0, 0  # no such key (an error reply)
    fields = info if isinstance(info, dict) else pairs(info)
    get = {text(key): value for key, value in fields.items()}
    length = int(get.get("length", 0))
    # entries-added needs Redis >= 7; before that, the length is the best there is.
    return int(get.get("entries-added", length)), length


def text(value: bytes | str) -> str:
    """A reply's bytes (or text, on RESP3 with decoding) as text."""
    return value.decode() if isinstance(value, bytes) else value


def pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    """A flat ``[name, value, ...]`` reply as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def body_of(fields: dict[Any, Any]) -> bytes:
    """The job's bytes in a stream entry's fields."""
    body = fields.get(b"b")
    if isinstance(body, bytes):
        return body
    # Not written by aioworkers (another application XADDs to the stream): its fields as
    # a JSON object of text, which a consumer's decode="fields" reads back and a task
    # queue dead-letters with a reason instead of dropping it.
    return orjson.dumps({text(k): _field(v) for k, v in fields.items()})


def _field(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_dead_letter(queue: str, entry_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
    """A DLQ stream entry as a `DeadLetter`."""
    f = {text(k): v for k, v in raw.items()}

    def fact(name: str) -> str | None:
        value = f.get(name)
        return None if value is None else text(value)

    return DeadLetter.from_facts(fact, queue=queue, entry_id=entry_id, body=f.get("b", b""))
