"""The parts of `App` that shape how handlers run: shared state for startup hooks, the
middleware around every attempt, the producer's ``on_enqueue`` hooks, the sync-thread
limit and the default retry policy."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, TypeVar

from ._runtime.handlers import Middleware
from ._runtime.policy import DEFAULT_POLICY, Policy
from ._runtime.threads import DEFAULT_SYNC_THREADS
from .errors import ConfigError
from .task import Call

# ``hook(call, headers)``, sync or async: adds str headers to the outgoing job.
EnqueueHook = Callable[[Call, dict[str, str]], Awaitable[None] | None]
M = TypeVar("M", bound=Middleware)
H = TypeVar("H", bound=EnqueueHook)

__all__ = ["DEFAULT_SYNC_THREADS", "EnqueueHook", "HandlerOptions", "State"]


class State(SimpleNamespace):
    """Resources startup hooks share with handlers and dependencies: ``app.state.pool =
    await create_pool()`` in an ``on_startup`` hook, ``app.state.pool`` in a handler."""


class HandlerOptions:
    """Mixed into `App` (its constructor calls `_init_handlers`)."""

    def _init_handlers(
        self,
        sync_threads: int,
        retries: int | None,
        backoff: float | None,
        max_backoff: float | None,
    ) -> None:
        if isinstance(sync_threads, bool) or not isinstance(sync_threads, int) or sync_threads < 1:
            raise ConfigError(f"sync_threads must be an int >= 1, got {sync_threads!r}")
        self.sync_threads = sync_threads
        self.state = State()
        self.middlewares: list[Middleware] = []
        self.enqueue_hooks: list[EnqueueHook] = []
        self.retry_policy = _policy(DEFAULT_POLICY, retries, backoff, max_backoff)

    def middleware(self, fn: M) -> M:
        """Register ``async def mw(job, call_next)`` around every attempt of every task, in
        registration order (the first registered is outermost); ``await call_next()`` runs
        the rest and returns the handler's value. A middleware may return without calling
        it (the job is done), raise `Retry`, `Reject` or `Snooze`; what it raises fails the
        attempt like the handler's own error."""
        given: Any = fn  # checked, not narrowed: ``fn`` is returned as it came
        if not inspect.iscoroutinefunction(given):
            raise ConfigError(f"middleware {fn!r} must be an 'async def mw(job, call_next)'")
        self.middlewares.append(fn)
        return fn

    def on_enqueue(self, fn: H) -> H:
        """Register ``hook(call, headers)`` (sync or async), called for each job enqueued
        from this process: str items it adds to ``headers`` travel with the job and arrive
        in ``current_job().headers``."""
        self.enqueue_hooks.append(fn)
        return fn

    async def _outgoing(self, call: Call) -> Call:
        """``call`` with the headers the ``on_enqueue`` hooks add."""
        headers: dict[str, str] = {}
        for hook in self.enqueue_hooks:
            result = hook(call, headers)
            if inspect.isawaitable(result):
                await result
        if not headers:
            return call
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"on_enqueue headers must be str to str, got {name!r}: {value!r}")
        return replace(call, headers={**headers, **(call.headers or {})})

    def task_policy(
        self,
        retries: int | None,
        backoff: float | None,
        max_backoff: float | None,
        timeout: float | None,
        max_snoozes: int,
    ) -> Policy:
        """A task's policy: what it sets, else the app's ``retries``, ``backoff`` and
        ``max_backoff``."""
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        policy = _policy(self.retry_policy, retries, backoff, max_backoff)
        return replace(policy, timeout=timeout, max_snoozes=max_snoozes)


def _policy(
    base: Policy, retries: int | None, backoff: float | None, max_backoff: float | None
) -> Policy:
    if retries is not None and retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    for what, value in (("backoff", backoff), ("max_backoff", max_backoff)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return Policy(
        retries=base.retries if retries is None else retries,
        backoff=base.backoff if backoff is None else backoff,
        max_backoff=base.max_backoff if max_backoff is None else max_backoff,
    )
