"""Every numeric field of the envelope is range-checked by `decode`: a value the runtime
cannot use (a time no datetime holds, an absurd attempt) is a ``schema_error`` at once,
never an exception later; and `encode` never writes what `decode` would refuse."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from aioworkers.envelope import MAX_ATTEMPT, MAX_EPOCH_MS, Envelope, decode, encode
from aioworkers.errors import DecodeError
from aioworkers.job import from_epoch_ms


def doc(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "v": 1,
        "id": "0190f0a1b2c3deadbeefcafe0123",
        "task": "t",
        "args": [],
        "kwargs": {},
        "attempt": 1,
        "enqueued_at": 1_718_000_000_000,
    }
    fields.update(overrides)
    return orjson.dumps(fields)


U64_MAX = 2**64 - 1
I64_MIN = -(2**63)

OUT_OF_RANGE = [
    pytest.param(doc(enqueued_at=10**15), id="enqueued_at-10**15"),
    pytest.param(doc(enqueued_at=MAX_EPOCH_MS + 1), id="enqueued_at-past-year-9999"),
    pytest.param(doc(enqueued_at=U64_MAX), id="enqueued_at-u64-max"),
    pytest.param(doc(enqueued_at=-1), id="enqueued_at-negative"),
    pytest.param(doc(enqueued_at=I64_MIN), id="enqueued_at-i64-min"),
    pytest.param(doc(eta=10**15), id="eta-10**15"),
    pytest.param(doc(eta=MAX_EPOCH_MS + 1), id="eta-past-year-9999"),
    pytest.param(doc(eta=-5), id="eta-negative"),
    pytest.param(doc(eta=U64_MAX), id="eta-u64-max"),
    pytest.param(doc(attempt=MAX_ATTEMPT + 1), id="attempt-over-max"),
    pytest.param(doc(attempt=U64_MAX), id="attempt-u64-max"),
    pytest.param(doc(attempt=I64_MIN), id="attempt-i64-min"),
    pytest.param(doc(v=U64_MAX), id="v-u64-max"),
    pytest.param(doc(v=-1), id="v-negative"),
]


@pytest.mark.parametrize("body", OUT_OF_RANGE)
def test_out_of_range_numbers_are_schema_errors(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert info.value.reason == "schema_error"
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "body",
    [
        doc(enqueued_at=0),
        doc(enqueued_at=MAX_EPOCH_MS),
        doc(eta=0),
        doc(eta=MAX_EPOCH_MS),
        doc(attempt=MAX_ATTEMPT),
    ],
)
def test_the_bounds_themselves_decode_and_the_runtime_can_use_them(body: bytes) -> None:
    env = decode(body)
    # What the executor does with them: a datetime for `current_job().enqueued_at`.
    from_epoch_ms(env.enqueued_at)
    if env.eta is not None:
        from_epoch_ms(env.eta)


def test_from_epoch_ms_is_exact_to_the_millisecond() -> None:
    when = from_epoch_ms(1_718_000_000_123)
    assert (when.second, when.microsecond) == (20, 123_000)
    assert from_epoch_ms(MAX_EPOCH_MS).microsecond == 999_000


@pytest.mark.parametrize(
    "env",
    [
        Envelope(id="a", task="t", args=[], kwargs={}, enqueued_at=10**15),
        Envelope(id="a", task="t", args=[], kwargs={}, enqueued_at=1, eta=MAX_EPOCH_MS + 1),
        Envelope(id="a", task="t", args=[], kwargs={}, enqueued_at=-1),
        Envelope(id="a", task="t", args=[], kwargs={}, attempt=0),
    ],
)
def test_encode_refuses_what_decode_would_refuse(env: Envelope) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode(env)
