"""Registered tasks and the producer side: `Task`, `Enqueuer`, `Call`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from ._runtime.handlers import handler_for, job_signature
from ._runtime.limits import Limits
from ._runtime.policy import Policy
from ._unique import DEFAULT_UNIQUE_FOR, UNIQUE_HEADER
from .errors import check_delay

if TYPE_CHECKING:
    from .handles import JobHandle

log = logging.getLogger("aioworkers")

P = ParamSpec("P")
R = TypeVar("R")
_Fits = Callable[[Sequence[Any], dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class Call:
    """One job to enqueue: a task name, its arguments and its options (see `App.enqueue_many`)."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.0  # seconds (None is taken for no delay)
    key: str | None = None
    queue: str | None = None
    # Envelope headers to add (a periodic job's schedule and slot).
    headers: dict[str, str] | None = None
    # One job in the system per key (see `Task.options`), held for at most unique_for s.
    unique_key: str | None = None
    unique_for: float | None = None

    def __post_init__(self) -> None:
        if self.delay != 0.0:  # checked once here, for every way a job is enqueued
            object.__setattr__(self, "delay", check_delay(self.delay))


class Enqueues(Protocol):
    """What a task needs of its `App`: where its jobs go (a structural type, so this module
    imports no app)."""

    @property
    def queue(self) -> str: ...

    async def enqueue_many(
        self, calls: Iterable[Call], *, conn: object = None
    ) -> list[JobHandle]: ...


class Enqueuer(Generic[P]):
    """A task with enqueue options bound: ``task.options(delay=60, key="k").enqueue(...)``."""

    __slots__ = ("_conn", "_delay", "_key", "_queue", "_task", "_unique")

    def __init__(
        self,
        task: Task[P, Any],
        delay: float | None,
        key: str | None,
        queue: str | None,
        conn: object = None,
        unique: tuple[str, float] | None = None,
    ) -> None:
        delay = check_delay(delay)
        if unique is not None and not unique[1] > 0:
            raise ValueError(f"unique_for must be > 0 seconds, got {unique[1]}")
        self._unique = unique
        self._task = task
        self._delay = delay
        self._key = key
        self._queue = queue
        self._conn = conn

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call:
        """A `Call` for `App.enqueue_many`, checked against the task's signature."""
        self._task.encode_arguments(args, kwargs)
        name, delay, key, queue = self._task.name, self._delay, self._key, self._queue
        if self._unique is None:
            return Call(name, args, kwargs, delay, key, queue)
        unique_key, unique_for = self._unique
        headers = {UNIQUE_HEADER: unique_key}  # the worker frees the key when the job ends
        return Call(name, args, kwargs, delay, key, queue, headers, unique_key, unique_for)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Publish one job; returns its `JobHandle` (a ``str``: its id) once the broker
        has it. A ``conn=`` keyword is
        the transaction to enqueue in (see `Task.options`), unless the handler itself has a
        parameter named ``conn``."""
        conn = self._conn
        if "conn" in kwargs and not self._task.takes_conn:
            conn = kwargs.pop("conn")
        (job_id,) = await self._task.app.enqueue_many([self.call(*args, **kwargs)], conn=conn)
        return job_id


class Task(Generic[P, R]):
    """A registered handler (``async def``, or a plain ``def`` run in a worker thread).
    Calling it runs the function directly, in this process."""

    def __init__(
        self,
        app: Enqueues,
        fn: Callable[P, Coroutine[Any, Any, R]],
        *,
        name: str,
        queue: str | None,
        policy: Policy,
        idempotent: bool = False,
        result_ttl: float | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.policy = policy
        self.idempotent = idempotent
        # Seconds its job records and results are kept (None: none are written).
        self.result_ttl = result_ttl
        # Concurrency and rate limits across workers (None: none; set by `App.task`).
        self.limits: Limits | None = None
        # The job's arguments: dependency parameters (aioworkers.Depends) are not among them.
        self.signature = job_signature(inspect.signature(fn))
        # None for a plain async def with plain JSON parameters (called directly).
        self.handler = handler_for(name, fn, self.signature)
        self._fits = _fast_fit(self.signature)
        # A handler parameter named conn gets ``enqueue(conn=...)``; else it is the transaction.
        self.takes_conn = "conn" in self.signature.parameters
        self._warned_key = False

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue or self.app.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return self.fn(*args, **kwargs)

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` if the handler cannot be called with these arguments."""
        if self._fits is not None and self._fits(args, kwargs):
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"bad arguments for task {self.name!r}: {exc}") from None

    def encode_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        """Check arguments to enqueue (their types too, for typed parameters; a
        ``TypeError`` names the wrong one) and return them as they travel (JSON forms)."""
        self.check_arguments(args, kwargs)
        arguments = self.handler.arguments if self.handler is not None else None
        return (args, kwargs) if arguments is None else arguments.encode(args, kwargs)

    def key_ignored(self) -> None:
        """A job of this task was enqueued with a key it ignores: say so, once."""
        if not self._warned_key:
            self._warned_key = True
            log.warning(
                "task %r is not idempotent=True: a key given to its jobs is only carried "
                "with them (current_job().key) and every job with the same key runs; "
                "register it with @app.task(idempotent=True) to run each key once",
                self.name,
            )

    def options(
        self,
        *,
        delay: float | None = 0.0,
        key: str | None = None,
        queue: str | None = None,
        conn: object = None,
        unique_key: str | None = None,
        unique_for: float | None = None,
    ) -> Enqueuer[P]:
        """Bind enqueue options: ``delay`` seconds, an idempotency ``key`` (run once per
        key on a task registered with ``idempotent=True``), another ``queue``; ``conn``, a
        connection of the application in an open transaction (PostgreSQL broker only): the
        job exists exactly when that transaction commits (see `App.enqueue_many`).

        ``unique_key``: while a job enqueued with this key (less than ``unique_for``
        seconds ago, default an hour) is queued, delayed, running or retrying, enqueue
        publishes nothing and returns that job's handle; the key is free again once the job
        succeeds, fails or is cancelled. A job enqueuing under the key it holds (its own
        successor) hands the key to the new job. Needs the App's ``store``."""
        unique = None
        if unique_key is not None:
            unique = (unique_key, DEFAULT_UNIQUE_FOR if unique_for is None else unique_for)
        return Enqueuer(self, delay, key, queue, conn, unique)

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call:
        """A `Call` for `App.enqueue_many`."""
        return self.options().call(*args, **kwargs)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Publish one job with default options; returns its `JobHandle`."""
        return await self.options().enqueue(*args, **kwargs)


def _fast_fit(
    signature: inspect.Signature,
) -> Callable[[Sequence[Any], dict[str, Any]], bool] | None:
    """A quick yes for the common signature shape (named parameters only), checked on
    every job; a no falls back to ``Signature.bind`` for the precise error."""
    params = signature.parameters.values()
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
        return None
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = frozenset(signature.parameters)
    required = frozenset(p.name for p in params if p.default is p.empty)
    most = len(positional)
    # Arguments by position only (the usual job): they fit if their count is in
    # [least, most], least covering every required parameter (none if one is keyword-only).
    if required <= set(positional):
        least = max((i + 1 for i, name in enumerate(positional) if name in required), default=0)
    else:
        least = most + 1

    def fits(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        if not kwargs:
            return least <= len(args) <= most
        if len(args) > most:
            return False
        given = set(positional[: len(args)])
        keys = kwargs.keys()
        if not keys <= names or not given.isdisjoint(keys):
            return False
        given.update(keys)
        return required <= given

    return fits


__all__ = ["Call", "Enqueuer", "Enqueues", "Policy", "Task"]
