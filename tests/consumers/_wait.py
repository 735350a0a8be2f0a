"""Waiting on a condition another task or process makes true."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], bool | Awaitable[bool]], seconds: float = 10.0) -> None:
    """Return once ``check()`` is true; fail after ``seconds`` (a bound, not a timing)."""
    for _ in range(int(seconds / 0.02)):
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {seconds}s: {check}")
