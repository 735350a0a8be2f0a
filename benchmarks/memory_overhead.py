"""W0 on the memory broker: the framework's own per-job cost, as a ratio to a raw loop.

    python benchmarks/memory_overhead.py [--jobs 20000] [--concurrency 100]

Both sides use the same MemoryBroker, no-op jobs counted in-process. The raw loop fetches
up to the free capacity, runs one task per message and acks in a batch per fetch, the
shape the worker has; the ratio (worker / raw jobs per second) is the number to watch.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

import aioworkers
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.envelope import Envelope, encode, new_id, now_ms


def bodies(n: int) -> list[bytes]:
    now = now_ms()
    return [encode(Envelope(new_id(), "noop", [i], {}, enqueued_at=now)) for i in range(n)]


async def raw_loop(n: int, concurrency: int) -> float:
    broker = MemoryBroker()
    await broker.publish("q", bodies(n))
    done = 0

    async def handle(body: bytes) -> None:
        nonlocal done
        orjson.loads(body)
        done += 1

    start = time.perf_counter()
    while done < n:
        got = await broker.fetch("q", max_messages=concurrency, wait=0.1)
        await asyncio.gather(*(handle(d.body) for d in got))
        await broker.ack(got)
    return n / (time.perf_counter() - start)


async def framework(n: int, concurrency: int) -> float:
    app = aioworkers.App(MemoryBroker(), queue="q")
    done = 0

    @app.task
    async def noop(i: int) -> None:
        nonlocal done
        done += 1

    await app.broker.publish("q", bodies(n))
    start = time.perf_counter()
    await app.worker(concurrency=concurrency).run(burst=True)
    elapsed = time.perf_counter() - start
    assert done == n, (done, n)
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    raw = await raw_loop(args.jobs, args.concurrency)
    ours = await framework(args.jobs, args.concurrency)
    print(f"raw memory loop: {raw:,.0f} jobs/s")
    print(f"aioworkers:      {ours:,.0f} jobs/s")
    print(f"ratio:           {ours / raw:.2f}")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
