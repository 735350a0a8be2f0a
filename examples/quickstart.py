"""Quickstart: enqueue jobs, run a worker until the queue is empty, show what happened.

    python examples/quickstart.py

Runs on the embedded default broker: a SQLite file, ./aioworkers.db, no server (see what
is left in it with ``aioworkers stats examples.quickstart:app``). Set
AIOWORKERS_BROKER_URL to run the same code on another broker.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aioworkers

app = aioworkers.App(queue="quickstart", concurrency=50)
sent: list[str] = []


@app.task(retries=3, timeout=5)
async def send_email(to: str, subject: str) -> None:
    await asyncio.sleep(random.uniform(0.01, 0.05))  # the network call
    sent.append(to)


@app.task(retries=2, backoff=0.1)
async def charge_card(card: str, cents: int) -> None:
    job = aioworkers.current_job()
    if card.startswith("0000"):
        raise ValueError(f"card declined (attempt {job.attempt})")


async def main() -> None:
    # The broker's file outlives the process: start each run without the last one's failure
    # (on this example's own queue only).
    purged = await app.dlq().purge()
    if purged:
        print(f"purged {purged} dead letter{'s' if purged > 1 else ''} of an earlier run")
    ids = await app.enqueue_many(
        [send_email.call(f"user{i}@example.com", subject="welcome") for i in range(100)]
    )
    await send_email.options(delay=0.5).enqueue("late@example.com", subject="see you soon")
    await charge_card.enqueue("4242-4242", cents=500)
    bad = await charge_card.enqueue("0000-0000", cents=999)  # fails 3 times -> DLQ
    print(f"enqueued {len(ids) + 3} jobs; stats: {await app.stats()}")

    worker = app.worker()
    await worker.run(burst=True)  # returns once the queue is empty and nothing is running

    print(f"sent {len(sent)} emails; outcomes: {worker.counts}")
    print(f"stats: {await app.stats()}")
    for dead in await app.dlq().list():
        mark = "" if dead.id == bad else " (left by an interrupted earlier run)"
        print(
            f"dead letter {dead.id} {dead.task} after {dead.attempts} attempts: {dead.error}{mark}"
        )
    await app.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    asyncio.run(main())
