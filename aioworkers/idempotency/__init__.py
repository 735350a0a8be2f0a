"""The old name of the state store (`aioworkers.store`), kept so existing imports work:
idempotency keys are one part of what the store holds."""

from __future__ import annotations

from ..store import (
    SCHEMES,
    ClaimResult,
    IdempotencyStore,
    MemoryStore,
    Store,
    StoreUnavailable,
    check_url,
    default_url_for,
    open_store,
)

__all__ = [
    "SCHEMES",
    "ClaimResult",
    "IdempotencyStore",
    "MemoryStore",
    "Store",
    "StoreUnavailable",
    "check_url",
    "default_url_for",
    "open_store",
]
