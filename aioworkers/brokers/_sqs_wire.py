"""How jobs travel in SQS messages: bodies, attributes, entries of a batch call and their
sizes, delays, FIFO ids, dead letters as SQS holds them. Shared by the SQS broker and the
Lambda adapter, which must read them without aiobotocore."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
import time
from typing import Any, NamedTuple

from ..envelope import decode
from ..errors import DecodeError
from .base import DeadLetter

ENC = "aw-enc"  # "b64": the body is base64 of the job's bytes
ETA = "aw-eta"  # epoch ms the message is due at, for delays beyond SQS's 900 s
BASE = "aw-base"  # deliveries before this copy of the message (release, re-delay)
DEDUP = "aw-dedup"  # a delayed job's FIFO deduplication id, used when it joins its group

MAX_DELAY = 900  # SQS's limit for DelaySeconds
MAX_BATCH = 10  # SQS's limit for every *Batch call and for MaxNumberOfMessages
DEFAULT_MAX_SIZE = 256 * 1024  # a queue's MaximumMessageSize when SQS does not say
MAX_COUNT = 2**31 - 1  # a delivery count no queue reaches: anything above is malformed
MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31, the last instant a datetime holds

# SQS text: tab, LF, CR and #x20 and up, minus surrogates and U+FFFE/U+FFFF.
_NOT_SQS_TEXT = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def encode_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The SQS text for ``body`` and the attributes that say how to read it back."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = ""
    else:
        if text and not _NOT_SQS_TEXT.search(text):
            return text, {}
    return base64.b64encode(body).decode(), {ENC: _attr("b64")}


def decode_body(text: str, encoding: str | None) -> bytes:
    if encoding == "b64":
        return base64.b64decode(text)
    return text.encode()


def read_body(text: str, encoding: str | None) -> bytes:
    """The job's bytes from an SQS body and its ``aw-enc``; `DecodeError` (``decode_error``)
    for an encoding this module does not write or a body that is not in it."""
    if encoding is None:
        return text.encode(errors="surrogatepass")
    if encoding != "b64":
        raise DecodeError("decode_error", f"unknown {ENC} {encoding[:40]!r}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("decode_error", f"{ENC}=b64 but the body is not base64") from None


def read_count(name: str, value: str | None, *, least: int = 0) -> int:
    """A count attribute (``aw-base``, ``ApproximateReceiveCount``): a whole number from
    ``least`` to `MAX_COUNT` (``least`` when absent), else `DecodeError` (``schema_error``):
    a negative one would hide deliveries from ``max_deliveries``."""
    if value is None:
        return least
    try:
        n = int(value)  # int() of over 4,300 digits is a ValueError too
    except ValueError:
        n = -1
    if not least <= n <= MAX_COUNT:
        raise DecodeError("schema_error", f"{name} is not a count: {value[:40]!r}")
    return n


def read_eta(value: str | None) -> int | None:
    """``aw-eta``: a time in epoch ms, else `DecodeError` (``schema_error``)."""
    if value is None:
        return None
    try:
        eta = float(value)
    except ValueError:
        eta = float("nan")
    if not 0 <= eta <= MAX_EPOCH_MS:  # NaN fails this too
        raise DecodeError("schema_error", f"{ETA} is not a time in epoch ms: {value[:40]!r}")
    return int(eta)


def sqs_text(text: str) -> str:
    """``text`` with every character SQS refuses escaped (``\\x00``, ``\\ud800``)."""
    return _NOT_SQS_TEXT.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _attr(value: str | int | float) -> dict[str, str]:
    if isinstance(value, str):
        return {"DataType": "String", "StringValue": value}
    return {"DataType": "Number", "StringValue": repr(value)}


def _attr_value(attributes: dict[str, Any], name: str) -> str | None:
    """A message attribute's value, from an SQS API reply (``StringValue``) or a Lambda
    event record (``stringValue``)."""
    a = attributes.get(name)
    if not isinstance(a, dict):
        return None
    v = a.get("StringValue", a.get("stringValue"))
    return None if v is None else str(v)


# -- entries of a SendMessageBatch ---------------------------------------------------------


def split_delay(delay: float, *, now_ms: int | None = None) -> tuple[int, int | None]:
    """``(DelaySeconds, eta in epoch ms or None)`` for a delay in seconds: whole seconds,
    rounded up, at most 900; beyond that the eta says when the message is really due."""
    seconds = math.ceil(max(delay, 0.0) - 1e-9)
    if seconds <= MAX_DELAY:
        return seconds, None
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return MAX_DELAY, now + int(delay * 1000)


def group_and_dedup(body: bytes, group: str | None) -> tuple[str, str]:
    """FIFO MessageGroupId (``group``, else the job's task) and deduplication id (the job's
    idempotency key, else its id); bodies that are not envelopes use a hash of the body."""
    digest = hashlib.sha256(body).hexdigest()
    try:
        env = decode(body)
    except Exception:
        return group or "aioworkers", digest
    dedup = env.key if env.key is not None else env.id
    # Ids are limited to 128 characters of [A-Za-z0-9!-~]: hash anything else.
    if not fifo_id(dedup):
        dedup = hashlib.sha256(dedup.encode()).hexdigest()
    g = group or env.task
    if not fifo_id(g):
        g = hashlib.sha256(g.encode()).hexdigest()
    return g, dedup


def fifo_id(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"[!-~]{1,128}", value) is not None


def new_id() -> str:
    return os.urandom(16).hex()


def entry(
    body: bytes,
    attributes: dict[str, Any],
    *,
    delay: int = 0,
    group: tuple[str, str] | None = None,
    b64: bool = False,
) -> dict[str, Any]:
    """A SendMessageBatch entry; ``group``: FIFO (MessageGroupId, MessageDeduplicationId);
    ``b64``: base64 even if the body is text."""
    text, enc = encode_body(body)
    if b64 and not enc:
        text, enc = base64.b64encode(body).decode(), {ENC: _attr("b64")}
    out: dict[str, Any] = {"MessageBody": text}
    attrs = {name: a for name, a in attributes.items() if name != ENC} | enc
    if attrs:
        out["MessageAttributes"] = attrs
    if group is not None:
        out["MessageGroupId"], out["MessageDeduplicationId"] = group
    elif delay:
        out["DelaySeconds"] = delay
    return out


def size(entry: dict[str, Any]) -> int:
    """A message's size as SQS counts it: the body, and each attribute's name, type and
    value."""
    total = len(entry["MessageBody"].encode())
    for name, attr in (entry.get("MessageAttributes") or {}).items():
        total += len(name.encode()) + len(str(attr.get("DataType", "")).encode())
        total += len(str(attr.get("StringValue", "")).encode()) + len(attr.get("BinaryValue", b""))
    return total


def add_fact(
    entry: dict[str, Any], name: str, text: str, limit: int, *, tail: bool = False
) -> None:
    """Add attribute ``name`` with as much of ``text`` as fits in ``limit`` bytes: its head,
    or its ``tail`` (a traceback ends with the error)."""
    room = limit - size(entry) - len(name) - len("String")
    if not text or room <= 0:
        return
    data = text.encode()
    text = (data[-room:] if tail else data[:room]).decode(errors="ignore")
    if text:
        entry.setdefault("MessageAttributes", {})[name] = _attr(text)


def sort_reply(reply: dict[str, Any], pending: dict[str, Any]) -> list[tuple[str, str]]:
    """Take the entries SQS took or refused out of ``pending`` (what is left failed on
    SQS's side, worth another try); returns ``(id, why)`` of those refused (sender faults)."""
    for ok in reply.get("Successful") or []:
        pending.pop(ok.get("Id"), None)
    refused = []
    for failed in reply.get("Failed") or []:
        if failed.get("SenderFault") and failed.get("Id") in pending:
            del pending[failed["Id"]]
            refused.append((str(failed["Id"]), f"{failed.get('Code')}: {failed.get('Message')}"))
    return refused


class Raw(NamedTuple):
    """A received message as SQS holds it (its body: the SQS text), for the DLQ."""

    message_id: str
    receipt: str
    body: bytes


def raw(m: dict[str, Any]) -> Raw:
    body = str(m.get("Body", "")).encode(errors="surrogatepass")
    return Raw(str(m.get("MessageId", "")), str(m.get("ReceiptHandle", "")), body)


def too_large(why: str) -> DecodeError:
    return DecodeError("payload_too_large", f"SQS refused to take it further: {why}")


def max_size(attributes: dict[str, str]) -> int:
    try:
        return int(attributes.get("MaximumMessageSize", DEFAULT_MAX_SIZE))
    except ValueError:
        return DEFAULT_MAX_SIZE


def read_dead_letter(queue: str, m: dict[str, Any]) -> DeadLetter:
    """A DLQ entry as a `DeadLetter`: its facts from the attributes, or what can be read of
    a job the queue's redrive policy moved there."""
    attrs = m.get("MessageAttributes") or {}
    try:
        body = read_body(m.get("Body", ""), _attr_value(attrs, ENC))
    except DecodeError:
        body = raw(m).body  # listed as SQS holds it

    def get(name: str) -> str | None:
        return _attr_value(attrs, name)

    known: dict[str, str] = {}
    if get("reason") is None:
        # Moved here by the queue's redrive policy (maxReceiveCount): read what we can.
        known["reason"] = "max_deliveries"
        try:
            env = decode(body)
            known.update(id=env.id, task=env.task)
        except Exception:
            pass
    sent = int(m.get("Attributes", {}).get("SentTimestamp", 0)) / 1000
    return DeadLetter.from_facts(
        lambda name: get(name) or known.get(name),
        queue=queue,
        entry_id=m["MessageId"],
        body=body,
        dead_at=sent,
    )
