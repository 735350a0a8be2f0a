"""An app whose broker comes from AIOWORKERS_BROKER_URL and whose one task is idempotent:
the command line refuses to run it on a broker without a store."""

from __future__ import annotations

import aioworkers

app = aioworkers.App(visibility_timeout=5)


@app.task(idempotent=True)
async def charge(order: str) -> None:
    print("charged", order, flush=True)
