"""How soon a waiter sees a result on Redis: a worker process runs jobs with ``result_ttl``
while this process waits on each with ``job.result()``; per job, the latency is the time
the waiter woke minus the job's ``finished_at`` (stamped by the worker just before its
record is written, which is before the ack: an upper bound on "after the ack").

    python benchmarks/result_latency.py [--url redis://127.0.0.1:6379/0] [--jobs 1000]
                                        [--waves 1,10,50]

Jobs go out in waves (of each size in ``--waves``, ``--jobs`` jobs per size): a wave is
enqueued, a waiter starts on each job (all in this process, one event loop), and the next
wave goes once all have woken. Each handler sleeps 20 ms, so the waiters are blocked
before it ends, and the jobs of a wave end together. Every key lives under
``aiowbench-<pid>-<random>`` and is deleted afterwards. Prints p50/p99/max in milliseconds
per wave size, as a Markdown table (the issue's target: p99 < 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import sys
import time

import redis.asyncio as aioredis

import aioworkers

QUEUE = "latency"
SLEEP = 0.02


def make_app(url: str) -> aioworkers.App:
    app = aioworkers.App(url, queue=QUEUE, concurrency=100)

    @app.task("echo", result_ttl=600)
    async def echo(n: int) -> int:
        await asyncio.sleep(SLEEP)
        return n

    return app


async def work(url: str) -> None:
    """The worker process: runs until SIGTERM."""
    app = make_app(url)
    worker = app.worker()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
    try:
        await worker.run()
    finally:
        await app.aclose()


async def wait_one(job: aioworkers.JobHandle) -> float:
    """Milliseconds from the job's finished_at to this waiter waking."""
    await job.result(timeout=30)
    woke = time.time()
    info = await job.info()
    assert info.finished_at is not None
    return (woke - info.finished_at.timestamp()) * 1000


async def measure(url: str, jobs: int, wave: int) -> list[float]:
    app = make_app(url)
    echo = app.tasks["echo"]
    latencies: list[float] = []
    try:
        for start in range(0, jobs, wave):
            handles = await app.enqueue_many([echo.call(n) for n in range(start, start + wave)])
            latencies += await asyncio.gather(*map(wait_one, handles))
    finally:
        await app.aclose()
    return latencies


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(url: str, jobs: int, waves: list[int]) -> None:
    prefix = f"aiowbench-{os.getpid()}-{secrets.token_hex(4)}"
    bench_url = f"{url}?prefix={prefix}"
    worker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", "--url", bench_url
    )
    try:
        await measure(bench_url, max(waves), max(waves))  # warm-up: connections, scripts
        print("| waiters at once | jobs | p50 ms | p99 ms | max ms |\n|--:|--:|--:|--:|--:|")
        for wave in waves:
            ms = await measure(bench_url, jobs, wave)
            p50, p99 = statistics.median(ms), percentile(ms, 0.99)
            print(f"| {wave} | {len(ms)} | {p50:.1f} | {p99:.1f} | {max(ms):.1f} |")
    finally:
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
        await delete_prefix(url, prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--waves", default="1,10,50")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if options.worker:
        asyncio.run(work(options.url))
    else:
        asyncio.run(main(options.url, options.jobs, [int(w) for w in options.waves.split(",")]))
