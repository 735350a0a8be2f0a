"""Envelope v1, the wire format: the only module that knows the bytes.

A JSON object (orjson): ``v``, ``id``, ``task``, ``args``, ``kwargs``, ``attempt`` (1-based),
``enqueued_at`` (epoch ms), and optionally ``eta`` (epoch ms), ``key``, ``headers`` and
``snoozes`` (how many times the handler snoozed it; absent means 0, so older bodies decode).
Decoding fails with a `DecodeError` whose reason is final: such a message is dead-lettered
without retries.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .errors import DecodeError

VERSION = 1
DEFAULT_MAX_SIZE = 1024 * 1024
# Times are epoch ms from 1970 up to 9999-12-31T23:59:59.999Z, the last a datetime holds.
MAX_EPOCH_MS = 253_402_300_799_999
# Far beyond any retry budget, and within what every consumer of the number (JSON in other
# languages, OpenTelemetry attributes, 32-bit counters) holds.
MAX_ATTEMPT = 2**31 - 1
# (field, lowest, highest) of every number in the envelope but ``v`` (checked for equality).
_RANGES = (
    ("attempt", 1, MAX_ATTEMPT),
    ("enqueued_at", 0, MAX_EPOCH_MS),
    ("eta", 0, MAX_EPOCH_MS),
)


@dataclass(slots=True)
class Envelope:
    """One job as it travels through the broker."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int = 1
    enqueued_at: int = 0
    eta: int | None = None
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    snoozes: int = 0

    def next_attempt(self) -> Envelope:
        """The same job, one attempt later."""
        return replace(self, attempt=self.attempt + 1)

    def snoozed(self) -> Envelope:
        """The same job and attempt, snoozed once more."""
        return replace(self, snoozes=self.snoozes + 1)


