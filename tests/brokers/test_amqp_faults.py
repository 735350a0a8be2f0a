"""RabbitMQ faults the review suspected by reading (issue #11), each shown on the real
server: bad headers in a message, dead-lettering of delays, resource alarms, and the
mapping of client errors."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

import aioworkers
from aioworkers import BrokerUnavailable, ConfigError, QueueDepth
from aioworkers.brokers.amqp import COUNT, AmqpBroker

from ..services import AMQP_URL, RABBITMQ, delete_amqp_queues, ensure
from .conftest import fetch_n, wait_depth

Make = Callable[..., AmqpBroker]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    ensure(RABBITMQ)
    brokers: list[AmqpBroker] = []

    def make(query: str = "prefetch=100", visibility: float = 30.0) -> AmqpBroker:
        broker = AmqpBroker(f"{AMQP_URL}?{query}", visibility_timeout=visibility)
        brokers.append(broker)
        return broker

    try:
        yield make
    finally:
        names: set[str] = set()
        for broker in brokers:
            await broker.aclose()
            names |= broker.known_queues
        await delete_amqp_queues(names)


@pytest.fixture
def queue() -> str:
    return f"amqp-faults-{uuid.uuid4().hex}"


async def publish_raw(queue: str, body: bytes, headers: dict[str, Any]) -> str:
    """Publish as another client would (aio-pika, not this broker); returns the message id."""
    message_id = uuid.uuid4().hex
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        channel = await conn.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, message_id=message_id), routing_key=queue
        )
    return message_id


async def redeliver_raw(queue: str) -> None:
    """Take one message with a raw consumer and close the channel unacked: RabbitMQ
    requeues it marked ``redelivered``."""
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        channel = await conn.channel()
        q = await channel.get_queue(queue, ensure=False)
        message = await q.get(timeout=5, fail=True)
        assert message is not None
        await channel.close()


async def dead_within(broker: AmqpBroker, queue: str, within: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        letters = await broker.dead_letters(queue)
        if letters:
            return letters
        await asyncio.sleep(0.05)
    return []


async def settled_everything(broker: AmqpBroker, queue: str) -> None:
    """Nothing was left unacked: closing the broker's connections requeues nothing."""
    await broker.aclose()
    assert await ready_messages(queue) == 0


# -- bad headers ----------------------------------------------------------------------------

BAD_COUNTS = [
    pytest.param("garbage", id="text"),
    pytest.param(bytearray(b"\xff\xfe"), id="bytes"),
    pytest.param(Decimal("1.5"), id="decimal"),
    pytest.param({"a": 1}, id="table"),
    pytest.param(None, id="void"),
    pytest.param(-1000, id="negative"),
    pytest.param(1.5, id="float"),
    pytest.param(True, id="bool"),
    pytest.param([1, 2], id="list"),
    pytest.param("9" * 5000, id="5000-digits"),
    pytest.param(2**62, id="huge"),
]


@pytest.mark.parametrize("value", BAD_COUNTS)
async def test_a_bad_delivery_count_header_is_dead_lettered_never_raised_from_fetch(
    make: Make, queue: str, value: Any
) -> None:
    broker = make()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []  # declared, consuming
    bad_id = await publish_raw(queue, b"body", {COUNT: value})
    await broker.publish(queue, [b"good"])

    # Before: fetch raised ValueError/TypeError (the message left taken, never settled),
    # or handed a negative count out (a poison job that never reaches its limit).
    got = await fetch_n(broker, queue, 1, within=3)
    assert [d.body for d in got] == [b"good"]
    await broker.ack(got)
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason, letter.task, letter.body) == (
        bad_id,
        "schema_error",
        None,
        b"body",
    )
    assert letter.error is not None
    assert COUNT in letter.error
    assert len(letter.error) < 300
    await wait_depth(broker, queue, QueueDepth(dead=1))
    await settled_everything(broker, queue)


async def test_a_bad_count_on_a_redelivered_message_is_dead_lettered(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    bad_id = await publish_raw(queue, b"body", {COUNT: "x"})
    await redeliver_raw(queue)  # comes back `redelivered`: the recount path
    assert await broker.fetch(queue, max_messages=10, wait=0.5) == []
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason) == (bad_id, "schema_error")
    await wait_depth(broker, queue, QueueDepth(dead=1))
    await settled_everything(broker, queue)


async def test_a_bad_x_delivery_count_on_a_quorum_queue_is_dead_lettered(
    make: Make, queue: str
) -> None:
    broker = make("queue_type=quorum&prefetch=10")
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    bad_id = await publish_raw(queue, b"body", {"x-delivery-count": "lots"})
    assert await broker.fetch(queue, max_messages=10, wait=0.5) == []
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason) == (bad_id, "schema_error")
    await wait_depth(broker, queue, QueueDepth(dead=1))
    await settled_everything(broker, queue)


