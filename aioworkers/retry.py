"""Exponential backoff with full jitter: `next_delay` (it lives with the rest of the retry
policy in the runtime; importable from here as before)."""

from __future__ import annotations

from ._runtime.policy import next_delay

__all__ = ["next_delay"]
