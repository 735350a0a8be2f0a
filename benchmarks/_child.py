"""What a worker subprocess of the harness shares, whichever side it runs.

A child reads its `Spec` (JSON) from argv, builds its side (`_raw.py` or `_aio.py`), runs
it until the workload's target is reached, and prints one ``RESULT {json}`` line. It
prints ``READY`` once consuming, so the parent can start a live producer (W3).

The job bodies live here, in `Work`, so both sides run exactly the same handlers; only
the machinery around them differs. This module imports no part of aioworkers, so the raw
side's RSS is the client's own.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis

T = TypeVar("T")

# Workloads whose completion is counted in-process and written to Redis once at the end.
COUNTED_IN_PROCESS = frozenset({"W0", "W2", "W3"})


@dataclass(frozen=True)
class Spec:
    """One run of one workload on one side."""

    workload: str  # W0, W1, W2, W3 or RSS
    task: str  # the handler the jobs name: w0, w1, w2 or w3
    redis_url: str  # plain URL, for the handlers' own client
    queue: str
    counter: str  # the key the jobs INCR, or the in-process count is written to
    target: int  # stop once this many jobs are done (RSS: processed; others: all)
    concurrency: int
    timeout: float
    stream: str = ""  # raw side: the stream key (amqp, sqs: the queue name) it reads
    raw_url: str = ""  # raw side on amqp: the AMQP URL; on sqs: the SQS endpoint
    broker_url: str = ""  # aioworkers side: the broker URL, with its key prefix
    sleep: float = 0.0  # W2: seconds each job sleeps
    warmup: int = 0  # W3: latency samples with seq below this are dropped
    uvloop: bool = True
    # aioworkers side: "" (plain), off (telemetry disabled), or the OpenTelemetry SDK
    # providers configured: metrics, traces, all
    otel: str = ""
    queues: int = 1  # W4: the worker consumes this many queues (see `queue_names`)

    def queue_names(self) -> list[str]:
        """The aioworkers side's queues: ``queue``, or W4's ``queue-0`` ... ``queue-N``."""
        if self.queues == 1:
            return [self.queue]
        return [f"{self.queue}-{k}" for k in range(self.queues)]

    @classmethod
    def from_argv(cls) -> Spec:
        return cls(**json.loads(sys.argv[1]))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Work:
    """The job bodies of every workload; ``done`` is set when ``target`` jobs are done."""

    def __init__(self, spec: Spec, client: aioredis.Redis) -> None:
        self.client = client
        self.counter = spec.counter
        self.target = spec.target
        self.sleep = spec.sleep
        self.warmup = spec.warmup
        self.count = 0
        self.lags: list[float] = []
        self.done = asyncio.Event()
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
            "w0": self.w0,
            "w1": self.w1,
            "w2": self.w2,
            "w3": self.w3,
            "w5": self.w5,
        }
        self.failed: set[int] = set()  # W5: the jobs whose first attempt failed

    def _one_done(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()

    async def w0(self, i: int) -> None:
        """No-op, counted in-process: what is left is the framework's own cost."""
        self._one_done()

    async def w1(self, i: int) -> None:
        """No-op plus one INCR: the job whose INCR returns the target is the last one."""
        if await self.client.incr(self.counter) == self.target:
            self.done.set()

    async def w2(self, i: int) -> None:
        """I/O-bound: a sleep, counted in-process."""
        await asyncio.sleep(self.sleep)
        self._one_done()

    async def w5(self, i: int) -> None:
        """W1's job, but its first attempt fails (the framework retries it)."""
        if i not in self.failed:
            self.failed.add(i)
            raise RuntimeError("W5: every job's first attempt fails")
        await self.w1(i)

    async def w3(self, sent: float, seq: int) -> None:
        """Latency: start minus enqueue, both wall clock (two processes, one machine)."""
        lag = time.time() - sent
        if seq >= self.warmup:
            self.lags.append(lag)
        self._one_done()


class Side(Protocol):
    """One way of consuming the queue: the raw loop or an aioworkers worker."""

    async def start(self) -> asyncio.Task[None]:
        """Begin consuming in the background; the task ends only on `stop` or failure."""
        ...

    async def stop(self) -> None:
        """Stop fetching, finish the jobs started, settle them, close connections."""
        ...


def latency_ms(lags: list[float]) -> dict[str, float]:
    if len(lags) < 2:
        return {}
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return {
        "p50": cuts[49] * 1000,
        "p99": cuts[98] * 1000,
        "max": max(lags) * 1000,
        "mean": statistics.fmean(lags) * 1000,
        "samples": len(lags),
    }


async def measure(spec: Spec, make_side: Callable[[Spec, Work], Side]) -> dict[str, Any]:
    client = aioredis.from_url(spec.redis_url)
    work = Work(spec, client)
    side = make_side(spec, work)
    error = None
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    consuming = await side.start()
    print("READY", flush=True)
    finished = asyncio.ensure_future(work.done.wait())
    await asyncio.wait({finished, consuming}, timeout=spec.timeout, return_when="FIRST_COMPLETED")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if not finished.done():
        finished.cancel()
        if consuming.done() and consuming.exception() is not None:
            error = f"consumer failed: {consuming.exception()!r}"
        else:
            error = f"timed out after {spec.timeout:.0f}s with {work.count} jobs done"
    await side.stop()
    if spec.workload in COUNTED_IN_PROCESS:
        await client.set(spec.counter, work.count)
    await client.aclose()
    return {
        "elapsed": elapsed,
        "cpu": cpu,
        "count": work.count,
        # Linux reports kilobytes: the peak of this process's whole life.
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "latency_ms": latency_ms(work.lags),
        "error": error,
    }


def main(make_side: Callable[[Spec, Work], Side]) -> None:
    spec = Spec.from_argv()
    result = run(measure(spec, make_side), use_uvloop=spec.uvloop)
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(1 if result["error"] else 0)


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool) -> T:
    """Run on uvloop when asked and installed, else on the standard loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
