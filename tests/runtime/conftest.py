"""Shared fixtures for the runtime tests: a broker wrapper that injects faults and records
calls, app factories on the memory broker, a fake clock that the worker and the broker
share, and helpers that wait on conditions (real time) or drive the fake clock to them.

Tests that are about time (leases, backoff, grace, shutdown bounds) run on a
`aioworkers.testing.FakeClock`: `advance_until` moves it in small steps until what the test
waits for happened, so they take no real time and their bounds are exact."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest

from aioworkers import App, Broker, BrokerUnavailable, DeadLetter, Delivery, QueueDepth, Worker
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

# Short enough that lease expiry is quick, long enough that a busy loop never loses a lease.
VISIBILITY = 2.0
# How long a fetch waits: small, so quiet/stop take effect quickly.
POLL = 0.05

BROKER_METHODS = frozenset(
    {
        "publish",
        "fetch",
        "stop_fetching",
        "ack",
        "retry",
        "release",
        "extend",
        "dead_letter",
        "depth",
        "dead_letters",
        "remove_dead_letters",
        "aclose",
    }
)


@dataclass
class BrokerCall:
    """One call made through a `FaultyBroker`; ``error`` is what it raised, if anything."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    error: BaseException | None = None
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None


class FaultyBroker:
    """Wraps any `Broker`, records every call, and injects faults on demand.

    - ``fail_next("ack", 3)``: the next 3 ``ack`` calls raise `BrokerUnavailable` without
      reaching the wrapped broker;
    - ``fail_while("fetch")`` / ``heal("fetch")``: every call raises until healed;
    - ``lose_leases = True``: ``extend`` reports every delivery as lost (and extends none);
    - ``hold("fetch")``: an `asyncio.Event`; calls reach the wrapped broker at once but
      return only once the event is set (a slow reply);
    - ``raise_next("fetch", RuntimeError("..."))``: the next call raises that exception
      (an error no broker should let out, e.g. an unmapped client error) without reaching
      the wrapped broker;
    - ``lose_reply("retry", 1)``: the next call reaches the wrapped broker and takes
      effect, then raises `BrokerUnavailable`, as if its reply was lost (recorded not ok).
    """

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.calls: list[BrokerCall] = []
        self.lose_leases = False
        self._fail_next: Counter[str] = Counter()
        self._failing: set[str] = set()
        self._holds: dict[str, asyncio.Event] = {}
        self._raise_next: dict[str, list[BaseException]] = {}
        self._lose_reply: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<FaultyBroker {self.inner!r}>"

    # -- fault control --------------------------------------------------------------------

    def fail_next(self, method: str, times: int = 1) -> None:
        self._fail_next[_checked(method)] += times

    def fail_while(self, method: str) -> None:
        self._failing.add(_checked(method))

    def heal(self, method: str) -> None:
        self._failing.discard(_checked(method))
        self._fail_next.pop(method, None)

    def hold(self, method: str) -> asyncio.Event:
        gate = self._holds[_checked(method)] = asyncio.Event()
        return gate

    def raise_next(self, method: str, error: BaseException) -> None:
        self._raise_next.setdefault(_checked(method), []).append(error)

    def lose_reply(self, method: str, times: int = 1) -> None:
        self._lose_reply[_checked(method)] += times

    # -- inspection -----------------------------------------------------------------------

    def calls_of(self, method: str, *, ok: bool | None = None) -> list[BrokerCall]:
        _checked(method)
        return [c for c in self.calls if c.method == method and (ok is None or c.ok is ok)]

    def count(self, method: str, *, ok: bool | None = None) -> int:
        return len(self.calls_of(method, ok=ok))

    def settled(self, method: str) -> list[Delivery]:
        """The deliveries passed to successful calls of ``method`` (ack, release, retry,
        dead_letter, extend), batches flattened, in call order."""
        out: list[Delivery] = []
        for call in self.calls_of(method, ok=True):
            first = call.args[0]
            out.extend(first if isinstance(first, list | tuple) else [first])
        return out

    # -- the Broker protocol --------------------------------------------------------------

    async def _call(
        self, method: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        call = BrokerCall(method, args, kwargs)
        self.calls.append(call)
        if method in self._failing or self._fail_next[method] > 0:
            if self._fail_next[method] > 0:
                self._fail_next[method] -= 1
            call.error = BrokerUnavailable(f"injected fault in {method}")
            raise call.error
        if self._raise_next.get(method):
            call.error = self._raise_next[method].pop(0)
            raise call.error
        try:
            call.result = await fn(*args, **kwargs)
        except BaseException as exc:
            call.error = exc
            raise
        if self._lose_reply[method] > 0:
            self._lose_reply[method] -= 1
            call.error = BrokerUnavailable(f"injected lost reply of {method}")
            raise call.error
        gate = self._holds.get(method)
        if gate is not None:
            await gate.wait()
        return call.result

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        await self._call("publish", self.inner.publish, queue, list(bodies), delay=delay)

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float
    ) -> list[Delivery]:
        got: list[Delivery] = await self._call(
            "fetch", self.inner.fetch, queue, max_messages=max_messages, wait=wait, lease=lease
        )
        return got

    async def stop_fetching(self, queue: str) -> None:
        await self._call("stop_fetching", self.inner.stop_fetching, queue)

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost: list[Delivery] = await self._call("ack", self.inner.ack, list(deliveries))
        return lost

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        await self._call("retry", self.inner.retry, delivery, body=body, delay=delay)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await self._call("release", self.inner.release, list(deliveries))

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        if self.lose_leases:

            async def lose_all(ds: list[Delivery], *, lease: float) -> list[Delivery]:
                return list(ds)

            fn: Callable[..., Awaitable[Any]] = lose_all
        else:
            fn = self.inner.extend
        lost: list[Delivery] = await self._call("extend", fn, list(deliveries), lease=lease)
        return lost

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        await self._call("dead_letter", self.inner.dead_letter, delivery, letter)

    async def depth(self, queue: str) -> QueueDepth:
        depth: QueueDepth = await self._call("depth", self.inner.depth, queue)
        return depth

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = await self._call(
            "dead_letters", self.inner.dead_letters, queue, limit=limit
        )
        return letters

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        n: int = await self._call(
            "remove_dead_letters", self.inner.remove_dead_letters, queue, entry_ids
        )
        return n

    async def aclose(self) -> None:
        await self._call("aclose", self.inner.aclose)


