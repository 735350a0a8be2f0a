"""Helpers for testing code built on aioworkers, and for testing a broker.

- `FakeClock`: a clock whose time moves only when a test advances it.
- `aioworkers.testing.conformance`: the broker conformance suite (needs pytest; imported
  only from there, so this package stays importable without it).
"""

from .clock import FakeClock

__all__ = ["FakeClock"]
