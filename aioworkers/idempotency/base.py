"""Moved to `aioworkers.store.base`; kept so existing imports work."""

from __future__ import annotations

from ..store.base import ClaimResult, IdempotencyStore, Store, StoreUnavailable, check_times

__all__ = ["ClaimResult", "IdempotencyStore", "Store", "StoreUnavailable", "check_times"]
