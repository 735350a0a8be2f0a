"""The broker conformance suite (`aioworkers.testing.conformance`) on every broker of the
package: the memory broker twice (on a real clock and on a `FakeClock`), then Redis,
RabbitMQ, SQS (moto) and SQLite; their cases are in ``conftest.py``. At the end, tests of
the kit itself: it fails a faulty broker, and skips what a broker does not offer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from aioworkers import Broker, Delivery
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock
from aioworkers.testing.conformance import CHECKS, BrokerCase, BrokerConformance, Check

from .conftest import (
    amqp_case,
    memory_case,
    memory_fake_clock_case,
    redis_case,
    sqlite_case,
    sqs_case,
)


class TestMemory(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return memory_case()


class TestMemoryFakeClock(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return memory_fake_clock_case()


class TestRedis(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return redis_case()


class TestAmqp(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return amqp_case()


class TestSqs(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return sqs_case()


class TestSqlite(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return sqlite_case()


# -- the kit itself ---------------------------------------------------------------------------


def test_the_kit_imports_without_pytest() -> None:
    code = "import sys, aioworkers.testing; assert 'pytest' not in sys.modules, 'pytest'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


class _LeaseIgnoringBroker(MemoryBroker):
    """Leases everything for the length it was built with, whatever a call asks: the
    fault Redis's `extend` had."""

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float
    ) -> list[Delivery]:
        return await super().fetch(queue, max_messages=max_messages, wait=wait, lease=LEASE)

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        return await super().extend(deliveries, lease=LEASE)


class _CoreOnly:
    """The Broker protocol of a `MemoryBroker` and nothing else: no capability."""

    def __init__(self, inner: MemoryBroker) -> None:
        self.publish = inner.publish
        self.fetch = inner.fetch
        self.stop_fetching = inner.stop_fetching
        self.ack = inner.ack
        self.retry = inner.retry
        self.release = inner.release
        self.extend = inner.extend
        self.dead_letter = inner.dead_letter
        self.depth = inner.depth
        self.aclose = inner.aclose


LEASE = 30.0


def _kit(make: Callable[[FakeClock], Broker]) -> BrokerConformance:
    @asynccontextmanager
    async def case() -> AsyncIterator[BrokerCase]:
        clock = FakeClock()
        broker = make(clock)
        try:
            yield BrokerCase(broker, lease=LEASE, delay=5.0, slack=0.0, clock=clock)
        finally:
            await broker.aclose()

    class Kit(BrokerConformance):
        def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
            return case()

    return Kit()


def _check(name: str) -> Check:
    (found,) = [c for c in CHECKS if c.name == name]
    return found


@pytest.mark.parametrize(
    "name",
    [
        "the_lease_given_to_fetch_is_honoured",
        "extend_keeps_the_lease_past_the_visibility_timeout",
        "extend_sets_the_lease_from_now_and_it_runs_out",
    ],
)
def test_the_suite_fails_a_broker_that_ignores_the_lease_it_is_given(name: str) -> None:
    kit = _kit(lambda clock: _LeaseIgnoringBroker(visibility_timeout=LEASE, clock=clock))
    with pytest.raises(AssertionError):
        kit.run_check(_check(name))


def test_checks_of_a_missing_capability_are_skipped_and_the_rest_run() -> None:
    kit = _kit(lambda clock: _CoreOnly(MemoryBroker(visibility_timeout=LEASE, clock=clock)))
    for name in ["dead_letters_list_with_limit_and_remove", "app_dlq_replay_all"]:
        with pytest.raises(pytest.skip.Exception, match="_CoreOnly has no DeadLetterAdmin"):
            kit.run_check(_check(name))
    with pytest.raises(pytest.skip.Exception, match="has no Totals"):
        kit.run_check(_check("totals_count_what_was_added_and_what_left"))
    # Checks that read dead letters only where they can still run, without that part.
    kit.run_check(_check("dead_letter_stores_the_entry_and_removes_the_original"))
    kit.run_check(_check("app_dead_letters_undecodable_messages_and_runs_the_rest"))


def test_a_class_without_a_broker_case_says_what_is_missing() -> None:
    class Forgotten(BrokerConformance):
        pass

    with pytest.raises(NotImplementedError, match="Forgotten must define broker_case"):
        Forgotten().run_check(CHECKS[0])
