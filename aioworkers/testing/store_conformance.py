"""The state store conformance suite: what every `aioworkers.store.Store` must do, as
pytest tests.

Subclass `StoreConformance` in a test module, under a name pytest collects (``Test...``),
and give it ``store_case``: an async context manager that yields a `StoreCase` with your
store and its timings (and cleans up after). Every check then runs as a test method::

    class TestMyStore(StoreConformance):
        @asynccontextmanager
        async def store_case(self) -> AsyncIterator[StoreCase]:
            store = MyStore("my://localhost")
            try:
                yield StoreCase(store, ttl=0.3, slack=0.2, url="my://localhost")
            finally:
                await store.aclose()

Each check uses names of its own (a uuid in every key), so runs against a shared server
don't interfere. The checks that need other clients (a waiter on a second client, races
across processes) open the store again from ``StoreCase.url`` with
``aioworkers.store.open_store``; without a URL they are skipped. Each test runs its own
event loop, so no async pytest plugin is needed.

This module imports pytest; ``aioworkers.testing`` does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from . import _store_checks_jobs, _store_checks_keys, _store_checks_workers, _store_processes
from ._store_exercise import STORE_CHECKS, StoreCase, StoreCheck, StoreExercise

__all__ = ["STORE_CHECKS", "StoreCase", "StoreCheck", "StoreConformance", "StoreExercise"]

# The checks register on import; they run in this order of their modules.
_MODULES = (_store_checks_keys, _store_checks_jobs, _store_checks_workers, _store_processes)


class StoreConformance:
    """The store conformance suite as a base class: override ``store_case``."""

    #: Builds the event loop of each test (e.g. ``uvloop.new_event_loop``); None: asyncio's.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None

    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        """Yield the store under test in a `StoreCase`; close it afterwards."""
        raise NotImplementedError(
            f"{type(self).__name__} must define store_case() "
            "(see aioworkers.testing.store_conformance)"
        )

    def run_check(self, found: StoreCheck) -> None:
        """Run one check on a fresh case, in an event loop of its own."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(self._exercise(found))

    async def _exercise(self, found: StoreCheck) -> None:
        async with self.store_case() as case:
            if found.needs_url and case.url is None:
                pytest.skip(f"{type(case.store).__name__}: no url to open it again")
            with anyio.fail_after(case.timeout):
                await found.run(StoreExercise(case))


def _as_test(found: StoreCheck) -> Callable[[StoreConformance], None]:
    def test(self: StoreConformance) -> None:
        self.run_check(found)

    test.__name__ = test.__qualname__ = f"test_{found.name}"
    test.__doc__ = found.doc
    return test


_ORDER = [module.__name__ for module in _MODULES]
for _found in sorted(STORE_CHECKS, key=lambda c: _ORDER.index(c.run.__module__)):
    setattr(StoreConformance, f"test_{_found.name}", _as_test(_found))
