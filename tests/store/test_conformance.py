"""The store conformance suite (`aioworkers.testing.store_conformance`) on every store of
the package: memory twice (on a real clock and on a `FakeClock`), SQLite and Redis; their
cases are in ``conftest.py``. Then tests of the kit itself."""

from __future__ import annotations

import subprocess
import sys
from contextlib import AbstractAsyncContextManager

from aioworkers.testing.store_conformance import STORE_CHECKS, StoreCase, StoreConformance

from .conftest import memory_case, memory_fake_clock_case, redis_case, sqlite_case


class TestMemory(StoreConformance):
    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        return memory_case()


class TestMemoryFakeClock(StoreConformance):
    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        return memory_fake_clock_case()


class TestSqlite(StoreConformance):
    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        return sqlite_case()


class TestRedis(StoreConformance):
    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        return redis_case()


def test_the_kit_imports_without_pytest() -> None:
    code = (
        "import sys, aioworkers.testing, aioworkers.store; "
        "assert 'pytest' not in sys.modules, 'pytest'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_every_check_has_a_docstring_and_a_unique_name() -> None:
    names = [check.name for check in STORE_CHECKS]
    assert len(names) == len(set(names))
    assert all(check.doc.strip() for check in STORE_CHECKS)