async def test_a_good_count_header_from_another_client_is_counted(make: Make, queue: str) -> None:
    broker = make()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    await publish_raw(queue, b"body", {COUNT: 4})
    (d,) = await fetch_n(broker, queue, 1, within=3)
    assert d.count == 5
    await broker.ack([d])


async def test_a_dlq_entry_with_bad_numbers_from_another_client_is_still_listed(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    await publish_raw(
        f"{queue}.dead", b"body", {"reason": "rejected", "attempts": "many", "dead_at": "nan"}
    )
    (letter,) = await broker.dead_letters(queue)  # raised ValueError before
    assert (letter.reason, letter.attempts, letter.body) == ("rejected", 1, b"body")
    assert await broker.remove_dead_letters(queue, None) == 1


# -- delays ---------------------------------------------------------------------------------


@contextmanager
def rabbit_env(name: str, value: str, default: str) -> Iterator[None]:
    """A RabbitMQ application setting for the test, back to ``default`` whatever happens."""

    def restore() -> None:
        rabbitmqctl("eval", f"application:set_env(rabbit, {name}, {default}).")

    atexit.register(restore)
    rabbitmqctl("eval", f"application:set_env(rabbit, {name}, {value}).")
    try:
        yield
    finally:
        restore()


@contextmanager
def policy(queue: str, definition: str) -> Iterator[None]:
    """A policy on ``queue`` alone (as an operator would set a length limit)."""
    name = f"aw-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("set_policy", name, f"^{queue}$", definition, "--apply-to", "queues")
    try:
        yield
    finally:
        rabbitmqctl("clear_policy", name)


async def test_a_delayed_job_is_kept_while_its_queue_refuses_it_and_arrives_later(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    # At-least-once dead-lettering retries a refused message after this long (3 minutes
    # by default): 1 s keeps the test short. Read when the delay queue is created.
    with (
        rabbit_env("dead_letter_worker_publisher_confirm_timeout", "1000", "180000"),
        policy(queue, '{"max-length": 1, "overflow": "reject-publish"}'),
    ):
        await broker.publish(queue, [b"filler"])  # the queue is full
        await broker.publish(queue, [b"later"], delay=0.2)
        await asyncio.sleep(0.6)  # the delay ends while the queue refuses it
        (filler,) = await fetch_n(broker, queue, 1, within=2)
        await broker.ack([filler])
        # Before: a classic delay queue dead-lettered it at most once: it was dropped.
        got = await fetch_n(broker, queue, 1, within=5)
        assert [d.body for d in got] == [b"later"]
        await broker.ack(got)


async def test_older_classic_delay_queues_are_left_alone_and_still_deliver(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    old = f"{queue}.delay.300"  # as an older version declared it
    conn = await aiormq.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        arguments = {
            "x-message-ttl": 300,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
            "x-expires": 600_300,
        }
        await channel.queue_declare(old, durable=True, arguments=arguments)
        await channel.basic_publish(b"old", routing_key=old)
    finally:
        await conn.close()
    broker.known_queues.add(old)
    await broker.publish(queue, [b"new"], delay=0.3)  # no PRECONDITION_FAILED
    assert f"{queue}.delay.300.quorum" in broker.known_queues
    got = await fetch_n(broker, queue, 2, within=3)
    assert sorted(d.body for d in got) == [b"new", b"old"]
    await broker.ack(got)


async def test_delay_queues_classic_keeps_the_classic_delay_queues(make: Make, queue: str) -> None:
    broker = make("delay_queues=classic")
    await broker.publish(queue, [b"x"], delay=0.3)
    assert f"{queue}.delay.300" in broker.known_queues
    (d,) = await fetch_n(broker, queue, 1, within=3)
    await broker.ack([d])
    with pytest.raises(ConfigError, match="delay_queues"):
        AmqpBroker(f"{AMQP_URL}?delay_queues=lazy")


async def test_before_rabbitmq_3_10_delays_fall_back_to_classic_with_a_warning(
    make: Make, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker, explicit = make(), make("delay_queues=quorum")
    for b in (broker, explicit):
        # As an older server reports itself (quorum queues then have no message TTL).
        (await b._connection()).server_properties["version"] = "3.9.29"
    await broker.publish(queue, [b"x"], delay=0.3)
    assert f"{queue}.delay.300" in broker.known_queues
    assert "older than 3.10" in caplog.text
    (d,) = await fetch_n(broker, queue, 1, within=3)
    await broker.ack([d])
    with pytest.raises(ConfigError, match=r"delay_queues=quorum needs RabbitMQ 3\.10"):
        await explicit.publish(queue, [b"y"], delay=0.3)


# -- resource alarms ------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def lift_alarm() -> None:
    rabbitmqctl("set_vm_memory_high_watermark", "0.4")  # this server's configured value


@contextmanager
def memory_alarm() -> Iterator[None]:
    """RabbitMQ's memory alarm, set at once: every connection that publishes is blocked
    (RabbitMQ stops reading it) until the alarm is lifted. The server is shared with other
    tests: keep it short, and lift it whatever happens (a blocking call in ``finally``
    and at exit, so it runs even if the event loop is torn down by a timeout)."""
    atexit.register(lift_alarm)
    rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        yield
    finally:
        lift_alarm()


async def ready_messages(queue: str) -> int:
    """Ready messages, asked on a fresh connection that never publishes (so an alarm
    does not block it)."""
    conn = await aiormq.connect(AMQP_URL)
    try:
        ok = await (await conn.channel()).queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await conn.close()


async def test_under_a_memory_alarm_acks_land_publish_times_out_and_close_is_bounded(
    make: Make, queue: str
) -> None:
    broker = make("prefetch=10&publish_timeout=1")
    await broker.publish(queue, [b"a", b"b", b"c"])
    got = await fetch_n(broker, queue, 3, within=3)
    with memory_alarm():
        start = time.monotonic()
        # Before: one connection for everything, publishes without a deadline: hung here.
        with pytest.raises(BrokerUnavailable, match="timed out"):
            async with asyncio.timeout(10):
                await broker.publish(queue, [b"blocked"])
        assert time.monotonic() - start < 1.5  # its own timeout, not once per retry
        # Acks and nacks go on a connection that never publishes: not blocked.
        assert await broker.ack(got[:2]) == []
        async with asyncio.timeout(3):
            await broker.release(got[2:])  # the copy can't be published: nacked back
        async with asyncio.timeout(8):
            await broker.aclose()
        # Seen while publishers are still blocked: the acks were taken, the release too.
        assert await ready_messages(queue) == 1


async def test_a_worker_under_a_memory_alarm_acks_and_stops_within_grace(queue: str) -> None:
    ensure(RABBITMQ)
    app = aioworkers.App(f"{AMQP_URL}?prefetch=4&publish_timeout=1", queue=queue, grace=5)
    broker = app.broker
    assert isinstance(broker, AmqpBroker)
    running, finish = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @app.task
    async def hold(n: int) -> None:
        runs.append(n)
        running.set()
        await finish.wait()

    try:
        for n in range(4):
            await hold.enqueue(n)
        worker = app.worker(concurrency=1, poll=0.2)
        run = asyncio.create_task(worker.run())
        async with asyncio.timeout(10):
            await running.wait()  # one runs, three wait in the consumer's prefetch
        with memory_alarm():
            worker.stop()  # hands the prefetch back: its publish is blocked
            await asyncio.sleep(0.2)
            finish.set()  # the running job ends and is acked while publishers are blocked
            start = time.monotonic()
            async with asyncio.timeout(15):  # before: hung (the hand-back never returned)
                await run
            assert time.monotonic() - start < 5 + 3  # grace + a bound
            async with asyncio.timeout(8):
                await app.aclose()
            assert runs == [0]
            assert await ready_messages(queue) == 3  # job 0 acked, the rest handed back
    finally:
        await app.aclose()
        await delete_amqp_queues(broker.known_queues)


# -- client errors mapped at the I/O boundary -----------------------------------------------


async def test_a_refused_login_is_a_config_error_that_names_no_password(make: Make) -> None:
    broker = AmqpBroker("amqp://guest:not-the-secret@127.0.0.1:5672/")
    try:
        # Before: BrokerUnavailable, retried forever with a warning.
        with pytest.raises(ConfigError, match="check the user and password") as info:
            await broker.publish(f"amqp-faults-{uuid.uuid4().hex}", [b"x"])
        assert "not-the-secret" not in str(info.value)
    finally:
        await broker.aclose()


async def test_a_user_without_permissions_gets_a_config_error_at_declaration(
    make: Make, queue: str
) -> None:
    user = f"aw-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", user, "pw")
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
        broker = AmqpBroker(f"amqp://{user}:pw@127.0.0.1:5672/")
        try:
            with pytest.raises(ConfigError, match="set_permissions"):
                await broker.fetch(queue, max_messages=1, wait=0)
            with pytest.raises(ConfigError, match="ACCESS_REFUSED"):
                await broker.publish(queue, [b"x"])
        finally:
            await broker.aclose()
    finally:
        rabbitmqctl("delete_user", user)


async def test_an_unknown_vhost_is_transient_and_says_what_to_check(make: Make) -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    try:
        # Transient: the same refusal comes from a connection limit.
        with pytest.raises(BrokerUnavailable, match="refused to open the vhost"):
            await broker.depth("anything")
    finally:
        await broker.aclose()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A TLS listener with a self-signed certificate (no AMQP behind it); its port."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        [*openssl, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stop = threading.Event()

        def serve() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                    pass  # the client refuses the certificate during the handshake

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(5)


async def test_an_untrusted_tls_certificate_is_a_config_error(tls_server: int) -> None:
    broker = AmqpBroker(f"amqps://guest:guest@127.0.0.1:{tls_server}/")
    try:
        with pytest.raises(ConfigError, match="TLS certificate is not trusted"):
            await broker.publish("anything", [b"x"])
    finally:
        await broker.aclose()