def new_id() -> str:
    """A unique, time-sortable id: 12 hex digits of epoch ms, then 80 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(env: Envelope) -> bytes:
    """Serialize; raises ``TypeError`` if an argument is not JSON-serializable and
    ``ValueError`` if it holds a NaN or infinite float (JSON has neither), or if a number
    of the envelope is out of the range `decode` accepts (e.g. a delay past year 9999)."""
    out_of_range = _out_of_range(env.attempt, env.enqueued_at, env.eta)
    if out_of_range is not None:
        raise ValueError(out_of_range)
    doc: dict[str, Any] = {
        "v": VERSION,
        "id": env.id,
        "task": env.task,
        "args": env.args,
        "kwargs": env.kwargs,
        "attempt": env.attempt,
        "enqueued_at": env.enqueued_at,
    }
    if env.eta is not None:
        doc["eta"] = env.eta
    if env.key is not None:
        doc["key"] = env.key
    if env.headers:
        doc["headers"] = env.headers
    if env.snoozes:
        if not 0 < env.snoozes <= MAX_ATTEMPT:
            raise ValueError(f"field 'snoozes' out of range [0, {MAX_ATTEMPT}]: {env.snoozes}")
        doc["snoozes"] = env.snoozes
    try:
        body = orjson.dumps(doc)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"job arguments must be JSON-serializable: {exc}") from None
    # orjson writes NaN and infinities as null: the handler would get None silently. Only
    # a body with a null in it can hold one, so the walk costs nothing for most jobs.
    if b"null" in body:
        where = _non_finite(env.args, "args") or _non_finite(env.kwargs, "kwargs")
        if where is not None:
            raise ValueError(f"job arguments must be finite numbers: {where} is not")
    return body


def _non_finite(value: Any, path: str) -> str | None:
    """Where in ``value`` a NaN or infinite float is, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} ({value!r})"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{path}[{k!r}]")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def decode(body: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Parse and validate; every failure is a `DecodeError` with a final reason."""
    if len(body) > max_size:
        raise DecodeError("payload_too_large", f"{len(body)} bytes > limit {max_size}")
    try:
        doc = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise DecodeError("decode_error", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("schema_error", f"expected an object, got {type(doc).__name__}")
    return _from_doc(doc)


_FIELDS: tuple[tuple[str, type], ...] = (
    ("v", int),
    ("id", str),
    ("task", str),
    ("args", list),
    ("kwargs", dict),
    ("attempt", int),
    ("enqueued_at", int),
)


def _from_doc(doc: dict[str, Any]) -> Envelope:
    # Once per job: the usual envelope passes one combined test; any failure goes to
    # `_check_doc`, which names what is wrong. Exact type checks: orjson returns exact
    # types, and `type(x) is int` also refuses bools.
    if len(doc) == len(_FIELDS):  # most jobs: no optional field, so no get for each
        try:
            version, job_id, task = doc["v"], doc["id"], doc["task"]
            args, kwargs = doc["args"], doc["kwargs"]
            attempt, enqueued_at = doc["attempt"], doc["enqueued_at"]
        except KeyError:
            pass  # an optional field instead of a required one: `_check_doc` says which
        else:
            if (
                type(version) is int
                and version == VERSION
                and type(job_id) is str
                and type(task) is str
                and job_id
                and task
                and type(args) is list
                and type(kwargs) is dict
                and type(attempt) is int
                and 1 <= attempt <= MAX_ATTEMPT
                and type(enqueued_at) is int
                and 0 <= enqueued_at <= MAX_EPOCH_MS
            ):
                return Envelope(job_id, task, args, kwargs, attempt, enqueued_at, None, None, {})
    get: Any = doc.get  # Any: each field is checked below
    job_id, task, args, kwargs = get("id"), get("task"), get("args"), get("kwargs")
    attempt, enqueued_at, eta = get("attempt"), get("enqueued_at"), get("eta")
    key, headers, snoozes, version = get("key"), get("headers"), get("snoozes", 0), get("v")
    if (
        type(version) is not int
        or version != VERSION
        or type(job_id) is not str
        or type(task) is not str
        or not job_id
        or not task
        or type(args) is not list
        or type(kwargs) is not dict
        or type(attempt) is not int
        or not 1 <= attempt <= MAX_ATTEMPT
        or type(enqueued_at) is not int
        or not 0 <= enqueued_at <= MAX_EPOCH_MS
        or (eta is not None and (type(eta) is not int or not 0 <= eta <= MAX_EPOCH_MS))
        or (key is not None and type(key) is not str)
        or (headers is not None and (type(headers) is not dict or headers))
        or type(snoozes) is not int
        or not 0 <= snoozes <= MAX_ATTEMPT
    ):
        headers = _check_doc(doc)
    elif headers is None:
        headers = {}
    return Envelope(job_id, task, args, kwargs, attempt, enqueued_at, eta, key, headers, snoozes)


def _check_doc(doc: dict[str, Any]) -> dict[str, str]:
    """Raise the `DecodeError` saying what is wrong with ``doc``; returns its headers if
    nothing is (a non-empty object of strings, which the fast test leaves to here)."""
    for name, kind in _FIELDS:
        if type(doc.get(name)) is not kind:
            raise DecodeError("schema_error", f"field {name!r} missing or not {kind.__name__}")
    if doc["v"] != VERSION:
        raise DecodeError("schema_error", f"unsupported envelope version {doc['v']!r}")
    if not doc["id"] or not doc["task"]:
        raise DecodeError("schema_error", "empty 'id' or 'task'")
    eta = doc.get("eta")
    key = doc.get("key")
    headers = doc.get("headers")
    if eta is not None and type(eta) is not int:
        raise DecodeError("schema_error", "field 'eta' is not int")
    # Checked here, so a number the runtime cannot use (a time no datetime holds) is a
    # final error on the first delivery, not an exception later on every one.
    out_of_range = _out_of_range(doc["attempt"], doc["enqueued_at"], eta)
    if out_of_range is not None:
        raise DecodeError("schema_error", out_of_range)
    if key is not None and type(key) is not str:
        raise DecodeError("schema_error", "field 'key' is not str")
    if headers is None:
        headers = {}
    elif type(headers) is not dict or not all(type(v) is str for v in headers.values()):
        raise DecodeError("schema_error", "field 'headers' is not an object of strings")
    _snoozes(doc.get("snoozes", 0))
    return headers


def _snoozes(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ATTEMPT:
        raise DecodeError("schema_error", "field 'snoozes' is not an int in range")
    return value


def _out_of_range(attempt: int, enqueued_at: int, eta: int | None) -> str | None:
    """Which number is out of its range (see `_RANGES`), or None."""
    for (name, low, high), value in zip(_RANGES, (attempt, enqueued_at, eta), strict=True):
        if value is not None and not low <= value <= high:
            return f"field {name!r} out of range [{low}, {high}]: {value}"
    return None


# Only bodies this small are parsed again for their headers when they failed decoding.
SALVAGE_LIMIT = 64 * 1024


def salvage_headers(body: bytes) -> dict[str, str] | None:
    """The string headers of a body that failed `decode` but is still a JSON object (a
    newer envelope, a bad field), or None: its trace context outlives the bad field."""
    if len(body) > SALVAGE_LIMIT:
        return None
    try:
        doc = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        return None
    headers = doc.get("headers") if isinstance(doc, dict) else None
    if not isinstance(headers, dict):
        return None
    return {k: v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)}


# How every body `encode` makes begins, as a Lua pattern capturing the job id: a broker's
# script may read the id so (a body it does not match, or whose decoded id differs, is
# looked at by the runtime instead). `new_id` ids match; others may not.
LUA_ID_PATTERN = '^{"v":1,"id":"([%w_%-]+)"'


def peek_id(body: bytes) -> str | None:
    """The job id in ``body`` if it is an object with a string ``id`` (else None): read
    before a job starts, to look up its cancel mark; `decode` still checks everything."""
    try:
        doc = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        return None
    job_id = doc.get("id") if type(doc) is dict else None
    return job_id if type(job_id) is str else None


def fingerprint(body: bytes) -> str:
    """A short hash of a body, for logs that must not carry the body itself."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def reset_attempt(body: bytes) -> bytes:
    """The body with ``attempt`` set back to 1, for a replay from the DLQ; undecodable bodies
    are returned unchanged (they will be dead-lettered again with their reason)."""
    try:
        env = decode(body, max_size=len(body))
    except DecodeError:
        return body
    env.attempt = 1
    return encode(env)
