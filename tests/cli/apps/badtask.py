"""An app whose task registration is wrong: aioworkers raises inside its own code."""

from __future__ import annotations

import aioworkers

app = aioworkers.App("memory://")


@app.task(retries=-1)
async def nap() -> None: ...