def _checked(method: str) -> str:
    if method not in BROKER_METHODS:
        raise ValueError(f"not a Broker method: {method!r}")
    return method


async def advance_until(
    clock: FakeClock,
    predicate: Callable[[], bool],
    *,
    step: float = POLL,
    within: float = 60.0,
    what: str = "condition",
) -> float:
    """Move ``clock`` forward ``step`` at a time until ``predicate`` holds; returns the
    clock's seconds that took. Fails the test after ``within`` seconds of the clock (or 10
    real seconds: something waits on real time that should not)."""
    start = clock.monotonic()
    async with asyncio.timeout(10):
        while not predicate():
            if clock.monotonic() - start > within:
                raise AssertionError(f"{what} did not happen within {within}s of the clock")
            await clock.advance(step)
    return clock.monotonic() - start


@asynccontextmanager
async def running(worker: Worker, clock: FakeClock) -> AsyncIterator[Worker]:
    """``async with worker`` on a fake clock: on exit, stop it and move the clock until
    it has stopped (its fetches, drain and hand-backs wait on that clock)."""
    run = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.wait_started())
    await asyncio.wait({run, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if run.done():
        await run
    try:
        yield worker
    finally:
        worker.stop()
        await advance_until(clock, run.done, what="the worker to stop")
        await run


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` every 5 ms until it holds; fail the test after ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


async def run_burst(
    worker: Worker, *, within: float = 10.0, clock: FakeClock | None = None
) -> None:
    """Run ``worker`` until its queues are empty, failing the test if that takes too long;
    on a fake ``clock`` (the worker's), moving it meanwhile."""
    if clock is None:
        async with asyncio.timeout(within):
            await worker.run(burst=True)
        return
    run = asyncio.create_task(worker.run(burst=True))
    await advance_until(clock, run.done, within=within, what="the burst to end")
    await run


async def stats_eventually(
    app: App, expected: QueueDepth, *, queue: str | None = None, within: float = 5.0
) -> None:
    """Wait until ``app.stats(queue)`` equals ``expected``."""
    deadline = time.monotonic() + within
    while (got := await app.stats(queue)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"stats stayed {got}, expected {expected}")
        await asyncio.sleep(0.005)


class MakeApp(Protocol):
    def __call__(
        self,
        *,
        visibility_timeout: float = VISIBILITY,
        clock: FakeClock | None = None,
        **kwargs: Any,
    ) -> tuple[App, FaultyBroker]: ...


@pytest.fixture
def make_app() -> MakeApp:
    """Build an `App` on a fresh `MemoryBroker` wrapped in a `FaultyBroker`; with a
    ``clock``, the broker's leases, delays and fetch waits run on it (give the worker the
    same one: ``app.worker(clock=clock)``)."""

    def make(
        *,
        visibility_timeout: float = VISIBILITY,
        clock: FakeClock | None = None,
        **kwargs: Any,
    ) -> tuple[App, FaultyBroker]:
        if clock is None:
            inner = MemoryBroker(visibility_timeout=visibility_timeout)
        else:
            inner = MemoryBroker(visibility_timeout=visibility_timeout, clock=clock)
        faulty = FaultyBroker(inner)
        app = App(faulty, visibility_timeout=visibility_timeout, **kwargs)
        return app, faulty

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(make_app: MakeApp, clock: FakeClock) -> tuple[App, FaultyBroker, FakeClock]:
    """An app whose broker runs on ``clock`` (give its workers the same one)."""
    app, faulty = make_app(clock=clock)
    return app, faulty, clock


@pytest.fixture
def app_and_broker(make_app: MakeApp) -> tuple[App, FaultyBroker]:
    return make_app()


@pytest.fixture
def app(app_and_broker: tuple[App, FaultyBroker]) -> App:
    return app_and_broker[0]


@pytest.fixture
def faulty(app_and_broker: tuple[App, FaultyBroker]) -> FaultyBroker:
    return app_and_broker[1]


@pytest.fixture
async def memory_app() -> AsyncIterator[App]:
    """An `App("memory://")`, the way a user makes one."""
    app = App("memory://", visibility_timeout=VISIBILITY)
    async with app:
        yield app
