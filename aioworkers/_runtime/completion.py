"""``current_job().complete_in(conn)``: an idempotent job completes its key inside its own
transaction (PostgreSQL store), so the key is done exactly when the job's writes commit.

The executor gives each run of an idempotent task a `Completion` (a context variable the
handler's `Job` reads). Once the handler has called it and returned, the executor does not
complete the key itself: it asks the store whether the transaction committed it (`confirm`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..errors import AioworkersError, ConfigError
from ..idempotency.base import IdempotencyStore, StoreUnavailable
from . import policy
from .outcome import ACK, RELEASE, Outcome


class NotCommitted(AioworkersError):
    """The job called ``complete_in`` and returned, but its transaction did not commit the
    key (it rolled back): its writes are gone, so it is tried again like a failure."""


@dataclass(eq=False, slots=True)
class Completion:
    """The idempotency claim of one run, for ``complete_in``."""

    job_id: str
    store: IdempotencyStore
    key: str
    owner: str
    ttl: float
    forget: Callable[[], None]  # stops the heartbeat from extending the claim
    used: bool = False

    async def commit_in(self, conn: object) -> None:
        complete_in = getattr(self.store, "complete_in", None)
        if complete_in is None:
            raise ConfigError(
                "complete_in(conn) needs the PostgreSQL state store (store='postgresql://...', "
                f"the default of a postgresql:// broker); this app's is {type(self.store).__name__}"
            )
        self.used = True
        # Once the key is done (at commit) the heartbeat would find the claim gone and
        # cancel the run: it stops extending it now. The row stays locked by the
        # transaction, so no other run can take the key before it ends either way.
        self.forget()
        await complete_in(conn, self.key, self.owner, ttl=self.ttl)

    async def confirm(self, lease: float) -> bool:
        """After the handler returned: True if the key is done (its transaction committed,
        or another run has it now); False if not, the key then freed for the retry."""
        if await self.store.release(self.key, self.owner):
            return False  # still ours: the transaction rolled back
        probe = secrets.token_hex(8)
        if await self.store.claim(self.key, probe, lease=lease) == "claimed":
            # Nobody has it: it rolled back, and the claim lapsed meanwhile.
            await self.store.release(self.key, probe)
            return False
        return True


async def after_run(completion: Completion, outcome: Outcome, lease: float, run: Any) -> None:
    """Settle the key of a run that called ``complete_in``, in place of completing it: a
    failed run frees it if its transaction did not commit (then it is still ours); a
    returned run is acked if the key is done, else tried again (`NotCommitted`)."""
    committed = True
    try:
        with run.catch_cancel():
            if outcome.decision is not ACK:
                await completion.store.release(completion.key, completion.owner)
            else:
                committed = await completion.confirm(lease)
    except StoreUnavailable as exc:
        if outcome.decision is ACK:  # unknown: the same attempt later finds out
            outcome.decision = policy.defer(lease)
            outcome.detail = f"could not read key {completion.key!r}: {exc}"
        return
    if run.cancel_taken:
        outcome.decision = RELEASE
    elif not committed and outcome.envelope is not None:
        env = outcome.envelope
        outcome.error = NotCommitted(
            f"the job called complete_in() but its transaction did not commit key "
            f"{completion.key!r}: its writes were rolled back, so it runs again"
        )
        task_policy = getattr(outcome.task, "policy", policy.DEFAULT_POLICY)
        outcome.decision = policy.classify(
            outcome.error, env.attempt, task_policy, snoozes=env.snoozes
        )


completion_var: ContextVar[Completion | None] = ContextVar("aioworkers_completion", default=None)
