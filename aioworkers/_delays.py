"""Delays as users give them: seconds, or None for none."""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError


def check_delay(value: float | None, what: str = "delay") -> float:
    """``value`` seconds as a delay: None is no delay; negative, NaN or infinite is a
    `ConfigError` naming ``what``."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{what} must be a finite number of seconds >= 0 (or None: no delay), got {value!r}"
        )
    return float(value)
