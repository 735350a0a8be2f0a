"""Moved to `aioworkers.store.redis`; kept so existing imports work."""

from __future__ import annotations

from ..store.redis import DEFAULT_PREFIX, RedisStore

__all__ = ["DEFAULT_PREFIX", "RedisStore"]
