"""Moved to `aioworkers.store.memory`; kept so existing imports work."""

from __future__ import annotations

from ..store.memory import MemoryStore

__all__ = ["MemoryStore"]
