"""An app on the embedded default broker (``./aioworkers.db`` of the working directory)."""

from __future__ import annotations

import aioworkers

app = aioworkers.App()


@app.task(retries=0)
async def greet(name: str) -> None:
    print(f"hello {name}", flush=True)


@app.task(retries=0)
async def boom(n: int) -> None:
    print(f"boom {n}", flush=True)
    raise ValueError(f"boom {n}")
