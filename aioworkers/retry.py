"""Exponential backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Callable


def next_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 3600.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based).

    Full jitter: uniform in ``[0, min(cap, base * 2 ** (attempt - 1))]``, so retries of many
    jobs that failed together spread out instead of stampeding the dependency again.
    """
    # min() before the power would overflow float for absurd attempts; clamp the exponent.
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    return ceiling * rand()
