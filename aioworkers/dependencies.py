"""Per-job dependencies, FastAPI-style: ``session: Session = aioworkers.Depends(get_session)``.

A dependency is resolved for each attempt and torn down after it, whatever its outcome
(success, failure, timeout, cancellation). ``get_session`` may be an async generator
(set-up, ``yield`` the value, tear-down), a sync generator, or an async or plain function
returning the value. A dependency's own parameters may depend on others the same way;
within one attempt each dependency is resolved once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .errors import ConfigError

__all__ = ["Depends"]


class Depends:
    """Mark a handler parameter as a dependency: resolved per attempt by calling
    ``dependency``, never part of the job's arguments."""

    __slots__ = ("dependency",)

    def __init__(self, dependency: Callable[..., Any]) -> None:
        if not callable(dependency):
            raise ConfigError(f"Depends() takes a function, got {dependency!r}")
        self.dependency = dependency

    def __repr__(self) -> str:
        return f"Depends({getattr(self.dependency, '__name__', self.dependency)!r})"


@dataclass(frozen=True, slots=True)
class Dependency:
    """One dependency, compiled at registration: how to call it and what it needs."""

    fn: Callable[..., Any]
    needs: tuple[tuple[str, Dependency], ...]


def dependencies_of(fn: Callable[..., Any]) -> tuple[tuple[str, Dependency], ...]:
    """The handler's dependency parameters, ``(name, dependency)``, checked now so that
    a dependency that cannot be called is a `ConfigError` at registration."""
    return _needs(fn, ())


def _needs(fn: Callable[..., Any], path: tuple[Any, ...]) -> tuple[tuple[str, Dependency], ...]:
    if fn in path:
        raise ConfigError(f"dependency {_name(fn)} depends on itself")
    needs: list[tuple[str, Dependency]] = []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin such as ``dict``: called without arguments
        return ()
    for param in params:
        if isinstance(param.default, Depends):
            sub = param.default.dependency
            needs.append((param.name, Dependency(sub, _needs(sub, (*path, fn)))))
        elif path and param.default is param.empty and param.kind not in _VARIADIC:
            raise ConfigError(
                f"parameter {param.name!r} of dependency {_name(fn)} needs a default "
                "or aioworkers.Depends(...): dependencies are called without arguments"
            )
    return tuple(needs)


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _name(fn: Callable[..., Any]) -> str:
    return repr(getattr(fn, "__qualname__", fn))


async def resolve(
    needs: tuple[tuple[str, Dependency], ...],
    stack: AsyncExitStack,
    cache: dict[Callable[..., Any], Any] | None = None,
) -> dict[str, Any]:
    """The values of ``needs`` by parameter name; their tear-downs go on ``stack``."""
    if cache is None:
        cache = {}
    values = {}
    for name, dep in needs:
        if dep.fn in cache:
            values[name] = cache[dep.fn]
            continue
        kwargs = await resolve(dep.needs, stack, cache) if dep.needs else {}
        value = await _enter(dep.fn, kwargs, stack)
        values[name] = cache[dep.fn] = value
    return values


async def _enter(fn: Callable[..., Any], kwargs: dict[str, Any], stack: AsyncExitStack) -> Any:
    if inspect.isasyncgenfunction(fn):
        acm = asynccontextmanager(fn)(**kwargs)
        value = await acm.__aenter__()
        stack.push_async_exit(_Unswallowed(acm))
        return value
    if inspect.isgeneratorfunction(fn):
        cm = contextmanager(fn)(**kwargs)
        value = cm.__enter__()
        stack.push_async_exit(_Unswallowed(cm))
        return value
    value = fn(**kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value


class _Unswallowed:
    """A dependency's tear-down that sees the attempt's error (a generator may catch it to
    roll back) but cannot hide it: a handler's failure stays a failure."""

    __slots__ = ("_cm",)

    def __init__(self, cm: AbstractAsyncContextManager[Any] | AbstractContextManager[Any]) -> None:
        self._cm = cm

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        cm = self._cm
        if isinstance(cm, AbstractAsyncContextManager):
            await cm.__aexit__(exc_type, exc, tb)
        else:
            cm.__exit__(exc_type, exc, tb)
        return False
