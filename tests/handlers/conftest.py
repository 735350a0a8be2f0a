"""Fixtures of the runtime tests (a memory broker wrapped to record calls, a fake clock),
shared with the handler tests."""

import asyncio
from collections.abc import Callable

from ..runtime.conftest import app, app_and_broker, clock, clocked, faulty, make_app

__all__ = ["app", "app_and_broker", "clock", "clocked", "eventually", "faulty", "make_app"]


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (real time: a thread is involved) until ``predicate`` holds."""
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not within {within}s")
