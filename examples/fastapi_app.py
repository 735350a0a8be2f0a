"""A worker alongside a web app: FastAPI enqueues, a worker on the same event loop runs.

    pip install fastapi uvicorn
    python examples/fastapi_app.py                 # serves on 127.0.0.1:8000 (PORT=...)
    curl -X POST 'localhost:8000/signup?email=a@b.c'   # -> {"job": "..."}
    curl localhost:8000/sent                          # -> {"sent": ["a@b.c"]}

or ``uvicorn fastapi_app:app`` from ``examples/``. The worker starts in the lifespan
and, when the server shuts down (Ctrl-C, SIGTERM), stops fetching and lets the jobs in
flight finish within ``grace`` seconds before the process exits.

The jobs share the web server's event loop, so a handler that blocks the loop (CPU
work, a synchronous client) delays every request. What bounds that:

- ``WORKER_CONCURRENCY`` (default 10): how many jobs run at once beside the requests;
- ``await asyncio.to_thread(...)`` (or a process pool) for blocking work in a handler;
- ``EMBEDDED_WORKER=0``: run no worker here, and run the jobs in dedicated processes
  instead, with their own CPU share: ``nice -n 10 aioworkers run fastapi_app:workers``,
  or a systemd unit with ``CPUWeight=``/``CPUQuota=`` (see ``examples/deploy/``).

On the embedded default broker (a SQLite file, ``./aioworkers.db``) the queue is shared
with whatever runs from the same directory (``aioworkers run fastapi_app:workers``,
``aioworkers stats fastapi_app:workers``); set ``AIOWORKERS_BROKER_URL=redis://...`` to
share it across machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

import aioworkers

workers = aioworkers.App(grace=float(os.environ.get("WORKER_GRACE", "30")))
sent: list[str] = []


@workers.task(retries=3, timeout=30)
async def send_welcome(email: str, seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)  # the mail server
    sent.append(email)
    print(f"welcome sent to {email}", flush=True)


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(workers)  # exited last: closes the broker
        if os.environ.get("EMBEDDED_WORKER", "1") != "0":
            concurrency = int(os.environ.get("WORKER_CONCURRENCY", "10"))
            # A task on this loop; on exit it stops fetching and drains within grace.
            await stack.enter_async_context(workers.worker(concurrency=concurrency))
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/signup")
async def signup(email: str, seconds: float = 0.05) -> dict[str, str]:
    job_id = await send_welcome.enqueue(email, seconds=seconds)
    return {"job": job_id}


@app.get("/sent")
async def list_sent() -> dict[str, list[str]]:
    return {"sent": sent}


@app.get("/stats")
async def stats() -> dict[str, int]:
    depth = await workers.stats()
    return {"ready": depth.ready, "in_flight": depth.in_flight, "delayed": depth.delayed}


if __name__ == "__main__":
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")
