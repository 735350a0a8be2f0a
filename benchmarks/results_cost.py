"""What results cost on Redis: W1 (pre-enqueued jobs, one worker, concurrency 100, uvloop)
with and without ``result_ttl``, in one run, sides alternating.

    python benchmarks/results_cost.py [--url redis://127.0.0.1:6379/0] [--jobs 20000]
                                      [--repeat 3]

The worker runs in this process (both sides alike); the clock runs from the worker's start
until the last job's handler has returned and the worker has stopped (a stop drains: every
ack and final record is written). Every
key lives under the prefix ``aiowbench-<pid>-<random>`` and is deleted afterwards. Prints
the median jobs/s of each side and their ratio (the issue's target: >= 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time

import redis.asyncio as aioredis

import aioworkers


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def trial(url: str, jobs: int, *, results: bool) -> float:
    """jobs/s of one trial."""
    prefix = f"aiowbench-{os.getpid()}-{secrets.token_hex(4)}"
    app = aioworkers.App(f"{url}?prefix={prefix}", queue="w1", concurrency=100)
    done = 0
    all_done = asyncio.Event()

    @app.task("incr", result_ttl=600 if results else None)
    async def incr(n: int) -> int:
        nonlocal done
        done += 1
        if done == jobs:
            all_done.set()
        return n

    try:
        handles: list[aioworkers.JobHandle] = []
        for start in range(0, jobs, 1000):
            calls = [incr.call(n) for n in range(start, min(jobs, start + 1000))]
            handles += await app.enqueue_many(calls)
        worker = app.worker(concurrency=100)
        began = time.perf_counter()
        running = asyncio.create_task(worker.run())
        await all_done.wait()
        # A stop drains: every ack (and, with results, every final record) is written.
        worker.stop()
        await running
        elapsed = time.perf_counter() - began
        if results:
            assert await handles[-1].result(timeout=5) == jobs - 1
    finally:
        await app.aclose()
        await delete_prefix(url, prefix)
    return jobs / elapsed


async def main(url: str, jobs: int, repeat: int) -> None:
    rates: dict[bool, list[float]] = {False: [], True: []}
    for n in range(repeat):
        for results in (False, True) if n % 2 == 0 else (True, False):
            rates[results].append(await trial(url, jobs, results=results))
    plain, kept = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"without results: {plain:8.0f} jobs/s  {[round(r) for r in rates[False]]}")
    print(f"with results:    {kept:8.0f} jobs/s  {[round(r) for r in rates[True]]}")
    print(f"ratio: {kept / plain:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(options.url, options.jobs, options.repeat))
