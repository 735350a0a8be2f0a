"""The broker conformance suite: what every `Broker` must do, as pytest tests.

Subclass `BrokerConformance` in a test module, under a name pytest collects
(``Test...``), and give it ``broker_case``: an async context manager that yields a
`BrokerCase` with your broker and its timings (and cleans up after). Every check then
runs as a test method of your class::

    class TestMyBroker(BrokerConformance):
        @asynccontextmanager
        async def broker_case(self) -> AsyncIterator[BrokerCase]:
            broker = MyBroker("my://localhost")
            try:
                yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5)
            finally:
                await broker.aclose()

Each test runs its own event loop (``asyncio.Runner``, with ``loop_factory`` if you set
one), so no async pytest plugin is needed and any configuration of one is fine. Checks
of an optional capability (``DeadLetterAdmin``, ``Totals``, ``MessagingSystem``,
``FileBacked``, ``DeadLetterWriter``) are skipped, saying so, when ``isinstance`` finds
the broker lacks it. Call ``pytest.skip`` in ``broker_case`` if your server is not there.

This module imports pytest; ``aioworkers.testing`` does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from . import _checks_app, _checks_dlq, _checks_lease, _checks_queue
from ._exercise import CHECKS, BrokerCase, Check, Exercise, bodies, letter

__all__ = ["CHECKS", "BrokerCase", "BrokerConformance", "Exercise", "bodies", "letter"]

# The checks register on import; they run in this order of their modules.
_MODULES = (_checks_queue, _checks_lease, _checks_dlq, _checks_app)


class BrokerConformance:
    """The conformance suite as a base class: override ``broker_case``."""

    #: Builds the event loop of each test (e.g. ``uvloop.new_event_loop``); None: asyncio's.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None

    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        """Yield the broker under test in a `BrokerCase`; close it afterwards."""
        raise NotImplementedError(
            f"{type(self).__name__} must define broker_case() (see aioworkers.testing.conformance)"
        )

    def run_check(self, found: Check) -> None:
        """Run one check on a fresh case, in an event loop of its own."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(self._exercise(found))

    async def _exercise(self, found: Check) -> None:
        async with self.broker_case() as case:
            missing = [need.__name__ for need in found.needs if not isinstance(case.broker, need)]
            if missing:
                pytest.skip(f"{type(case.broker).__name__} has no {', '.join(missing)}")
            with anyio.fail_after(case.timeout):
                await found.run(Exercise(case))


def _as_test(found: Check) -> Callable[[BrokerConformance], None]:
    def test(self: BrokerConformance) -> None:
        self.run_check(found)

    test.__name__ = test.__qualname__ = f"test_{found.name}"
    test.__doc__ = found.doc
    return test


_ORDER = [module.__name__ for module in _MODULES]
for _found in sorted(CHECKS, key=lambda c: _ORDER.index(c.run.__module__)):
    setattr(BrokerConformance, f"test_{_found.name}", _as_test(_found))
