"""The worker's side of unique enqueue (`aioworkers._unique`): a job that ends frees
its key."""

from __future__ import annotations

import logging

from ..store.base import Store, StoreUnavailable
from .outcome import Outcome, OutcomeName

log = logging.getLogger("aioworkers")

# The envelope header that carries a job's unique key.
UNIQUE_HEADER = "aioworkers-unique"
# What ends a job's life, and so frees its unique key (a retry, deferral, throttle,
# snooze or release does not: the job is still queued, delayed or retrying).
ENDED = frozenset({OutcomeName.OK, OutcomeName.DEAD, OutcomeName.CANCELLED, OutcomeName.DUPLICATE})


async def free_ended(store: Store | None, outcome: Outcome, name: OutcomeName | None) -> None:
    """Free the unique key of a job that has just ended (settled as ``name``)."""
    env = outcome.envelope
    if store is None or env is None or name not in ENDED:
        return
    key = env.headers.get(UNIQUE_HEADER)
    if key is None:
        return
    try:
        await store.free_unique(key, env.id)
    except StoreUnavailable as exc:
        log.warning(
            "could not free unique key %r of job %s; it expires with its unique_for: %s",
            key,
            env.id,
            exc,
        )
