"""Moved to `aioworkers.store.sqlite`; kept so existing imports work."""

from __future__ import annotations

from ..store.sqlite import SWEEP_BATCH, SWEEP_EVERY, SqliteStore

__all__ = ["SWEEP_BATCH", "SWEEP_EVERY", "SqliteStore"]
