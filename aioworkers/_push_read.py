"""What a push platform sends, read into a job's body, message id and attempt: a Pub/Sub
push request (``POST /pubsub``), or an envelope as the raw body (``POST /job``: Cloud
Tasks, Eventarc, CloudEvents in binary or structured mode, any HTTP push).

Every failure is a `DecodeError` with a reason from the envelope's closed set: the push is
dead-lettered and acked, never answered with a status the platform would retry.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import DecodeError

# Pub/Sub and Cloud Tasks retry headers: the attempt the platform counts, 0-based.
RETRY_HEADERS = ("x-cloudtasks-taskretrycount", "x-cloudtasks-taskexecutioncount")
# Content types a raw envelope may come as: Cloud Tasks sends application/octet-stream
# unless the task sets another; CloudEvents structured mode application/cloudevents+json.
RAW_TYPES = ("", "application/json", "application/octet-stream", "text/plain")
MAX_ATTEMPT = 1_000_000


@dataclass(slots=True)
class Pushed:
    """One push: the job's body (an envelope, if all is well), the platform's message id,
    the platform's attempt (1-based; 0 when it sends none), and why it can never run."""

    body: bytes
    message_id: str = ""
    attempt: int = 0
    invalid: DecodeError | None = None


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def read_pubsub(raw: bytes, headers: Mapping[str, str]) -> Pushed:
    """A Pub/Sub push request: ``{"message": {"data": base64, "messageId", "attributes"},
    "subscription", "deliveryAttempt"}`` (the attempt only with a dead-letter policy)."""
    kind = media_type(headers)
    if kind not in ("application/json", ""):
        return Pushed(raw, invalid=DecodeError("decode_error", f"content type {kind!r}"))
    try:
        doc = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        return Pushed(raw, invalid=DecodeError("decode_error", f"not a Pub/Sub push: {exc}"))
    message = doc.get("message") if isinstance(doc, dict) else None
    if not isinstance(message, dict):
        return Pushed(raw, invalid=DecodeError("schema_error", "no 'message' object"))
    mid = message.get("messageId", message.get("message_id", ""))
    pushed = Pushed(raw, str(mid)[:200] if isinstance(mid, str | int) else "")
    try:
        pushed.attempt = _attempt(doc.get("deliveryAttempt"), "deliveryAttempt", base=0)
        pushed.body = _base64(message.get("data"))
    except DecodeError as exc:
        pushed.invalid = exc
    return pushed


def read_job(raw: bytes, headers: Mapping[str, str]) -> Pushed:
    """An envelope as the raw body; the attempt from Cloud Tasks' retry headers (0-based),
    the message id from Cloud Tasks' task name or the CloudEvent's id."""
    mid = headers.get("x-cloudtasks-taskname") or headers.get("ce-id") or ""
    pushed = Pushed(raw, mid[:200])
    kind = media_type(headers)
    try:
        for name in RETRY_HEADERS:
            if name in headers:
                pushed.attempt = _attempt(headers[name], name, base=1)
                break
        if kind == "application/cloudevents+json":
            pushed.body, event_id = _structured_event(raw)
            pushed.message_id = pushed.message_id or event_id
        elif kind not in RAW_TYPES:
            raise DecodeError("decode_error", f"content type {kind!r} is not an envelope")
    except DecodeError as exc:
        pushed.invalid = exc
    return pushed


def _structured_event(raw: bytes) -> tuple[bytes, str]:
    """A CloudEvent in structured mode: the envelope is its ``data`` (a JSON object) or
    ``data_base64``."""
    try:
        event = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise DecodeError("decode_error", f"not a CloudEvent: {exc}") from None
    if not isinstance(event, dict):
        raise DecodeError("schema_error", "a CloudEvent is a JSON object")
    event_id = str(event.get("id", ""))[:200]
    if "data_base64" in event:
        return _base64(event["data_base64"]), event_id
    data = event.get("data")
    if isinstance(data, str):
        return data.encode(), event_id
    return orjson.dumps(data), event_id


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise DecodeError("schema_error", "the message has no base64 'data'")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("decode_error", "the message's 'data' is not base64") from None


def _attempt(value: Any, name: str, *, base: int) -> int:
    """The platform's attempt, 1-based: ``base`` is added to a 0-based count."""
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_ATTEMPT:
        raise DecodeError("schema_error", f"{name} is not a count")
    return max(1, value + base)
