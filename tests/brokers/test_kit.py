"""The broker toolkit (`aioworkers.brokers._kit`), the capabilities every broker declares,
and the one source of truth for the lease."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioworkers import App, Broker, BrokerUnavailable, ConfigError, Delivery
from aioworkers.brokers import (
    ConfiguredLease,
    DeadLetterAdmin,
    DeadLetterPages,
    DeadLetterWriter,
    FileBacked,
    MessagingSystem,
    QueueNaming,
    Totals,
)
from aioworkers.brokers._kit import (
    DueTimers,
    LeaseTable,
    by_queue,
    chunks,
    map_exceptions,
    retry_batch,
)
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock


class ClientError(Exception):
    pass


class Refused(ClientError):
    pass


class NotOurs(ClientError):
    pass


def _refused(exc: BaseException) -> BaseException:
    return ConfigError(f"fix it: {exc}")


def _not_ours(exc: BaseException) -> BaseException | None:
    return None  # not a client error after all: raised as it is


TABLE = map_exceptions(
    {Refused: _refused, NotOurs: _not_ours, ClientError: BrokerUnavailable, OSError: _refused}
)


def test_the_first_matching_entry_maps_and_the_original_is_the_cause() -> None:
    with pytest.raises(ConfigError, match="fix it: no") as info, TABLE:
        raise Refused("no")
    assert isinstance(info.value.__cause__, Refused)
    # A subclass listed before its base wins over the base's entry.
    with pytest.raises(BrokerUnavailable, match="down") as unavailable, TABLE:
        raise ClientError("down")
    assert isinstance(unavailable.value.__cause__, ClientError)


def test_an_entry_may_decline_and_unlisted_errors_pass_unchanged() -> None:
    with pytest.raises(NotOurs), TABLE:
        raise NotOurs("a bug")
    with pytest.raises(KeyError), TABLE:
        raise KeyError("not a client error")


async def test_the_same_table_maps_in_async_with_and_never_maps_a_cancellation() -> None:
    with pytest.raises(ConfigError):
        async with TABLE:
            raise ConnectionResetError("reset")  # an OSError

    async def cancelled() -> None:
        async with TABLE:
            await asyncio.sleep(10)

    task = asyncio.ensure_future(cancelled())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Nothing raised: nothing mapped, and the table holds no state between uses.
    with TABLE:
        pass
    assert TABLE.mapped(ValueError("x")) is None


def test_by_queue_keeps_order_and_chunks_cut_evenly() -> None:
    a1, b1, a2 = Delivery("a", "1", b""), Delivery("b", "2", b""), Delivery("a", "3", b"")
    assert by_queue([a1, b1, a2]) == {"a": [a1, a2], "b": [b1]}
    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_lease_table_holds_extends_settles_and_collects_expired_in_order() -> None:
    clock = Clock()
    table: LeaseTable[str] = LeaseTable(clock)
    assert table.add("a", 2.0) == 102.0
    table.add("b", 1.0)
    table.add("c", 5.0)
    assert table.extend("b", 3.0)  # now until 103
    assert not table.extend("nobody", 3.0)
    assert table.settle("c")
    assert not table.settle("c")
    assert table.owns("a")
    assert not table.owns("c")
    clock.now = 102.5
    assert table.expired() == ["a"]  # b's first deadline (101) was replaced by the extend
    assert not table.owns("a")
    assert table.owns("b")
    assert table.expired(now=103.0) == ["b"]
    assert len(table) == 0
    assert table.expired(now=1e9) == []


def test_lease_table_stays_small_when_leases_are_extended_many_times() -> None:
    clock = Clock()
    table: LeaseTable[int] = LeaseTable(clock)
    table.add(1, 1.0)
    for _ in range(10_000):
        clock.now += 0.5
        table.extend(1, 1.0)
        table.expired()
    assert len(table._heap) < 100
    assert table.owns(1)


async def test_retry_batch_sends_what_failed_again_then_gives_up() -> None:
    calls: list[list[int]] = []

    async def flaky(entries: list[int]) -> list[int]:
        calls.append(entries)
        return [e for e in entries if e % 2 and len(calls) < 3]  # odd ones fail twice

    clock = FakeClock()
    sending = asyncio.ensure_future(retry_batch(flaky, [1, 2, 3, 4], what="send", clock=clock))
    await clock.wait_for_sleepers(1)
    await clock.advance(10.0)  # the pauses (one after each failed call) are on the clock
    await sending
    assert calls == [[1, 2, 3, 4], [1, 3], [1, 3]]

    async def down(entries: list[int]) -> list[int]:
        return entries

    failing = asyncio.ensure_future(retry_batch(down, [1, 2], what="send", attempts=3, clock=clock))
    await clock.wait_for_sleepers(1)
    await clock.advance(10.0)
    with pytest.raises(BrokerUnavailable, match="send: 2 of 2 entries failed"):
        await failing


# -- capabilities -------------------------------------------------------------------------


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="aioworkers-kit-") as path:
        yield path


def brokers(directory: str) -> dict[str, Broker]:
    """One of each broker, built without connecting (nothing here talks to a server)."""
    from aioworkers.brokers.amqp import AmqpBroker
    from aioworkers.brokers.redis import RedisBroker
    from aioworkers.brokers.sqlite import SqliteBroker
    from aioworkers.brokers.sqs import SqsBroker

    return {
        "memory": MemoryBroker(),
        "redis": RedisBroker("redis://127.0.0.1:6379/0"),
        "rabbitmq": AmqpBroker("amqp://guest:guest@127.0.0.1:5672/"),
        "aws_sqs": SqsBroker("sqs://?region=eu-west-1"),
        "sqlite": SqliteBroker(f"sqlite:///{directory}/jobs.db"),
    }


def test_capabilities_are_found_with_isinstance(directory: str) -> None:
    found = {
        system: {
            cap.__name__
            for cap in (
                DeadLetterAdmin,
                DeadLetterPages,
                Totals,
                DeadLetterWriter,
                QueueNaming,
                MessagingSystem,
                FileBacked,
                ConfiguredLease,
            )
            if isinstance(broker, cap)
        }
        for system, broker in brokers(directory).items()
    }
    everyone = {"Broker", "DeadLetterAdmin", "MessagingSystem", "ConfiguredLease"}
    assert found == {
        # A DeadLetterWriter can dead-letter a message it never delivered (HTTP push, Lambda).
        # DeadLetterPages: a cursor into the DLQ (RabbitMQ and SQS list from the front only).
        "memory": everyone - {"Broker"} | {"DeadLetterWriter", "DeadLetterPages"},
        "redis": everyone - {"Broker"} | {"Totals", "DeadLetterWriter", "DeadLetterPages"},
        "rabbitmq": everyone - {"Broker"},
        "aws_sqs": everyone - {"Broker"} | {"DeadLetterWriter", "QueueNaming"},
        "sqlite": everyone - {"Broker"}
        | {"Totals", "FileBacked", "DeadLetterWriter", "DeadLetterPages"},
    }
    for system, broker in brokers(directory).items():
        assert isinstance(broker, Broker)
        assert isinstance(broker, MessagingSystem)
        assert broker.messaging_system == system


def test_a_sqlite_broker_instance_shares_its_file_with_the_idempotency_store(
    directory: str,
) -> None:
    from aioworkers.brokers.sqlite import SqliteBroker

    broker = SqliteBroker(f"sqlite:///{directory}/jobs.db")
    assert isinstance(broker, FileBacked)
    assert broker.path == Path(directory) / "jobs.db"
    store = App(broker).idempotency
    assert getattr(store, "path", None) == f"{directory}/jobs.db"


def test_a_broker_without_dead_letter_admin_has_no_dlq() -> None:
    class Minimal:
        """A third-party broker with only the core protocol (dead letters not listable)."""

        def __getattr__(self, name: str) -> object:
            if name in ("dead_letters", "remove_dead_letters") or name.startswith("__"):
                raise AttributeError(name)
            return getattr(MemoryBroker(), name)

    app = App(MemoryBroker())
    assert app.dlq().queue == "default"
    bare = App(Minimal())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot list or remove dead letters"):
        bare.dlq()


# -- one source of truth for the lease ---------------------------------------------------


def test_a_broker_built_with_another_lease_than_the_apps_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"visibility_timeout=5 but the App has .*=30"):
        App(MemoryBroker(visibility_timeout=5))
    with pytest.raises(ConfigError, match="set it on the App only"):
        App(MemoryBroker(visibility_timeout=30), visibility_timeout=10)
    # Built with none (the runtime passes the App's on every call), or with the same one.
    App(MemoryBroker(), visibility_timeout=10)
    App(MemoryBroker(visibility_timeout=10), visibility_timeout=10)
    # A URL: the App builds its broker with its own.
    assert App("memory://", visibility_timeout=7).broker.visibility_timeout == 7  # type: ignore[attr-defined]


def test_the_cli_tells_brokers_apart_by_capability_not_by_url(directory: str) -> None:
    from aioworkers.brokers.sqlite import SqliteBroker
    from aioworkers.cli import UsageError, _require_queue_file, _require_shared_broker

    # An instance, not a URL: before, only a URL starting with sqlite: or memory: was seen.
    missing = App(SqliteBroker(f"sqlite:///{directory}/missing.db"))
    with pytest.raises(UsageError, match="no queue file at"):
        _require_queue_file(missing)
    with pytest.raises(UsageError, match="lives inside one process"):
        _require_shared_broker(App(MemoryBroker()), "enqueue")
    _require_shared_broker(missing, "enqueue")  # a shared broker


# -- DueTimers --------------------------------------------------------------------------------


async def test_due_timers_call_at_each_eta_once_per_grain_and_stop_at_close() -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[str, float]] = []
    both = asyncio.Event()

    async def due(queue: str) -> None:
        calls.append((queue, loop.time()))
        if len(calls) == 2:
            both.set()

    timers = DueTimers(due, grain=0.05)
    start = loop.time()
    timers.after("a", 0.1)
    timers.after("a", 0.1)  # the same grain: one call
    timers.after("b", 0.2)
    timers.after("a", 30.0)  # cancelled by aclose
    await asyncio.wait_for(both.wait(), 5)
    await timers.aclose()
    assert [queue for queue, _ in calls] == ["a", "b"]
    # Never before the eta (the job would not be due yet): a real timer is under test.
    assert calls[0][1] - start >= 0.1 - 0.001
    assert calls[1][1] - start >= 0.2 - 0.001
    assert timers._timers == {}  # the 30 s one was cancelled


async def test_due_timers_log_a_failed_call_and_keep_no_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failed = asyncio.Event()

    async def due(queue: str) -> None:
        failed.set()
        raise BrokerUnavailable("down")

    timers = DueTimers(due, grain=0.01)
    with caplog.at_level("DEBUG", logger="aioworkers"):
        timers.after("q", 0.0)
        await asyncio.wait_for(failed.wait(), 5)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert "could not move due jobs of 'q' now: down" in caplog.text
    assert not timers._tasks
    await timers.aclose()
