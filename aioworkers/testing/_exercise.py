"""What the conformance checks run on: the broker under test with its timings (`BrokerCase`),
helpers that let time pass on a real or a fake clock (`Exercise`), and the check registry.

Nothing here imports pytest: `aioworkers.testing.conformance` does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..brokers.base import Broker, DeadLetter, Delivery, QueueDepth
from .clock import FakeClock

EMPTY = QueueDepth()


@dataclass(frozen=True)
class BrokerCase:
    """The broker under test and the timings the suite may rely on with it.

    ``lease``: the lease the suite asks for in every ``fetch`` and ``extend``, seconds.
    ``delay``: a short publish/retry delay the broker honours.
    ``slack``: how late the broker may make a message visible (timers, polling, skew).
    ``clock``: the `FakeClock` the broker keeps its time on, if any: the suite then moves
    it instead of sleeping, so ``lease`` and ``delay`` may be long (30 s, 5 s) at no cost.
    Without one, time is real: keep ``lease`` and ``delay`` short.
    ``timeout``: real seconds one check may take before it fails.
    """

    broker: Broker
    lease: float = 0.5
    delay: float = 0.3
    slack: float = 0.5
    clock: FakeClock | None = None
    name: str = ""
    queue_prefix: str = "conformance-"
    timeout: float = 60.0

    def queue(self) -> str:
        """A queue name no other check uses."""
        return f"{self.queue_prefix}{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Check:
    """One conformance check: a coroutine function of an `Exercise`, and the capability
    protocols the broker must implement for it to run (else it is skipped)."""

    name: str
    run: Callable[[Exercise], Awaitable[None]]
    needs: tuple[type, ...]
    doc: str


CHECKS: list[Check] = []


def check(*needs: type) -> Callable[[Callable[[Exercise], Awaitable[None]]], Check]:
    """Register a check; its name is the function's without a ``check_`` prefix."""

    def register(run: Callable[[Exercise], Awaitable[None]]) -> Check:
        name = run.__name__.removeprefix("check_")
        found = Check(name, run, needs, run.__doc__ or "")
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"two conformance checks named {name!r}")
        CHECKS.append(found)
        return found

    return register


def letter(job_id: str = "job-1", reason: str = "max_retries", attempts: int = 4) -> DeadLetter:
    """A dead letter as the runtime writes it."""
    return DeadLetter(
        id=job_id,
        task="send_email",
        reason=reason,
        error="ValueError: boom",
        attempts=attempts,
        error_type="ValueError",
        traceback="Traceback (most recent call last):\nValueError: boom\n",
    )


def bodies(deliveries: Sequence[Delivery]) -> list[bytes]:
    """The bodies, sorted: the protocol does not promise FIFO order."""
    return sorted(d.body for d in deliveries)


class Exercise:
    """One check's view of the case: a fresh queue, and calls that let time pass.

    On a real clock, waiting is real (``fetch`` with ``wait``, sleeps). On a `FakeClock`,
    every fetch is made with ``wait=0`` and the clock is moved in steps of ``lease / 20``
    between them, so no check depends on which clock the broker measures ``wait`` on.
    """

    def __init__(self, case: BrokerCase) -> None:
        self.case = case
        self.broker = case.broker
        self.lease = case.lease
        self.delay = case.delay
        self.slack = case.slack
        self.clock = case.clock
        self.queue = case.queue()

    def now(self) -> float:
        """Monotonic seconds on the broker's clock."""
        return self.clock.monotonic() if self.clock else time.monotonic()

    def wall_times(self) -> list[float]:
        """Wall-clock seconds now: real, and the fake clock's if there is one (a broker on
        a fake clock may stamp either)."""
        return [time.time(), *([self.clock.time()] if self.clock else [])]

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass on the broker's clock."""
        if self.clock:
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    @asynccontextmanager
    async def time_flows(self) -> AsyncIterator[None]:
        """While inside, a fake clock moves about as fast as real time (for code that
        sleeps on either clock, such as a worker); no-op on a real clock."""
        clock = self.clock
        if clock is None:
            yield
            return

        async def flow() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                await clock.advance(now - last)
                last = now

        task = asyncio.create_task(flow())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        """One ``fetch`` (with the case's lease unless told); checks it returns at most
        ``max_messages``."""
        got = await self.broker.fetch(
            queue, max_messages=max_messages, wait=wait, lease=lease or self.lease
        )
        assert len(got) <= max_messages, f"asked for {max_messages}, got {len(got)}"
        return got

    async def fetch_within(
        self, queue: str, *, within: float, max_messages: int = 10, lease: float | None = None
    ) -> list[Delivery]:
        """The first non-empty batch that becomes visible within ``within`` seconds of the
        broker's clock, or ``[]``."""
        deadline = self.now() + within
        step = self.lease / 20
        while True:
            remaining = deadline - self.now()
            wait = 0.0 if self.clock else max(0.0, min(remaining, 1.0))
            batch = await self.fetch(queue, max_messages=max_messages, wait=wait, lease=lease)
            if batch or remaining <= 0:
                return batch
            if self.clock:
                await self.clock.advance(min(step, remaining))

    async def fetch_n(
        self,
        queue: str,
        n: int,
        *,
        within: float,
        max_messages: int = 10,
        lease: float | None = None,
    ) -> list[Delivery]:
        """Fetch until ``n`` deliveries arrived or ``within`` seconds passed (a broker may
        hand out fewer than are ready in one call); never asks for more than ``n`` in all."""
        got: list[Delivery] = []
        deadline = self.now() + within
        while len(got) < n:
            remaining = deadline - self.now()
            want = min(max_messages, n - len(got))
            got += await self.fetch_within(
                queue, within=max(remaining, 0), max_messages=want, lease=lease
            )
            if remaining <= 0:
                break
        return got

    async def drain(self, queue: str, *, duration: float) -> list[Delivery]:
        """Fetch and ack everything that becomes visible within ``duration`` seconds."""
        got: list[Delivery] = []
        deadline = self.now() + duration
        while (remaining := deadline - self.now()) > 0:
            batch = await self.fetch_within(queue, within=min(remaining, 0.5 * self.lease))
            if batch:
                await self.broker.ack(batch)
                got += batch
        return got

    async def wait_depth(self, queue: str, expected: QueueDepth, *, within: float = 2.0) -> None:
        """Assert that ``depth`` reaches ``expected`` within ``within`` real seconds (some
        brokers report depth approximately and late); fails with the last value seen."""
        deadline = time.monotonic() + within
        while True:
            depth = await self.broker.depth(queue)
            if depth == expected or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        assert depth == expected, f"depth {depth}, expected {expected}"
