"""An app whose workers always fail at start (a startup hook raises)."""

from __future__ import annotations

import aioworkers

app = aioworkers.App("memory://")


@app.on_startup
async def boom() -> None:
    raise RuntimeError("cannot start: the database is gone")
