"""The instruments of one MeterProvider, and the counts their callbacks read.

Per job, the hot path makes one SDK call, the duration histogram's ``record``: counts are
plain dict increments read by observable counters, and the lag gauge keeps a running
maximum, because each synchronous instrument call costs the SDK about 10 us.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ..brokers.base import Delivery, QueueDepth
from .conventions import DESTINATION, OPERATION, OUTCOME, SCOPE, STATE, SYSTEM, TASK

DEPTH_STATES = ("ready", "in_flight", "delayed", "dead")
# The semantic conventions' advice for messaging.process.duration.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
LAG_WINDOW = 60.0  # the lag gauge reports the longest wait of the last 1-2 windows


class Holder(Protocol):
    """What the in-flight gauge reads of a running worker's telemetry."""

    @property
    def system(self) -> str: ...

    @property
    def held(self) -> Callable[[], Iterable[Delivery]]: ...

    @property
    def depths(self) -> dict[str, QueueDepth]: ...


class Metrics:
    """The instruments of one MeterProvider, shared by every app and worker using it."""

    _by_provider: dict[int, tuple[metrics.MeterProvider, Metrics]] = {}  # noqa: RUF012

    @classmethod
    def of(cls, provider: metrics.MeterProvider) -> Metrics:
        # Instruments are created once per provider: a second registration of a name
        # would be refused, and the observable gauges read every worker of the process.
        entry = cls._by_provider.get(id(provider))
        if entry is None or entry[0] is not provider:
            entry = cls._by_provider[id(provider)] = (provider, cls(provider))
        return entry[1]

    def __init__(self, provider: metrics.MeterProvider) -> None:
        meter = provider.get_meter(SCOPE)
        self.workers: set[Holder] = set()
        # Per-job counts are plain dict increments, read by observable counters when a
        # reader collects: an SDK counter.add costs several microseconds a call. They
        # live here, per provider, so totals never go down when a worker stops.
        self.settled: Counter[tuple[str, str, str, str]] = Counter()  # system, queue, task, outcome
        self.fetched: Counter[tuple[str, str]] = Counter()  # system, queue
        # The depth last polled by any worker of the process, kept once it stops.
        self.depths: dict[tuple[str, str], QueueDepth] = {}
        self.lags: dict[tuple[str, str], LagWindow] = {}  # system, queue
        self.sent = meter.create_counter(
            "messaging.client.sent.messages", "{message}", "Messages a producer published"
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            [self._observe_fetched],
            "{message}",
            "Messages handed to a worker",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            "s",
            "Time a handler ran, per attempt",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_counter(
            "aioworkers.jobs", [self._observe_settled], "{job}", "Deliveries settled, by outcome"
        )
        meter.create_observable_gauge(
            "aioworkers.queue.lag",
            [self._observe_lag],
            "s",
            "Longest time from enqueue (or eta) to the start of a job's first attempt, over "
            f"the jobs settled in the last {LAG_WINDOW:.0f}-{2 * LAG_WINDOW:.0f} s",
        )
        self.extensions = meter.create_counter(
            "aioworkers.lease.extensions", "{lease}", "Leases extended by the heartbeat"
        )
        self.lost = meter.create_counter(
            "aioworkers.lease.lost", "{lease}", "Leases found lost by the heartbeat"
        )
        meter.create_observable_gauge(
            "aioworkers.jobs.in_flight",
            [self._observe_in_flight],
            "{job}",
            "Deliveries a worker holds (running, or fetched and waiting for a slot)",
        )
        meter.create_observable_gauge(
            "aioworkers.queue.depth",
            [self._observe_depth],
            "{job}",
            "Jobs per queue by state, as last polled from the broker",
        )

    def _observe_settled(self, options: CallbackOptions) -> Iterator[Observation]:
        for (system, queue, task, outcome), n in self.settled.copy().items():
            attrs = {SYSTEM: system, DESTINATION: queue, TASK: task, OUTCOME: outcome}
            yield Observation(n, attrs)

    def _observe_fetched(self, options: CallbackOptions) -> Iterator[Observation]:
        for (system, queue), n in self.fetched.copy().items():
            yield Observation(n, {SYSTEM: system, DESTINATION: queue, OPERATION: "receive"})

    def _observe_lag(self, options: CallbackOptions) -> Iterator[Observation]:
        now = time.time()
        for (system, queue), window in self.lags.copy().items():
            yield Observation(window.longest(now), {SYSTEM: system, DESTINATION: queue})

    def _observe_in_flight(self, options: CallbackOptions) -> Iterator[Observation]:
        held: Counter[tuple[str, str]] = Counter()
        for worker in list(self.workers):
            held.update((worker.system, d.queue) for d in worker.held())
            for queue in worker.depths.copy():
                held[(worker.system, queue)] += 0  # a queue with nothing held reports 0
        for (system, queue), n in held.items():
            yield Observation(n, {SYSTEM: system, DESTINATION: queue})

    def _observe_depth(self, options: CallbackOptions) -> Iterator[Observation]:
        # Copied: a reader may collect from another thread (the /metrics endpoint).
        for (system, queue), depth in self.depths.copy().items():
            for state in DEPTH_STATES:
                attrs = {SYSTEM: system, DESTINATION: queue, STATE: state}
                yield Observation(getattr(depth, state), attrs)


class LagWindow:
    """The longest lag seen in the current window of `LAG_WINDOW` seconds and the one
    before it (windows aligned on the epoch). Only the event loop writes it; readers (the
    gauge's callback, from any reader's thread) only compute, so a reader collecting at
    least once a window sees every maximum, however many readers there are."""

    __slots__ = ("current", "index", "previous")

    def __init__(self) -> None:
        self.index = 0  # the window `current` belongs to
        self.current = 0.0
        self.previous = 0.0  # the window before it

    def add(self, lag: float, now: float) -> None:
        index = int(now // LAG_WINDOW)
        if index != self.index:
            self.previous = self.current if index == self.index + 1 else 0.0
            self.current = 0.0
            self.index = index
        if lag > self.current:
            self.current = lag

    def longest(self, now: float) -> float:
        # Read once each: the loop may roll the window meanwhile.
        index, current, previous = self.index, self.current, self.previous
        behind = int(now // LAG_WINDOW) - index
        if behind <= 0:
            return max(current, previous)
        return current if behind == 1 else 0.0
