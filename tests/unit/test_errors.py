"""`redact` keeps credentials out of logs, errors and DLQ records; the error tree."""

from __future__ import annotations

import pytest

from aioworkers.errors import (
    AioworkersError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    LeaseLost,
    Reject,
    Retry,
    redact,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://user:pw@host", "redis://user:***@host"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("amqp://guest:guest@h:5672/vh", "amqp://guest:***@h:5672/vh"),
        ("rediss://:only-a-password@cache.internal:6380", "rediss://:***@cache.internal:6380"),
        ("sqs://AKIAEXAMPLE:wJalr+XUtnFEMI@eu-west-1", "sqs://AKIAEXAMPLE:***@eu-west-1"),
        ("amqps://u:p%40ss%2Fw0rd@h/vh", "amqps://u:***@h/vh"),
        (
            "ConnectionError: Error connecting to redis://app:s3cr3t@10.0.0.5:6379/1.",
            "ConnectionError: Error connecting to redis://app:***@10.0.0.5:6379/1.",
        ),
        (
            "primary redis://a:one@h1 replica redis://b:two@h2, queue amqp://c:three@h3/v",
            "primary redis://a:***@h1 replica redis://b:***@h2, queue amqp://c:***@h3/v",
        ),
        ("'redis://user:pw@host'", "'redis://user:***@host'"),
        # urlsplit (and so redis-py) reads a raw "@" as part of the password: hide it whole
        ("redis://u:p@ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("amqp://u:p:w@h/vh", "amqp://u:***@h/vh"),
        ("redis://a:one@h1,b:two@h2/0", "redis://a:***@h2/0"),
        ("url=redis://user:pw@host\nnext line", "url=redis://user:***@host\nnext line"),
    ],
)
def test_redact_hides_passwords(text: str, expected: str) -> None:
    redacted = redact(text)
    assert redacted == expected
    assert redact(redacted) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "redis://localhost:6379/0",
        "redis://host",
        "redis://user@host:6379",
        "amqp://h:5672/vh",
        "memory://",
        "sqs://eu-west-1/queue",
        "connect to localhost:6379 failed",
        "time 12:30 user@example.com",
        "ValueError: bad input",
        "",
    ],
)
def test_redact_leaves_text_without_passwords_alone(text: str) -> None:
    assert redact(text) == text


def test_redacted_secrets_are_gone() -> None:
    text = "redis://a:hunter2@h1 and amqp://b:correct-horse@h2/v"
    redacted = redact(text)
    assert "hunter2" not in redacted
    assert "correct-horse" not in redacted


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("x"),
        BrokerUnavailable("x"),
        LeaseLost("x"),
        DecodeError("schema_error", "x"),
        Retry(),
        Reject(),
    ],
)
def test_every_error_descends_from_aioworkers_error(error: Exception) -> None:
    assert isinstance(error, AioworkersError)


def test_signals_carry_their_arguments() -> None:
    assert Retry(delay=5).delay == 5
    assert Retry().delay is None
    assert Reject().reason == "rejected"
    assert Reject("bad input").reason == "bad input"
    err = DecodeError("unknown_task", "no task named 'x'")
    assert (err.reason, err.detail, str(err)) == ("unknown_task", "no task named 'x'", err.detail)
