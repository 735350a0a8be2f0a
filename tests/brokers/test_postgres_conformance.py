"""The broker conformance suite (`aioworkers.testing.conformance`) on ``postgresql://``,
each check in a database of its own (see ``postgres_case`` in ``conftest.py``)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from aioworkers.testing.conformance import BrokerCase, BrokerConformance

from .conftest import postgres_case


class TestPostgres(BrokerConformance):
    def broker_case(self) -> AbstractAsyncContextManager[BrokerCase]:
        return postgres_case()
