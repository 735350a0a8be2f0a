"""The Redis store's calls made in one turn of the event loop, sent as one pipeline.

Jobs started together (a fetched batch) and waiters woken together each make a store
call; each is one atomic command or script on the server, so sending them in one
pipeline changes nothing but the number of round trips: one for all of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

# A call: a script and its keys and arguments, or (script None) a command's arguments.
_Call = tuple[AsyncScript | None, list[Any], list[Any], "asyncio.Future[Any]"]


class Pipeliner:
    """`script` and `command` return futures of their replies; the calls made before the
    loop turns are sent together. A reply that is an error is raised by its own caller
    (as redis-py raises it); a connection that fails fails every call in its pipeline."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._calls: list[_Call] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        return self._add(script, keys, args)

    def command(self, *args: Any) -> asyncio.Future[Any]:
        return self._add(None, [], list(args))

    def _add(
        self, script: AsyncScript | None, keys: list[Any], args: list[Any]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._calls.append((script, keys, args, reply))
        if len(self._calls) == 1:
            flush = loop.create_task(self._flush())
            self._flushes.add(flush)  # the loop holds tasks weakly
            flush.add_done_callback(self._flushes.discard)
        return reply

    async def _flush(self) -> None:
        calls, self._calls = self._calls, []
        try:
            if len(calls) == 1:
                replies = [await self._one(calls[0])]
            else:
                replies = await self._many(calls)
        except BaseException as exc:
            for *_, reply in calls:
                if not reply.done():
                    if isinstance(exc, asyncio.CancelledError):
                        reply.cancel()
                    else:
                        reply.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, reply), value in zip(calls, replies, strict=True):
            if reply.done():  # its caller gave up (a deadline)
                continue
            if isinstance(value, BaseException):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    async def _one(self, call: _Call) -> Any:
        script, keys, args, _ = call
        try:
            if script is None:
                return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]
            return await script(keys=keys, args=args)
        except rexc.ResponseError as exc:  # the caller's, as a reply of the pipeline is
            return exc

    async def _many(self, calls: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in calls:
                if script is None:
                    pipe.execute_command(*args)
                else:
                    # EVALSHA, not the script: a pipeline with scripts asks SCRIPT EXISTS first.
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = list(await pipe.execute(raise_on_error=False))
        for i, (call, value) in enumerate(zip(calls, replies, strict=True)):
            if isinstance(value, rexc.NoScriptError):  # the server lost its scripts: load
                replies[i] = await self._one(call)
        return replies
