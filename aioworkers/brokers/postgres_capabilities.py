"""Capabilities the PostgreSQL broker brings, checked with ``isinstance`` by the App
(importable without asyncpg): an explicit, versioned schema, and publishing inside the
application's own transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Migratable(Protocol):
    """A broker whose tables are created and upgraded by explicit, versioned migrations
    (``aioworkers migrate``, `App.migrate`), never silently."""

    async def migrate(self) -> list[int]:
        """Apply the migrations not applied yet, in order; returns their versions."""
        ...


@runtime_checkable
class TransactionalPublisher(Protocol):
    """A broker that can publish through a connection of the application, inside its open
    transaction: the jobs exist exactly when that transaction commits."""

    async def publish_in(
        self, conn: object, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0
    ) -> None: ...
