"""How bytes travel in SQS messages, shared by the SQS broker and the Lambda adapter (which
must read them without aiobotocore)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from ..errors import DecodeError

ENC = "aw-enc"  # "b64": the body is base64 of the job's bytes
ETA = "aw-eta"  # epoch ms the message is due at, for delays beyond SQS's 900 s
BASE = "aw-base"  # deliveries before this copy of the message (release, re-delay)
DEDUP = "aw-dedup"  # a delayed job's FIFO deduplication id, used when it joins its group

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
