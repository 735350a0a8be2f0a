"""What a healthy worker says about its work: a DEBUG line per job, an INFO line per interval.

Success is otherwise silent (failures are logged where they are settled), so an operator
reading the log could not tell a busy worker from a stuck one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from ..brokers.base import Delivery
from .clock import Clock
from .failure import job_fields
from .outcome import Outcome, OutcomeName

log = logging.getLogger("aioworkers")

# Seconds between two summary lines of a worker (`app.worker(summary_interval=...)`).
SUMMARY_INTERVAL = 60.0

# What the summary line counts as done and as failed; the rest it leaves out.
_DONE = (OutcomeName.OK, OutcomeName.DUPLICATE)
_FAILED = (OutcomeName.DEAD,)


def log_job(name: OutcomeName, delivery: Delivery, outcome: Outcome | None) -> None:
    """One DEBUG line for a settled job: task, id, duration and outcome."""
    job = job_fields(delivery, outcome)
    job["outcome"] = str(name)
    log.debug(
        "job %s id=%s task=%s queue=%s duration=%.3fs",
        name,
        job["job_id"],
        job["task"],
        delivery.queue,
        outcome.duration if outcome is not None else 0.0,
        extra={"job": job},
    )


async def log_summaries(
    counts: Counter[str], in_flight: Callable[[], int], clock: Clock, every: float
) -> None:
    """Every ``every`` seconds, one INFO line: jobs done, failed and retried since the last
    line, the rate of done jobs, and how many run now. Quiet while nothing happens."""
    last = Counter(counts)
    while True:
        await clock.sleep(every)
        now = Counter(counts)
        done = sum(now[n] - last[n] for n in _DONE)
        failed = sum(now[n] - last[n] for n in _FAILED)
        retried = now[OutcomeName.RETRIED] - last[OutcomeName.RETRIED]
        running = in_flight()
        last = now
        if not (done or failed or retried or running):
            continue
        log.info(
            "jobs in the last %.0fs: done=%d failed=%d retried=%d rate=%.1f/s in_flight=%d",
            every,
            done,
            failed,
            retried,
            done / every,
            running,
            extra={
                "summary": {
                    "interval": every,
                    "done": done,
                    "failed": failed,
                    "retried": retried,
                    "in_flight": running,
                }
            },
        )
