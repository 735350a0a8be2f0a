"""How bytes travel in SQS messages, shared by the SQS broker and the Lambda adapter (which
must read them without aiobotocore)."""

from __future__ import annotations

import base64
import re
from typing import Any

ENC = "aw-enc"  # "b64": the body is base64 of the job's bytes
ETA = "aw-eta"  # epoch ms the message is due at, for delays beyond SQS's 900 s
BASE = "aw-base"  # deliveries before this copy of the message (release, re-delay)

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
