"""How a handler is called when it is more than ``await fn(*args, **kwargs)``: a sync
``def`` (run in a thread), dependencies (resolved and torn down around the call), typed
arguments (converted first), and the app's middleware around all of it.

`Handler` is built once, when the task is registered; a plain ``async def`` with plain
JSON parameters has none (`handler_for` returns None), and with no middleware either the
executor calls it directly: the hot path pays one attribute check.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..arguments import Arguments, arguments_for
from ..dependencies import Dependency, Depends, dependencies_of, resolve
from ..errors import ConfigError
from ..job import Job
from .threads import SyncThreads

# ``async def mw(job, call_next)``; ``await call_next()`` runs the rest of the chain and
# the handler, and returns the handler's value.
CallNext = Callable[..., Awaitable[Any]]
# The attempt's timeout and its length: a sync handler's starts again once it has a thread.
Deadline = tuple[asyncio.Timeout, float]
Middleware = Callable[[Job, CallNext], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Handler:
    """What calling one task's handler takes beyond a plain await."""

    sync: bool
    needs: tuple[tuple[str, Dependency], ...]
    arguments: Arguments | None


def job_signature(signature: inspect.Signature) -> inspect.Signature:
    """The handler's signature without its dependency parameters: the job's arguments."""
    params = [p for p in signature.parameters.values() if not isinstance(p.default, Depends)]
    if len(params) == len(signature.parameters):
        return signature
    deps = [p for p in signature.parameters.values() if isinstance(p.default, Depends)]
    every = list(signature.parameters.values())
    placed = [every.index(p) for p in deps if p.kind in _BY_PLACE]
    if placed and any(p.kind in _AFTER for p in every[min(placed) :] if p not in deps):
        # Arguments are passed by position: one would land on the dependency's place.
        raise ConfigError("dependency parameters go after the job's positional parameters")
    return signature.replace(parameters=params)


_BY_PLACE = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_AFTER = (*_BY_PLACE, inspect.Parameter.VAR_POSITIONAL)


def handler_for(name: str, fn: Callable[..., Any], signature: inspect.Signature) -> Handler | None:
    """The `Handler` of task ``name`` (``signature``: its job arguments), or None for a
    plain ``async def`` with plain JSON parameters and no dependencies."""
    # An object whose __call__ is an async def is async too (not run in a thread).
    sync = not (inspect.iscoroutinefunction(fn) or _async_call(fn))
    needs = dependencies_of(fn)
    arguments = arguments_for(name, fn, signature)
    if not sync and not needs and arguments is None:
        return None
    return Handler(sync, needs, arguments)


def _async_call(fn: Callable[..., Any]) -> bool:
    # The type's __call__ (what calling the object runs), looked up without B004's getattr.
    call = inspect.getattr_static(type(fn), "__call__", None)
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


async def attempt(
    fn: Callable[..., Any],
    handler: Handler | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    job: Job,
    middleware: Sequence[Middleware],
    threads: SyncThreads,
    limit: Deadline | None = None,
) -> Any:
    """One attempt of a handler that is not called directly: arguments converted (a
    `DecodeError` if they do not), then the middleware chain around the call."""
    if handler is not None and handler.arguments is not None:
        args, kwargs = handler.arguments.decode(args, kwargs)
    call = partial(_call, fn, handler, args, kwargs, threads, limit)
    if not middleware:
        return await call()
    return await _next(tuple(middleware), 0, job, call)


async def _next(
    chain: tuple[Middleware, ...],
    at: int,
    job: Job,
    call: Callable[[], Awaitable[Any]],
    _job: Job | None = None,
) -> Any:
    # ``call_next`` may be given the job back (``call_next(job)``); it is the same job.
    if at == len(chain):
        return await call()
    return await chain[at](job, partial(_next, chain, at + 1, job, call))


async def _call(
    fn: Callable[..., Any],
    handler: Handler | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    threads: SyncThreads,
    limit: Deadline | None,
) -> Any:
    if handler is None:
        return await fn(*args, **kwargs)
    if not handler.needs:
        if handler.sync:
            return await threads.run(fn, args, kwargs, limit=limit)
        return await fn(*args, **kwargs)
    async with AsyncExitStack() as stack:
        kwargs = {**kwargs, **await resolve(handler.needs, stack)}
        if handler.sync:
            return await threads.run(fn, args, kwargs, teardown=stack, limit=limit)
        return await fn(*args, **kwargs)
