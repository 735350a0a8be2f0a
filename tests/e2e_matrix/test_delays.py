"""A delayed retry on every broker starts when its delay is over, not before and not much
later."""

from __future__ import annotations

from ..e2e.harness import delayed_retry_took
from .worlds import Matrix


async def test_a_delayed_retry_is_honoured_within_ten_percent(e2e: Matrix) -> None:
    # Wall-clock by nature: the broker's own timer (a delay queue, a sorted set, SQS's
    # DelaySeconds, a visible_at column) is what is under test. SQS adds its coarser grain.
    delay = 2.0
    took = await delayed_retry_took(e2e.client(), delay)
    assert delay * 0.95 <= took <= delay * 1.1 + e2e.delay_slack, took
