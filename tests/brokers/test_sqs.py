"""SQS specifics beyond the conformance suite, against the test session's moto server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from aioworkers import BrokerUnavailable, ConfigError, LeaseLost, QueueDepth
from aioworkers.brokers import open_broker
from aioworkers.envelope import Envelope, decode, encode

from ..services import moto_endpoint, sqs_url
from .conftest import fetch_n, wait_depth

pytest.importorskip("aiobotocore")

from aioworkers.brokers._sqs_wire import decode_body, encode_body
from aioworkers.brokers.sqs import (
    MessageRefusedError,
    SqsBroker,
    group_and_dedup,
    split_delay,
)


@pytest.fixture
async def sqs() -> AsyncIterator[SqsBroker]:
    broker = SqsBroker(sqs_url(moto_endpoint()), visibility_timeout=1.0)
    try:
        yield broker
    finally:
        await broker.aclose()


def name() -> str:
    return f"sqs-{uuid.uuid4().hex[:16]}"


def job(task: str = "send", key: str | None = None) -> bytes:
    return encode(Envelope(id=uuid.uuid4().hex, task=task, args=[], kwargs={}, key=key))


# -- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (0, (0, None)),
        (0.2, (1, None)),
        (1.0, (1, None)),
        (1.01, (2, None)),
        (900, (900, None)),
        (901, (900, 1_000_000 + 901_000)),
        (7 * 86400, (900, 1_000_000 + 7 * 86400_000)),
    ],
)
def test_split_delay_rounds_up_and_carries_long_delays_as_an_eta(
    delay: float, expected: tuple[int, int | None]
) -> None:
    assert split_delay(delay, now_ms=1_000_000) == expected


@pytest.mark.parametrize(
    "body", [b"", b"\x00", b"\xff\xfe", "snow \u2603".encode(), b'{"v": 1}', b"\x1b[0m", b"ok"]
)
def test_bodies_round_trip_through_sqs_text(body: bytes) -> None:
    text, attrs = encode_body(body)
    assert decode_body(text, attrs.get("aw-enc", {}).get("StringValue")) == body
    if body in (b'{"v": 1}', b"ok"):
        assert attrs == {}  # plain text travels as it is


def test_fifo_ids_come_from_the_envelope() -> None:
    body = job(task="send", key="welcome:42")
    assert group_and_dedup(body, None) == ("send", "welcome:42")
    assert group_and_dedup(body, "tenant-7") == ("tenant-7", "welcome:42")
    env = decode(job(task="bill"))
    assert group_and_dedup(encode(env), None) == ("bill", env.id)
    group, dedup = group_and_dedup(b"\xffnot json", None)
    assert group == "aioworkers"
    assert len(dedup) == 64  # a hash of the body
    group, dedup = group_and_dedup(job(key="k" * 200 + " space"), None)
    assert len(dedup) == 64


def test_url_options_are_checked_and_credentials_refused() -> None:
    broker = open_broker("sqs://?region=eu-west-1&prefix=app-&create=0", visibility_timeout=5)
    assert isinstance(broker, SqsBroker)
    assert (broker.region, broker.prefix, broker.create) == ("eu-west-1", "app-", False)
    assert broker.queue_name("app-emails") == "emails"
    with pytest.raises(ConfigError, match="unknown parameters"):
        SqsBroker("sqs://?regoin=eu-west-1")
    with pytest.raises(ConfigError, match="AWS chain"):
        SqsBroker("sqs://AKIA:secret@/?region=eu-west-1")


# -- against moto -----------------------------------------------------------------------------


async def test_an_unreachable_endpoint_is_broker_unavailable() -> None:
    moto_endpoint()  # dummy credentials in the environment
    broker = SqsBroker("sqs://?endpoint_url=http://127.0.0.1:9", visibility_timeout=1)
    try:
        with pytest.raises(BrokerUnavailable):
            await broker.fetch("q", max_messages=1, wait=0)
    finally:
        await broker.aclose()


async def test_create_0_does_not_create_queues() -> None:
    broker = SqsBroker(sqs_url(moto_endpoint(), create="0"), visibility_timeout=1)
    try:
        assert await broker.depth(name()) == QueueDepth()
        with pytest.raises(ConfigError, match="does not exist"):
            await broker.publish(name(), [b"x"])
    finally:
        await broker.aclose()


async def test_a_lapsed_lease_is_fenced_across_processes(sqs: SqsBroker) -> None:
    # moto accepts the stale receipt handle: only the worker's own deadline stops it.
    queue = name()
    other = SqsBroker(sqs_url(moto_endpoint()), visibility_timeout=1.0)
    try:
        await sqs.publish(queue, [b"contended"])
        (stale,) = await fetch_n(sqs, queue, 1, within=3)
        (owner,) = await fetch_n(other, queue, 1, within=4)
        assert (owner.message_id, owner.count) == (stale.message_id, 2)
        assert await other.extend([owner], lease=10) == []

        assert await sqs.extend([stale], lease=10) == [stale]
        assert await sqs.ack([stale]) == [stale]
        await sqs.release([stale])
        with pytest.raises(LeaseLost):
            await sqs.retry(stale, body=b"x", delay=0)
        with pytest.raises(LeaseLost):
            await sqs.dead_letter(stale, _letter())
        await wait_depth(sqs, queue, QueueDepth(in_flight=1))
        await other.ack([owner])
        await wait_depth(sqs, queue, QueueDepth())
    finally:
        await other.aclose()


async def test_a_message_received_before_its_eta_is_delayed_again(sqs: SqsBroker) -> None:
    # What a delay over 900 s looks like on its last leg, shortened to 2 s.
    queue = name()
    await sqs.publish(queue, [b"placeholder"])  # creates the queue
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    await sqs.ack([d])
    client = await sqs.client()
    url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
    eta = time.time_ns() // 1_000_000 + 2000
    await client.send_message(
        QueueUrl=url,
        MessageBody="later",
        MessageAttributes={"aw-eta": {"DataType": "Number", "StringValue": str(eta)}},
    )
    start = time.monotonic()
    assert await sqs.fetch(queue, max_messages=10, wait=0) == []
    await wait_depth(sqs, queue, QueueDepth(delayed=1), within=1)
    (later,) = await fetch_n(sqs, queue, 1, within=5)
    assert time.monotonic() - start >= 1.5
    assert (later.body, later.count) == (b"later", 1)
    await sqs.ack([later])


async def test_fifo_queue_group_and_dedup_ids(sqs: SqsBroker) -> None:
    queue = f"{name()}.fifo"
    first = job(task="send", key="welcome:42")
    again = job(task="send", key="welcome:42")  # same key, another job: deduplicated
    other = job(task="bill")
    await sqs.publish(queue, [first, again, other])
    client = await sqs.client()
    url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
    reply = await client.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], WaitTimeSeconds=1
    )
    got = {m["Body"].encode(): m["Attributes"] for m in reply["Messages"]}
    assert sorted(got) == sorted([first, other])
    assert (got[first]["MessageGroupId"], got[first]["MessageDeduplicationId"]) == (
        "send",
        "welcome:42",
    )
    assert got[other]["MessageGroupId"] == "bill"
    # Its DLQ is FIFO as well, and dead-lettering works through it.
    await asyncio.sleep(1.1)  # the raw receive's lease (1 s) runs out
    got_all = await fetch_n(sqs, queue, 2, within=4)
    for d in got_all:
        await sqs.dead_letter(d, _letter())
    assert len(await sqs.dead_letters(queue)) == 2


async def test_an_existing_redrive_policy_moves_poison_to_its_dlq(sqs: SqsBroker) -> None:
    queue, dlq = name(), name()
    client = await sqs.client()
    dlq_url = (await client.create_queue(QueueName=dlq))["QueueUrl"]
    arn = (await client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 2})
    await client.create_queue(QueueName=queue, Attributes={"RedrivePolicy": policy})
    body = job(task="crashy")
    await sqs.publish(queue, [body])

    (d1,) = await fetch_n(sqs, queue, 1, within=3)
    (d2,) = await fetch_n(sqs, queue, 1, within=4)
    assert (d1.count, d2.count) == (1, 2)  # ApproximateReceiveCount feeds poison protection
    # The third receive finds it over maxReceiveCount: SQS moves it to the policy's DLQ.
    assert await fetch_n(sqs, queue, 1, within=3) == []
    (entry,) = await sqs.dead_letters(queue)
    assert (entry.reason, entry.id, entry.task, entry.body) == (
        "max_deliveries",
        decode(body).id,
        "crashy",
        body,
    )
    await wait_depth(sqs, queue, QueueDepth(dead=1))
    assert await sqs.remove_dead_letters(queue, None) == 1


async def test_a_large_traceback_is_cut_to_fit(sqs: SqsBroker) -> None:
    # Queues of SQS's former 256 KiB limit (the broker reads each queue's own).
    queue = name()
    client = await sqs.client()
    for sqs_name in (queue, f"{queue}-dead"):
        await client.create_queue(
            QueueName=sqs_name, Attributes={"MaximumMessageSize": str(256 * 1024)}
        )
    body = b"x" * 200_000
    await sqs.publish(queue, [body])
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    letter = _letter()
    await sqs.dead_letter(d, type(letter)(**{**_fields(letter), "traceback": "tb\n" * 50_000}))
    (entry,) = await sqs.dead_letters(queue)
    assert entry.body == body
    assert entry.traceback is not None
    assert 0 < len(entry.traceback) < 62 * 1024
    assert entry.traceback.endswith("tb\n")


def _letter():  # type: ignore[no-untyped-def]
    from aioworkers import DeadLetter

    return DeadLetter(id="j", task="t", reason="rejected", error="E: x", attempts=1)


def _fields(letter: object) -> dict[str, object]:
    from dataclasses import fields

    return {f.name: getattr(letter, f.name) for f in fields(letter)}  # type: ignore[arg-type]


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    reply = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(reply, "ReceiveMessage")


def _botocore(name: str, **kwargs: str) -> Exception:
    from botocore import exceptions

    error: Exception = getattr(exceptions, name)(**kwargs)
    return error


@pytest.mark.parametrize(
    ("error", "started", "message", "expected"),
    [
        (_client_error("ThrottlingException", 400), True, False, BrokerUnavailable),
        (
            _client_error("AWS.SimpleQueueService.RequestThrottled", 403),
            True,
            False,
            BrokerUnavailable,
        ),
        (_client_error("ServiceUnavailable", 503), True, False, BrokerUnavailable),
        (_client_error("InternalError", 500), True, False, BrokerUnavailable),
        (_client_error("SomethingNew", 502), True, False, BrokerUnavailable),
        (_client_error("OverLimit", 403), True, False, BrokerUnavailable),
        (_client_error("AccessDenied", 403), True, False, ConfigError),
        (_client_error("InvalidClientTokenId", 403), False, False, ConfigError),
        (_client_error("AWS.SimpleQueueService.NonExistentQueue", 400), True, False, ConfigError),
        (_client_error("KmsAccessDenied", 400), True, True, ConfigError),
        (_client_error("SomethingNew", 400), True, False, ConfigError),
        (_client_error("InvalidParameterValue", 400), True, False, ConfigError),
        (_client_error("InvalidParameterValue", 400), True, True, MessageRefusedError),
        (_client_error("InvalidMessageContents", 400), True, True, MessageRefusedError),
        (_client_error("BatchRequestTooLong", 400), True, True, MessageRefusedError),
        (_botocore("NoCredentialsError"), False, False, ConfigError),
        (_botocore("NoCredentialsError"), True, False, BrokerUnavailable),
        (
            _botocore("CredentialRetrievalError", provider="iam-role", error_msg="timeout"),
            False,
            False,
            BrokerUnavailable,
        ),
        (_botocore("MetadataRetrievalError", error_msg="timeout"), True, False, BrokerUnavailable),
        (
            _botocore("PartialCredentialsError", provider="env", cred_var="secret"),
            True,
            False,
            ConfigError,
        ),
        (_botocore("NoRegionError"), False, False, ConfigError),
        (_botocore("ProfileNotFound", profile="nope"), False, False, ConfigError),
        (
            _botocore("EndpointConnectionError", endpoint_url="http://x"),
            True,
            False,
            BrokerUnavailable,
        ),
        (_botocore("ConnectTimeoutError", endpoint_url="http://x"), True, False, BrokerUnavailable),
        (_botocore("ReadTimeoutError", endpoint_url="http://x"), True, True, BrokerUnavailable),
        (ConnectionResetError(), True, False, BrokerUnavailable),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
async def test_client_errors_are_mapped_by_one_table(
    error: Exception, started: bool, message: bool, expected: type[Exception]
) -> None:
    from aioworkers.brokers.sqs import _mapped

    with pytest.raises(expected) as caught:
        async with _mapped("receive", started=started, message=message):
            raise error
    assert caught.value.__cause__ is error


def test_an_auth_failure_says_what_to_check_not_what_aws_quoted() -> None:
    from botocore.exceptions import ClientError

    from aioworkers.brokers.sqs import map_error

    reply = {"Error": {"Code": "SignatureDoesNotMatch", "Message": "AKIAEXAMPLE/20250101"}}
    mapped = map_error(ClientError(reply, "ReceiveMessage"), "receive", started=False)
    assert isinstance(mapped, ConfigError)
    assert "AKIA" not in str(mapped)
    assert "credentials" in str(mapped)


async def test_other_errors_pass_through() -> None:
    from aioworkers.brokers.sqs import _mapped

    with pytest.raises(KeyError):
        async with _mapped("receive"):
            raise KeyError("not a client error")
