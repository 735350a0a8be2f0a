"""SQS faults found by reading (hardening issue #11), each shown against the test session's
moto server.

moto does not check what real SQS checks for a message's content (characters outside
XML's, a body plus attributes over the queue's ``MaximumMessageSize``), so `strict` adds
those checks to one client with botocore's own event hooks: a refused entry comes back in
``Failed`` with ``SenderFault``, as real SQS answers a ``SendMessageBatch``. Everything
else is moto's. `failing` makes the next few calls of one operation fail the way a dropped
connection does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aioworkers import BrokerUnavailable, ConfigError, DeadLetter, LeaseLost, QueueDepth
from aioworkers.envelope import Envelope, decode, encode

from ..services import moto_endpoint, sqs_url
from .conftest import fetch_n, wait_depth

pytest.importorskip("aiobotocore")

from botocore import exceptions as bexc

from aioworkers.brokers._sqs_wire import _NOT_SQS_TEXT
from aioworkers.brokers.sqs import MessageRefusedError, SqsBroker

KIB = 1024


@pytest.fixture
async def sqs() -> AsyncIterator[SqsBroker]:
    broker = SqsBroker(sqs_url(moto_endpoint()), visibility_timeout=2.0)
    try:
        yield broker
    finally:
        await broker.aclose()


def name() -> str:
    return f"sqsf-{uuid.uuid4().hex[:16]}"


def job(task: str = "send", **kwargs: Any) -> bytes:
    return encode(Envelope(id=uuid.uuid4().hex, task=task, args=[], kwargs=kwargs))


def letter(**changes: Any) -> DeadLetter:
    base = DeadLetter(id="j", task="t", reason="max_retries", error="E: x", attempts=3)
    return replace(base, **changes)


# -- what real SQS checks and moto does not ----------------------------------------------------


def sqs_size(entry: dict[str, Any]) -> int:
    """A message's size as SQS counts it: the body, and each attribute's name, type and value."""
    size = len(entry["MessageBody"].encode())
    for key, attr in (entry.get("MessageAttributes") or {}).items():
        size += len(key.encode()) + len(attr["DataType"].encode())
        size += len(attr.get("StringValue", "").encode())
    return size


def strict_refusal(limit: int) -> Callable[[dict[str, Any]], tuple[str, str] | None]:
    def refuse(entry: dict[str, Any]) -> tuple[str, str] | None:
        texts = [entry["MessageBody"]]
        texts += [a.get("StringValue", "") for a in (entry.get("MessageAttributes") or {}).values()]
        if any(_NOT_SQS_TEXT.search(t) for t in texts):
            return "InvalidMessageContents", "Invalid binary character was found in the message"
        if sqs_size(entry) > limit:
            return "InvalidParameterValue", f"Message must be shorter than {limit} bytes."
        return None

    return refuse


@contextmanager
def strict(
    client: Any, refuse: Callable[[dict[str, Any]], tuple[str, str] | None]
) -> Iterator[list[dict[str, Any]]]:
    """Entries of a ``SendMessageBatch`` that ``refuse`` names come back ``Failed`` with
    ``SenderFault``; the rest go to moto. Yields the list of refusals, as they happen."""
    refused: list[dict[str, Any]] = []

    def split(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        keep, failed = [], []
        for entry in params["Entries"]:
            why = refuse(entry)
            if why is None:
                keep.append(entry)
            else:
                failed.append({"Id": entry["Id"], "SenderFault": True, "Code": why[0]})
                failed[-1]["Message"] = why[1]
        params["Entries"] = keep
        context["strict_failed"] = failed
        refused.extend(failed)

    def all_refused(context: dict[str, Any], params: dict[str, Any], **_: Any) -> Any:
        failed = context.get("strict_failed")
        if failed and not json.loads(params["body"] or b"{}").get("Entries"):
            http = SimpleNamespace(status_code=200, headers={}, content=b"")
            return http, {"Successful": [], "Failed": failed}
        return None

    def add_failed(parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if context.get("strict_failed") and parsed.get("Successful") is not None:
            parsed["Failed"] = [*(parsed.get("Failed") or []), *context["strict_failed"]]

    events = client.meta.events
    hooks = [
        ("provide-client-params.sqs.SendMessageBatch", split),
        ("before-call.sqs.SendMessageBatch", all_refused),
        ("after-call.sqs.SendMessageBatch", add_failed),
    ]
    for event, hook in hooks:
        events.register(event, hook)
    try:
        yield refused
    finally:
        for event, hook in hooks:
            events.unregister(event, hook)


@contextmanager
def failing(client: Any, operation: str, times: int) -> Iterator[list[int]]:
    """The next ``times`` calls of ``operation`` fail like a dropped connection; yields the
    count of calls failed so far."""
    failed = [0]

    def fail(**_: Any) -> None:
        if failed[0] < times:
            failed[0] += 1
            raise bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    event = f"before-call.sqs.{operation}"
    client.meta.events.register(event, fail)
    try:
        yield failed
    finally:
        client.meta.events.unregister(event, fail)


async def create_queues(sqs: SqsBroker, queue: str, **attributes: str) -> None:
    """Create ``queue`` and its DLQ with ``attributes`` before the broker resolves them."""
    client = await sqs.client()
    for sqs_name in (queue, f"{queue}-dead"):
        await client.create_queue(QueueName=sqs_name, Attributes=attributes)


# -- sender faults in batch sends ---------------------------------------------------------------


async def test_a_dead_letter_with_control_characters_is_stored(sqs: SqsBroker) -> None:
    # Before: SQS refused the entry (SenderFault), and the refusal was BrokerUnavailable,
    # which the runtime retries forever while the job holds its slot.
    queue = name()
    await sqs.publish(queue, [job()])
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    error = "ValueError: bad byte \x00 in \x1b[31mred\x1b[0m \ud800 \ufffe"
    bad = letter(id="id\x01", task="t\x7f\x02", error=error, traceback="tb \x00\n")
    with strict(await sqs.client(), strict_refusal(256 * KIB)) as refused:
        await asyncio.wait_for(sqs.dead_letter(d, bad), 10)
    assert refused == []
    (entry,) = await sqs.dead_letters(queue)
    assert entry.reason == "max_retries"
    assert entry.error is not None
    assert entry.error.startswith("ValueError: bad byte \\x00 in \\x1b[31mred")
    for text in (entry.id, entry.task, entry.error, entry.traceback):
        assert text is not None
        assert not _NOT_SQS_TEXT.search(text)
    assert (entry.id, entry.task) == ("id\\x01", "t\x7f\\x02")
    await wait_depth(sqs, queue, QueueDepth(dead=1))


async def test_a_dead_letter_over_the_size_limit_is_cut_to_fit(sqs: SqsBroker) -> None:
    # A queue of SQS's former 256 KiB limit; the body nearly fills it, so the letter's facts
    # (error, traceback) must be cut for body plus attributes to fit.
    limit = 256 * KIB
    queue = name()
    await create_queues(sqs, queue, MaximumMessageSize=str(limit))
    body = job(pad="x" * (limit - 1500))
    with strict(await sqs.client(), strict_refusal(limit)) as refused:
        await sqs.publish(queue, [body])
        (d,) = await fetch_n(sqs, queue, 1, within=3)
        big = letter(error="E: " + "e" * 1997, traceback="tb\n" * 3000)
        await asyncio.wait_for(sqs.dead_letter(d, big), 10)
    assert refused == []
    (entry,) = await sqs.dead_letters(queue)
    assert entry.body == body
    assert entry.reason == "max_retries"
    assert entry.error is not None
    assert entry.error.startswith("E: eee")
    await wait_depth(sqs, queue, QueueDepth(dead=1))


async def test_a_dead_letter_the_dlq_cannot_hold_whole_keeps_its_head(sqs: SqsBroker) -> None:
    # A DLQ smaller than its queue (a redrive target chosen by hand): the letter still goes
    # to the DLQ, its body cut, and says so, rather than failing on every delivery.
    queue = name()
    client = await sqs.client()
    await client.create_queue(QueueName=queue)
    await client.create_queue(QueueName=f"{queue}-dead", Attributes={"MaximumMessageSize": "2048"})
    body = job(pad="y" * 4000)
    await sqs.publish(queue, [body])
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    with strict(await sqs.client(), strict_refusal(2048)) as refused:
        await asyncio.wait_for(sqs.dead_letter(d, letter()), 10)
    assert refused == []
    (entry,) = await sqs.dead_letters(queue)
    assert entry.reason == "max_retries"
    assert body.startswith(entry.body)
    assert 0 < len(entry.body) < 2048
    assert entry.error is not None
    assert f"body cut to {len(entry.body)} of {len(body)} bytes" in entry.error
    await wait_depth(sqs, queue, QueueDepth(dead=1))


async def test_a_publish_over_the_queue_limit_raises_a_clear_error(sqs: SqsBroker) -> None:
    limit = 64 * KIB
    queue = name()
    await create_queues(sqs, queue, MaximumMessageSize=str(limit))
    small, large = job(), job(pad="z" * limit)
    refusal = pytest.raises(MessageRefusedError, match=f"over .*MaximumMessageSize {limit}")
    with strict(await sqs.client(), strict_refusal(limit)), refusal:
        await asyncio.wait_for(sqs.publish(queue, [small, large]), 10)
    # Refused before anything was sent: the producer can retry the batch without the big one.
    await wait_depth(sqs, queue, QueueDepth())
    assert isinstance(MessageRefusedError("x"), ValueError)


async def test_an_entry_sqs_refuses_is_an_error_not_a_retry(sqs: SqsBroker) -> None:
    queue = name()
    good, bad = job(), job(task="refuse-me")

    def refuse(entry: dict[str, Any]) -> tuple[str, str] | None:
        if "refuse-me" in entry["MessageBody"]:
            return "InvalidMessageContents", "not today"
        return None

    refusal = pytest.raises(MessageRefusedError, match=r"1 of 2 .*InvalidMessageContents: not")
    with strict(await sqs.client(), refuse), refusal:
        await asyncio.wait_for(sqs.publish(queue, [good, bad]), 10)
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    assert d.body == good


async def test_a_batch_over_the_payload_limit_is_split(sqs: SqsBroker) -> None:
    # moto's (and SQS's) BatchRequestTooLong: ten messages of 200 KiB are 2 MB in one call.
    queue = name()
    jobs = [job(pad=str(i) * 200 * KIB) for i in range(10)]
    await sqs.publish(queue, jobs)
    got = await fetch_n(sqs, queue, 10, within=10)
    assert sorted(d.body for d in got) == sorted(jobs)
    await sqs.ack(got)


# -- a failed delete after the copy was sent keeps the lease -------------------------------------


async def _one(sqs: SqsBroker, queue: str, body: bytes | None = None) -> Any:
    await sqs.publish(queue, [body or job()])
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    return d


async def test_a_retry_whose_delete_failed_is_completed_by_the_next_call(sqs: SqsBroker) -> None:
    queue = name()
    d = await _one(sqs, queue)
    client = await sqs.client()
    with failing(client, "DeleteMessageBatch", 1), pytest.raises(BrokerUnavailable):
        await sqs.retry(d, body=b"attempt 2", delay=0)
    # What the runtime's backoff does next: the same call again. Before, the lease was
    # already marked settled, so this raised LeaseLost and the original stayed beside
    # its copy, to run again once its visibility timeout ran out.
    await sqs.retry(d, body=b"attempt 2", delay=0)
    await wait_depth(sqs, queue, QueueDepth(ready=1))  # the copy only: one, not two
    (again,) = await fetch_n(sqs, queue, 1, within=3)
    assert again.body == b"attempt 2"
    await sqs.ack([again])


async def test_a_release_whose_delete_failed_is_completed_by_the_next_call(
    sqs: SqsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = name()
    d = await _one(sqs, queue)
    with (
        caplog.at_level(logging.WARNING, "aioworkers"),
        failing(await sqs.client(), "DeleteMessageBatch", 1),
        pytest.raises(BrokerUnavailable),
    ):
        await sqs.release([d])
    # A worker at shutdown may not call again: the log says what that would leave.
    assert "may run twice" in caplog.text
    await sqs.release([d])
    await wait_depth(sqs, queue, QueueDepth(ready=1))
    (again,) = await fetch_n(sqs, queue, 1, within=3)
    assert (again.body, again.count) == (d.body, 1)
    await sqs.ack([again])


async def test_a_dead_letter_whose_delete_failed_is_completed_by_the_next_call(
    sqs: SqsBroker,
) -> None:
    queue = name()
    d = await _one(sqs, queue)
    with failing(await sqs.client(), "DeleteMessageBatch", 1), pytest.raises(BrokerUnavailable):
        await sqs.dead_letter(d, letter())
    await sqs.dead_letter(d, letter())
    await wait_depth(sqs, queue, QueueDepth(dead=1))  # one letter, and the original gone
    assert len(await sqs.dead_letters(queue)) == 1


async def test_a_copy_left_beside_its_original_is_logged(
    sqs: SqsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = name()
    d = await _one(sqs, queue)
    with failing(await sqs.client(), "DeleteMessageBatch", 1), pytest.raises(BrokerUnavailable):
        await sqs.retry(d, body=b"attempt 2", delay=0)
    # The delete could not be completed before the lease ran out (a stalled worker, a
    # long outage): the duplicate is now possible, and the log says so.
    d.token.deadline = time.monotonic() - 1
    with caplog.at_level(logging.WARNING, "aioworkers"), pytest.raises(LeaseLost):
        await sqs.retry(d, body=b"attempt 2", delay=0)
    assert "may run twice" in caplog.text


async def test_a_server_side_failure_in_an_extend_is_not_a_lost_lease(sqs: SqsBroker) -> None:
    # SenderFault false: SQS failed to change the visibility this time; the receipt handle
    # is fine. Before, it was reported lost, and the runtime cancelled the running job.
    queue = name()
    d = await _one(sqs, queue)
    client = await sqs.client()

    def server_fault(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Successful"] = []
        fault = {"Id": "0", "SenderFault": False, "Code": "InternalError", "Message": "m"}
        parsed["Failed"] = [fault]

    event = "after-call.sqs.ChangeMessageVisibilityBatch"
    client.meta.events.register(event, server_fault)
    try:
        assert await sqs.extend([d], lease=10) == []
    finally:
        client.meta.events.unregister(event, server_fault)
    assert await sqs.ack([d]) == []  # still ours: its lease had not run out


# -- bad message attributes ----------------------------------------------------------------------


def _number(value: str) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": value}


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


@pytest.mark.parametrize(
    ("body", "attributes", "reason", "detail"),
    [
        ("{}", {"aw-base": _number("-100")}, "schema_error", "aw-base"),
        ("{}", {"aw-base": _string("abc")}, "schema_error", "aw-base"),
        ("{}", {"aw-base": _number("1e400")}, "schema_error", "aw-base"),
        ("{}", {"aw-eta": _number("nan")}, "schema_error", "aw-eta"),
        ("{}", {"aw-eta": _string("soon")}, "schema_error", "aw-eta"),
        ("{}", {"aw-eta": _number("1e400")}, "schema_error", "aw-eta"),
        ("!!! not base64 !!!", {"aw-enc": _string("b64")}, "decode_error", "aw-enc"),
        ("{}", {"aw-enc": _string("rot13")}, "decode_error", "aw-enc"),
    ],
)
async def test_a_message_with_bad_attributes_is_dead_lettered(
    sqs: SqsBroker, body: str, attributes: dict[str, Any], reason: str, detail: str
) -> None:
    # Before: fetch raised (ValueError, binascii.Error, OverflowError) on every poll, or
    # (a negative aw-base) handed out a delivery count below 1 that max_deliveries never
    # catches.
    queue = name()
    good = job()
    await sqs.publish(queue, [good])
    client = await sqs.client()
    url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
    await client.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=attributes)
    got = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not got or (await sqs.depth(queue)).dead == 0):
        got += await sqs.fetch(queue, max_messages=10, wait=0.5)
    assert [d.body for d in got] == [good]
    (entry,) = await sqs.dead_letters(queue)
    assert entry.reason == reason
    assert entry.error is not None
    assert detail in entry.error
    assert entry.body == body.encode()
    await sqs.ack(got)
    await wait_depth(sqs, queue, QueueDepth(dead=1))


# -- FIFO delays -----------------------------------------------------------------------------------


async def test_a_delayed_fifo_retry_blocks_nothing_and_burns_no_delivery(sqs: SqsBroker) -> None:
    # Before: the retry went back into its group with an eta, was received early and held
    # invisible until due: the whole group waited behind it, and every early receive
    # counted as a delivery (a delay over (max_deliveries - 1) x 12 h dead-lettered a job
    # that never ran).
    queue = f"{name()}.fifo"
    first, second = job(n=1), job(n=2)  # one task: one message group
    await sqs.publish(queue, [first])
    (d,) = await fetch_n(sqs, queue, 1, within=3)
    retried = encode(decode(first).next_attempt())
    await sqs.retry(d, body=retried, delay=3)
    start = time.monotonic()
    await sqs.publish(queue, [second])
    (d2,) = await fetch_n(sqs, queue, 1, within=2)
    assert d2.body == second  # the group is not held back by the waiting retry
    assert time.monotonic() - start < 2.5
    await sqs.ack([d2])
    (d3,) = await fetch_n(sqs, queue, 1, within=8)
    assert d3.body == retried
    assert time.monotonic() - start >= 2.5  # its delay was kept
    assert d3.count == 1  # waiting was no delivery
    await sqs.ack([d3])
    await wait_depth(sqs, queue, QueueDepth())


async def test_a_delayed_fifo_publish_keeps_its_group_and_key(sqs: SqsBroker) -> None:
    queue = f"{name()}.fifo"
    body = encode(Envelope(id=uuid.uuid4().hex, task="bill", args=[], kwargs={}, key="k-1"))
    await sqs.publish(queue, [body], delay=1)
    await wait_depth(sqs, queue, QueueDepth(delayed=1), within=1)
    (d,) = await fetch_n(sqs, queue, 1, within=6)
    assert (d.body, d.count) == (body, 1)
    client = await sqs.client()
    await sqs.release([d])
    url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
    reply = await client.receive_message(
        QueueUrl=url, AttributeNames=["MessageGroupId"], WaitTimeSeconds=1
    )
    assert reply["Messages"][0]["Attributes"]["MessageGroupId"] == "bill"


async def test_fifo_with_create_0_needs_its_delay_queue() -> None:
    endpoint = moto_endpoint()
    queue = f"{name()}.fifo"
    maker = SqsBroker(sqs_url(endpoint), visibility_timeout=2)
    broker = SqsBroker(sqs_url(endpoint, create="0"), visibility_timeout=2)
    try:
        client = await maker.client()
        for sqs_name in (queue, queue.replace(".fifo", "-dead.fifo")):
            await client.create_queue(QueueName=sqs_name, Attributes={"FifoQueue": "true"})
        with pytest.raises(ConfigError, match="-delay"):
            await broker.fetch(queue, max_messages=1, wait=0)
    finally:
        await broker.aclose()
        await maker.aclose()


# -- client errors -------------------------------------------------------------------------------


def _no_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    moto_endpoint()  # sets the dummy credentials first, so they can be taken away
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_no_credentials_at_start_up_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_aws_config(monkeypatch, tmp_path)
    broker = SqsBroker(sqs_url(moto_endpoint()), visibility_timeout=2)
    try:
        with pytest.raises(ConfigError, match="no AWS credentials"):
            await broker.fetch(name(), max_messages=1, wait=0)
    finally:
        await broker.aclose()


class CredentialsEndpoint:
    """A container-credentials endpoint (what ECS and EKS give a task; the EC2 instance
    metadata service fails the same way) that can be made to fail."""

    def __init__(self) -> None:
        self.failing = False
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if self.failing:
            status, payload = "500 Internal Server Error", b"{}"
        else:
            # Expiring within botocore's refresh window: fetched again before each request.
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
            creds = {"AccessKeyId": "testing", "SecretAccessKey": "testing"}
            payload = json.dumps({**creds, "Token": "testing", "Expiration": expires}).encode()
            status = "200 OK"
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + payload)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/creds"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_failing_credentials_endpoint_is_transient(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: botocore's CredentialRetrievalError went out of fetch unmapped and stopped
    # the worker for good.
    _no_aws_config(monkeypatch, tmp_path)
    endpoint = CredentialsEndpoint()
    async with endpoint as uri:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
        broker = SqsBroker(sqs_url(moto_endpoint()), visibility_timeout=2)
        queue = name()
        try:
            await broker.publish(queue, [b"one"])
            endpoint.failing = True
            with pytest.raises(BrokerUnavailable, match="credentials"):
                await broker.fetch(queue, max_messages=1, wait=0)
            endpoint.failing = False
            (d,) = await fetch_n(broker, queue, 1, within=3)
            await broker.ack([d])
        finally:
            await broker.aclose()


async def test_an_invalid_queue_name_is_a_config_error() -> None:
    broker = SqsBroker(sqs_url(moto_endpoint(), prefix="no spaces!"), visibility_timeout=2)
    try:
        with pytest.raises(ConfigError, match="InvalidParameterValue"):
            await broker.publish("q", [b"x"])
    finally:
        await broker.aclose()


def test_a_visibility_timeout_over_12_hours_is_refused() -> None:
    with pytest.raises(ConfigError, match="12 hours"):
        SqsBroker("sqs://?region=eu-west-1", visibility_timeout=13 * 3600)
