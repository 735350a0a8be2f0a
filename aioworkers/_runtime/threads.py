"""Sync handlers: a plain ``def`` runs in a worker thread, at most ``limit`` at once.

A thread cannot be killed. When the attempt waiting for one ends early (its timeout, a
shutdown past grace, a lost lease), the attempt goes on as usual while the thread keeps
its slot until the function really returns; its return value is then dropped. So the
number of threads never exceeds the limit, whatever happens to the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

log = logging.getLogger("aioworkers")

# Like `concurrent.futures.ThreadPoolExecutor`'s default: enough for blocking I/O on a
# small machine, few enough that a stuck downstream cannot pile up hundreds of threads.
DEFAULT_SYNC_THREADS = min(32, (os.cpu_count() or 1) + 4)


class Slots:
    """A counting limit on the event loop that binds to no loop (a Lambda handler keeps
    one across invocations); waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # `release` hands its slot over: ``busy`` is already counted
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over as it was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1


class _Call:
    __slots__ = ("args", "context", "end", "fn", "kwargs", "loop")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        end: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        # The caller's context (current_job() and the user's own context variables).
        self.context = contextvars.copy_context()
        self.loop = loop
        self.end = end


class SyncThreads:
    """Runs sync handlers in at most ``limit`` daemon threads, started when first needed
    and reused. Daemon: a handler stuck forever must not keep the process from exiting
    once the worker has stopped (its job was released, or is left to its lease)."""

    def __init__(self, limit: int = DEFAULT_SYNC_THREADS) -> None:
        self.limit = limit
        self.slots = Slots(limit)
        self._work: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work and not yet promised a call
        self._teardowns: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> int:
        """Threads running a handler now, those whose attempt has ended included."""
        return self.slots.busy

    async def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        teardown: AsyncExitStack | None = None,
        limit: tuple[asyncio.Timeout, float] | None = None,
    ) -> Any:
        """``fn(*args, **kwargs)`` in a thread, once one is free. If this is cancelled
        while the thread runs, the thread keeps its slot until it ends, and ``teardown``
        (the attempt's dependencies) is closed only then: the thread may still use them.

        ``limit``: the attempt's timeout and its length. The wait for a thread is bounded
        by it, and the handler then gets the whole length from when its thread starts: a
        burst of sync jobs queued for few threads does not time out for having waited."""
        await self.slots.acquire()
        loop = asyncio.get_running_loop()
        if limit is not None:
            timeout, span = limit
            when = timeout.when()
            if when is not None and not timeout.expired():
                timeout.reschedule(max(when, loop.time() + span))
        end: asyncio.Future[Any] = loop.create_future()
        try:
            self._submit(_Call(fn, args, kwargs, loop, end))
        except BaseException:
            self.slots.release()
            raise
        try:
            return await asyncio.shield(end)
        except asyncio.CancelledError:
            end.add_done_callback(_drop)  # the late return is ignored, its error too
            if teardown is not None:
                later = teardown.pop_all()
                end.add_done_callback(lambda _: self._close_later(later))
            raise

    def _submit(self, call: _Call) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                spawn = False
            else:
                # The slots bound the calls outstanding, so this never passes the limit.
                spawn = self._threads < self.limit
                self._threads += spawn
        self._work.put(call)
        if spawn:
            name = f"aioworkers-sync-{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            call = self._work.get()
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.context.run(call.fn, *call.args, **call.kwargs)
                if inspect.isawaitable(result):
                    _refuse(result)
            except BaseException as exc:
                error = exc
            with self._lock:
                # Idle before the slot is freed: the call the free slot lets in finds it.
                self._idle += 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                call.loop.call_soon_threadsafe(self._finish, call.end, result, error)
            del call, result, error  # no reference held while idle

    def _finish(self, end: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        self.slots.release()
        if end.done():
            return
        if error is not None:
            end.set_exception(error)
        else:
            end.set_result(result)

    def _close_later(self, stack: AsyncExitStack) -> None:
        task = asyncio.get_running_loop().create_task(_close(stack))
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)


def _refuse(result: Any) -> None:
    """A sync handler that returned an awaitable: it would never run in a thread."""
    close = getattr(result, "close", None)
    if callable(close):
        close()  # no "never awaited" warning on top of the error
    raise TypeError(
        f"a sync handler returned {type(result).__name__}: make it an 'async def' (a plain "
        "def runs in a worker thread, where nothing awaits what it returns)"
    )


def _drop(end: asyncio.Future[Any]) -> None:
    if not end.cancelled():
        end.exception()  # retrieved: an abandoned thread's error is not "never retrieved"


async def _close(stack: AsyncExitStack) -> None:
    try:
        await stack.aclose()
    except Exception:
        log.exception("tearing down the dependencies of an abandoned sync handler failed")
