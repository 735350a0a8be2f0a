"""A periodic app for the process tests: ``tick`` fires every PERIODIC_EVERY seconds and
appends its job id, slot and pid to the file PERIODIC_LEDGER (one line each: appends of a
short line are atomic, so several processes share the file)."""

from __future__ import annotations

import os

import aioworkers

app = aioworkers.App(
    os.environ["PERIODIC_BROKER"],
    store=os.environ.get("PERIODIC_STORE"),  # RabbitMQ has none of its own
    queue=os.environ.get("PERIODIC_QUEUE", "periodic"),
    visibility_timeout=3.0,
    grace=2.0,
)
LEDGER = os.environ["PERIODIC_LEDGER"]


def _write(line: str) -> None:
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.periodic(
    every=float(os.environ.get("PERIODIC_EVERY", "1")),
    catchup=float(os.environ.get("PERIODIC_CATCHUP", "0")),
    retries=0,
)
async def tick() -> None:
    job = aioworkers.current_job()
    assert job.scheduled_for is not None
    slot = round(job.scheduled_for.timestamp() * 1000)
    _write(f"{job.id} {slot} {os.getpid()}\n")
