"""Queue depths over time, for the charts and the rates: the dashboard polls the broker's
counters (`Broker.depth`, and `Totals` where the broker keeps them) when a page or its
script asks, at most once per `MIN_INTERVAL`, and keeps the last `KEEP` seconds in
memory. Nobody watching: no polling; the chart shows the minutes someone watched."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..brokers.base import Broker, QueueDepth, Totals
from ..errors import AioworkersError, redact

MIN_INTERVAL = 1.0  # seconds between two polls of the broker, however many viewers
KEEP = 600.0  # seconds of history kept
RATE_WINDOW = 10.0  # the rates shown are averaged over about this many seconds
MAX_SAMPLES = int(KEEP / MIN_INTERVAL) + 1


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # epoch seconds
    depth: QueueDepth
    totals: dict[str, int] | None


@dataclass(frozen=True, slots=True)
class Rates:
    """Per second: jobs enqueued and done (None without `Totals`), failed (dead-lettered);
    ``error_rate``: failed / (done + failed), None when nothing finished."""

    enqueued: float | None = None
    done: float | None = None
    failed: float | None = None
    error_rate: float | None = None


def rates(old: Sample, new: Sample) -> Rates:
    dt = new.at - old.at
    if dt <= 0:
        return Rates()
    if new.totals is not None and old.totals is not None:
        dead = max(new.totals["dead"] - old.totals["dead"], 0)
        enqueued: float | None = max(new.totals["added"] - old.totals["added"], 0) / dt
        done: float | None = max(new.totals["left"] - old.totals["left"] - dead, 0) / dt
    else:
        dead = max(new.depth.dead - old.depth.dead, 0)
        enqueued = done = None
    failed = dead / dt
    finished = (done or 0.0) + failed
    error = failed / finished if done is not None and finished > 0 else None
    return Rates(enqueued, done, failed, error)


@dataclass(slots=True)
class QueueNow:
    """One queue as last polled: its depth and rates, or why it could not be read."""

    queue: str
    depth: QueueDepth | None = None
    rates: Rates = field(default_factory=Rates)
    error: str | None = None


class History:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._samples: dict[str, deque[Sample]] = {}
        self._errors: dict[str, str] = {}
        self._polled = 0.0
        self._lock = asyncio.Lock()

    async def poll(self, queues: Sequence[str], *, fresh: bool = False) -> dict[str, QueueNow]:
        """Every queue's latest numbers, polling the broker unless that was just done
        (``fresh``: poll anyway, for a page someone just loaded)."""
        async with self._lock:  # two viewers at once make one poll
            due = fresh or time.monotonic() - self._polled >= MIN_INTERVAL
            missing = any(q not in self._samples and q not in self._errors for q in queues)
            if due or missing:
                self._polled = time.monotonic()
                for queue in queues:
                    await self._poll_one(queue)
        return {q: self.now(q) for q in queues}

    async def _poll_one(self, queue: str) -> None:
        try:
            depth = await self._broker.depth(queue)
            totals = None
            if isinstance(self._broker, Totals):
                totals = await self._broker.totals(queue)
        except (AioworkersError, OSError) as exc:
            self._errors[queue] = redact(f"{type(exc).__name__}: {exc}", 300)
            return
        self._errors.pop(queue, None)
        samples = self._samples.setdefault(queue, deque(maxlen=MAX_SAMPLES))
        sample = Sample(time.time(), depth, totals)
        if samples and sample.at - samples[-1].at < MIN_INTERVAL / 2:
            samples[-1] = sample  # a page load right after a poll: no spike in the rates
        else:
            samples.append(sample)
        while samples and samples[0].at < samples[-1].at - KEEP:
            samples.popleft()

    def now(self, queue: str) -> QueueNow:
        samples = self._samples.get(queue)
        error = self._errors.get(queue)
        if not samples:
            return QueueNow(queue, error=error or "not polled yet")
        newest = samples[-1]
        oldest = next((s for s in samples if s.at >= newest.at - RATE_WINDOW), newest)
        if oldest is newest and len(samples) > 1:
            oldest = samples[-2]
        return QueueNow(queue, newest.depth, rates(oldest, newest), error)

    def series(self, queue: str) -> list[list[float | None]]:
        """``[at, ready, in_flight, delayed, dead, enqueued/s, done/s, failed/s]`` per
        sample, the rates since the sample before."""
        samples = list(self._samples.get(queue, ()))
        points: list[list[float | None]] = []
        for before, sample in zip([None, *samples], samples, strict=False):
            r = rates(before, sample) if before is not None else Rates()
            d = sample.depth
            point: list[float | None] = [round(sample.at, 3), d.ready, d.in_flight, d.delayed]
            point.append(d.dead)
            point += [None if v is None else round(v, 3) for v in (r.enqueued, r.done, r.failed)]
            points.append(point)
        return points
