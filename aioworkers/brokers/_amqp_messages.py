"""How aioworkers' facts travel in AMQP messages: the delivery count header, dead letters'
headers, and reading them back."""

from __future__ import annotations

import contextlib
import math
import reprlib
import uuid
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from .base import DeadLetter

COUNT = "x-aioworkers-deliveries"  # deliveries counted before this copy of the message
ENTRY = "x-aioworkers-entry"  # a DLQ entry's id
MAX_COUNT = 1_000_000  # far above any poison limit: a larger count was not written by us
_PERSISTENT = 2
_NUMERIC_FACTS = ("attempts", "dead_at")
_SHOWN = reprlib.Repr()  # a header's value shown in an error: short, one line
_SHOWN.maxstring = _SHOWN.maxother = 40


def headers(message: DeliveredMessage) -> dict[str, Any]:
    return dict(message.header.properties.headers or {})


class BadHeader(Exception):
    """A header this broker reads holds something it never writes."""


def counted(headers: dict[str, Any], name: str) -> int:
    """The delivery count in header ``name`` (0 if absent); raises `BadHeader` unless it
    is a whole number in 0..MAX_COUNT: a negative one would defeat the poison limit."""
    value = headers.get(name, 0)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise BadHeader(f"header {name} is not a delivery count: {_SHOWN.repr(value)}")
    return value


def printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None
    return tag


def text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def new(body: bytes, headers: dict[str, Any] | None = None) -> tuple[bytes, Any]:
    """A persistent message with a fresh id: (body, properties)."""
    props = spec.Basic.Properties(
        delivery_mode=_PERSISTENT, message_id=uuid.uuid4().hex, headers=headers
    )
    return bytes(body), props


def letter(body: bytes, dead: DeadLetter) -> tuple[bytes, Any]:
    """A DLQ entry: ``body``, with the letter's facts and an entry id as headers."""
    headers: dict[str, Any] = {ENTRY: uuid.uuid4().hex, **dead.facts()}
    # As text: the AMQP float header is single precision.
    headers["dead_at"] = repr(headers["dead_at"])
    return new(body, headers)


def message_id(message: DeliveredMessage, gen: int) -> str:
    """The message's id, or one made of the channel's generation and its delivery tag."""
    return message.header.properties.message_id or f"{gen}.{tag(message)}"


def read_dead_letter(queue: str, message: DeliveredMessage) -> DeadLetter:
    """A DLQ entry as a `DeadLetter` (its facts from the headers)."""
    h = headers(message)
    entry_id = text(h.get(ENTRY)) or (message.header.properties.message_id or "")

    def fact(name: str) -> str | None:
        value = text(h.get(name))
        if name in _NUMERIC_FACTS and value is not None:
            # An entry another client wrote must not break listing the DLQ.
            with contextlib.suppress(ValueError):
                if math.isfinite(float(value)):
                    return value
            return None
        return value

    return DeadLetter.from_facts(fact, queue=queue, entry_id=entry_id, body=message.body)
