"""Envelope v1: the round trip, and every decode failure with its final reason."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from aioworkers.envelope import (
    DEFAULT_MAX_SIZE,
    Envelope,
    decode,
    encode,
    new_id,
    reset_attempt,
)
from aioworkers.errors import DecodeError


def valid_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "id": "0190f0a1b2c3deadbeefcafe0123",
        "task": "send_email",
        "args": ["a@b.c"],
        "kwargs": {"subject": "hi"},
        "attempt": 1,
        "enqueued_at": 1_718_000_000_000,
    }
    doc.update(overrides)
    return doc


def without(name: str) -> dict[str, Any]:
    doc = valid_doc()
    del doc[name]
    return doc


def dumps(doc: object) -> bytes:
    return orjson.dumps(doc)


def decode_reason(body: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> str:
    with pytest.raises(DecodeError) as info:
        decode(body, max_size=max_size)
    assert info.value.reason in DecodeError.REASONS
    return info.value.reason


# -- round trip -------------------------------------------------------------------------------

ROUND_TRIP = [
    pytest.param(Envelope(id="a1", task="t", args=[], kwargs={}), id="minimal"),
    pytest.param(
        Envelope(
            id=new_id(),
            task="send_email",
            args=["a@b.c", 1, 2.5, None, True, [1, [2]], {"nested": {"x": "ü"}}],
            kwargs={"subject": "hi ☃", "n": -(2**63)},
            attempt=7,
            enqueued_at=1_718_000_000_123,
            eta=1_718_000_060_123,
            key="welcome:42",
            headers={"traceparent": "00-abc-def-01", "x-user": ""},
        ),
        id="every-field",
    ),
]


@pytest.mark.parametrize("env", ROUND_TRIP)
def test_encode_decode_round_trip(env: Envelope) -> None:
    body = encode(env)
    assert isinstance(body, bytes)
    assert decode(body) == env


def test_encode_writes_version_and_omits_unset_optionals() -> None:
    doc = orjson.loads(encode(Envelope(id="a1", task="t", args=[1], kwargs={"k": 2})))
    assert doc == {
        "v": 1,
        "id": "a1",
        "task": "t",
        "args": [1],
        "kwargs": {"k": 2},
        "attempt": 1,
        "enqueued_at": 0,
    }


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([object()], id="object"),
        pytest.param([{1, 2}], id="set"),
        pytest.param([b"raw bytes"], id="bytes"),
        pytest.param([2**70], id="int-over-64-bits"),
        pytest.param([{1: "non-string key"}], id="int-dict-key"),
    ],
)
def test_encode_rejects_non_json_arguments_with_type_error(args: list[Any]) -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        encode(Envelope(id="a1", task="t", args=args, kwargs={}))


def test_encode_rejects_non_json_kwargs_with_type_error() -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        encode(Envelope(id="a1", task="t", args=[], kwargs={"when": object()}))


@pytest.mark.parametrize(
    ("args", "kwargs", "where"),
    [
        pytest.param([float("nan")], {}, "args[0] (nan)", id="nan"),
        pytest.param([1, [2.0, float("inf")]], {}, "args[1][1] (inf)", id="inf-nested"),
        pytest.param([None], {"p": {"x": -float("inf")}}, "kwargs['p']['x'] (-inf)", id="kwargs"),
        pytest.param([(0.5, float("nan"))], {}, "args[0][1] (nan)", id="tuple"),
    ],
)
def test_encode_rejects_nan_and_infinity_instead_of_sending_null(
    args: list[Any], kwargs: dict[str, Any], where: str
) -> None:
    with pytest.raises(ValueError, match="finite") as info:
        encode(Envelope(id="a1", task="t", args=args, kwargs=kwargs))
    assert where in str(info.value)


def test_encode_keeps_real_nulls_and_finite_floats() -> None:
    env = Envelope(id="a1", task="t", args=[None, 1.5, "null"], kwargs={"null": [None, -0.0]})
    back = decode(encode(env))
    assert (back.args, back.kwargs) == ([None, 1.5, "null"], {"null": [None, -0.0]})


def test_unknown_extra_fields_are_tolerated() -> None:
    body = dumps(valid_doc(future_field={"anything": [1, 2]}, trace="x"))
    env = decode(body)
    assert env.id == "0190f0a1b2c3deadbeefcafe0123"
    assert env.task == "send_email"
    assert env.args == ["a@b.c"]
    assert env.kwargs == {"subject": "hi"}


def test_null_optionals_decode_as_unset() -> None:
    env = decode(dumps(valid_doc(eta=None, key=None, headers=None)))
    assert (env.eta, env.key, env.headers) == (None, None, {})


def test_next_attempt_increments_only_the_attempt() -> None:
    env = decode(dumps(valid_doc(attempt=2, key="k")))
    nxt = env.next_attempt()
    assert nxt.attempt == 3
    assert env.attempt == 2
    assert (nxt.id, nxt.task, nxt.args, nxt.kwargs, nxt.key) == (
        env.id,
        env.task,
        env.args,
        env.kwargs,
        env.key,
    )


# -- decode failures --------------------------------------------------------------------------


def test_size_is_checked_before_parsing() -> None:
    garbage = b"\xff\x00not json at all" * 100_000
    assert decode_reason(garbage) == "payload_too_large"


def test_deep_nesting_over_the_size_limit_is_payload_too_large() -> None:
    assert decode_reason(b"[" * 100_000, max_size=1000) == "payload_too_large"


def test_size_limit_is_inclusive() -> None:
    body = dumps(valid_doc())
    assert decode(body, max_size=len(body)).task == "send_email"
    assert decode_reason(body, max_size=len(body) - 1) == "payload_too_large"


DECODE_ERRORS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="text"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b'{"v": 1,}', id="trailing-comma"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b"\xff\xfe\x00garbage", id="binary"),
    pytest.param(b'"\xc3\x28"', id="invalid-utf8"),
    pytest.param(b'{"v": 1, "id": "\xff"}', id="invalid-utf8-in-object"),
    pytest.param(b'"\\ud800"', id="lone-surrogate"),
    pytest.param(dumps(valid_doc()) + b"x", id="content-after-document"),
    pytest.param(b"[" * 100_000, id="deep-nesting-unclosed"),
    pytest.param(b"[" * 5_000 + b"]" * 5_000, id="deep-nesting-closed"),
    pytest.param(b'{"a":' * 5_000 + b"1" + b"}" * 5_000, id="deep-nesting-objects"),
]


@pytest.mark.parametrize("body", DECODE_ERRORS)
def test_decode_error(body: bytes) -> None:
    assert decode_reason(body) == "decode_error"


SCHEMA_ERRORS = [
    # not an object
    pytest.param(dumps([1, 2]), id="array"),
    pytest.param(dumps("a string"), id="string"),
    pytest.param(dumps(42), id="number"),
    pytest.param(dumps(None), id="null"),
    pytest.param(dumps(True), id="bool"),
    pytest.param(b"[" * 500 + b"]" * 500, id="nested-array-within-depth"),
    # missing fields
    *(
        pytest.param(dumps(without(f)), id=f"missing-{f}")
        for f in ("v", "id", "task", "args", "kwargs", "attempt", "enqueued_at")
    ),
    # wrong types
    pytest.param(dumps(valid_doc(v="1")), id="v-string"),
    pytest.param(dumps(valid_doc(v=1.0)), id="v-float"),
    pytest.param(dumps(valid_doc(id=5)), id="id-int"),
    pytest.param(dumps(valid_doc(id=None)), id="id-null"),
    pytest.param(dumps(valid_doc(task=["send_email"])), id="task-list"),
    pytest.param(dumps(valid_doc(args={"0": "a"})), id="args-object"),
    pytest.param(dumps(valid_doc(args="a@b.c")), id="args-string"),
    pytest.param(dumps(valid_doc(kwargs=[])), id="kwargs-list"),
    pytest.param(dumps(valid_doc(attempt="1")), id="attempt-string"),
    pytest.param(dumps(valid_doc(attempt=1.0)), id="attempt-float"),
    pytest.param(dumps(valid_doc(attempt=None)), id="attempt-null"),
    pytest.param(dumps(valid_doc(enqueued_at=1.5)), id="enqueued_at-float"),
    pytest.param(dumps(valid_doc(enqueued_at="2024-06-10")), id="enqueued_at-string"),
    pytest.param(dumps(valid_doc(eta="soon")), id="eta-string"),
    pytest.param(dumps(valid_doc(eta=1.5)), id="eta-float"),
    pytest.param(dumps(valid_doc(key=42)), id="key-int"),
    pytest.param(dumps(valid_doc(headers=[])), id="headers-list"),
    pytest.param(dumps(valid_doc(headers="traceparent")), id="headers-string"),
    # bool is an int subclass, but not a number here
    pytest.param(dumps(valid_doc(v=True)), id="v-true"),
    pytest.param(dumps(valid_doc(attempt=True)), id="attempt-true"),
    pytest.param(dumps(valid_doc(enqueued_at=False)), id="enqueued_at-false"),
    pytest.param(dumps(valid_doc(eta=True)), id="eta-true"),
    # values out of range
    pytest.param(dumps(valid_doc(v=2)), id="v-2"),
    pytest.param(dumps(valid_doc(v=0)), id="v-0"),
    pytest.param(dumps(valid_doc(attempt=0)), id="attempt-0"),
    pytest.param(dumps(valid_doc(attempt=-3)), id="attempt-negative"),
    pytest.param(
        b'{"v":1,"id":"a","task":"t","args":[],"kwargs":{},"attempt":1e30,"enqueued_at":0}',
        id="attempt-huge-float",
    ),
    pytest.param(dumps(valid_doc(id="")), id="empty-id"),
    pytest.param(dumps(valid_doc(task="")), id="empty-task"),
    # header values must be strings
    pytest.param(dumps(valid_doc(headers={"x-n": 1})), id="header-int"),
    pytest.param(dumps(valid_doc(headers={"x-n": None})), id="header-null"),
    pytest.param(dumps(valid_doc(headers={"a": "ok", "b": ["x"]})), id="header-list"),
    pytest.param(dumps(valid_doc(headers={"x-n": {"k": "v"}})), id="header-object"),
]


@pytest.mark.parametrize("body", SCHEMA_ERRORS)
def test_schema_error(body: bytes) -> None:
    assert decode_reason(body) == "schema_error"


# -- ids --------------------------------------------------------------------------------------


def test_new_id_is_unique() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_new_id_starts_with_the_time_in_ms() -> None:
    before = time.time_ns() // 1_000_000
    job_id = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(job_id[:12], 16) <= after


def test_new_id_sorts_by_time() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_id())
        # Ids within one millisecond are unordered by design; step past it.
        start = time.monotonic()
        while time.monotonic() - start < 0.002:
            pass
    assert sorted(ids) == ids


# -- replay -----------------------------------------------------------------------------------


def test_reset_attempt_sets_attempt_to_one_and_keeps_the_rest() -> None:
    env = Envelope(
        id="a1",
        task="t",
        args=[1, "x"],
        kwargs={"k": [2]},
        attempt=4,
        enqueued_at=123,
        eta=456,
        key="k1",
        headers={"h": "v"},
    )
    replayed = decode(reset_attempt(encode(env)))
    assert replayed.attempt == 1
    env.attempt = 1
    assert replayed == env


def test_reset_attempt_works_on_bodies_over_the_default_limit() -> None:
    env = Envelope(id="a1", task="t", args=["x" * (DEFAULT_MAX_SIZE + 10)], kwargs={}, attempt=3)
    replayed = decode(reset_attempt(encode(env)), max_size=DEFAULT_MAX_SIZE * 2)
    assert replayed.attempt == 1
    assert replayed.args == env.args


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\x00garbage", id="binary"),
        pytest.param(b"", id="empty"),
        pytest.param(dumps(valid_doc(attempt=0)), id="schema-error"),
        pytest.param(dumps([1]), id="array"),
    ],
)
def test_reset_attempt_leaves_undecodable_bodies_unchanged(body: bytes) -> None:
    assert reset_attempt(body) == body


def test_recursion_error_while_parsing_is_a_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # orjson stops at depth 1024 itself; a parser that recurses instead must map the same way.
    def loads(body: bytes) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(orjson, "loads", loads)
    assert decode_reason(b"[[[]]]") == "decode_error"
