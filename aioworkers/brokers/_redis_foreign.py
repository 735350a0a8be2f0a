"""Foreign messages on Redis (`RawRetry`, mixed into `RedisBroker`): an entry another
application XADDed keeps its own fields when retried, with the attempt in one more field,
``aioworkers-attempt``, so that application (and `decode="fields"`) still sees its fields.

A retry re-adds the entry's stored fields (read in the same script that settles it), the
body of an entry written by aioworkers (field ``b``) unchanged. Delayed, the fields wait in
the queue's ``payloads`` as one MessagePack array behind `FIELDS_MARK`, which the
promotion (`_redis_lua.PROMOTE`) turns back into the entry's fields.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import LeaseLost
from ._redis_io import body_of, pairs, text
from ._redis_lua import OWNED
from .base import ATTEMPT_HEADER, Delivery

_FIELD = ATTEMPT_HEADER.encode()

# KEYS: stream, delayed, payloads. ARGV: group, consumer, id, count, body, delay_ms, new id,
# attempt -> 1, or 0 if the entry is not ours. An entry trimmed from the stream while it was
# pending (XADD MAXLEN by its producer) is re-added as its body in ``b``: nothing is lost.
RETRY_RAW = (
    OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local stored = #e > 0 and e[1][2] or {'b', ARGV[5]}
local out = {}
for i = 1, #stored, 2 do
  local name, value = stored[i], stored[i + 1]
  if name == 'b' then value = ARGV[5] end
  if name ~= 'aioworkers-attempt' then
    out[#out + 1] = name
    out[#out + 1] = value
  end
end
out[#out + 1] = 'aioworkers-attempt'
out[#out + 1] = ARGV[8]
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local delay = tonumber(ARGV[6])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now_ms() + delay, ARGV[7])
  redis.call('HSET', KEYS[3], ARGV[7], '\\0aioworkers-fields\\0' .. cmsgpack.pack(out))
else
  redis.call('XADD', KEYS[1], '*', unpack(out))
end
return 1
"""
)


def delivery_of(queue: str, entry_id: Any, fields: dict[Any, Any], count: int) -> Delivery:
    """A stream entry as a `Delivery`: an attempt field is taken out of the body (a foreign
    entry's fields) into the delivery's token, where `message_meta` finds it."""
    if len(fields) == 1:
        # The hot path: an entry aioworkers wrote, its body alone in ``b``.
        body = fields.get(b"b")
        if type(body) is bytes:
            return Delivery(queue, text(entry_id), body, count)
    attempt = fields.pop(_FIELD, None)
    return Delivery(queue, text(entry_id), body_of(fields), count, attempt)


def delivery_of_flat(queue: str, entry_id: Any, flat: list[Any], count: int) -> Delivery:
    """`delivery_of` for the fields as a script returns them, ``[name, value, ...]``."""
    if len(flat) == 2 and flat[0] == b"b" and type(flat[1]) is bytes:
        return Delivery(queue, text(entry_id), flat[1], count)
    return delivery_of(queue, entry_id, pairs(flat), count)


class ForeignRedis:
    """`RawRetry` for `RedisBroker`."""

    _retry_raw: Any
    keys: Callable[[str], Any]
    _owned_call: Callable[..., Awaitable[Any]]

    def message_meta(self, delivery: Delivery) -> tuple[str | None, dict[str, Any]]:
        """No routing key; the attempt of a retried entry as its one header."""
        attempt = delivery.token
        return None, ({} if attempt is None else {ATTEMPT_HEADER: text(attempt)})

    async def retry_raw(
        self, delivery: Delivery, *, body: bytes, attempt: int, delay: float
    ) -> None:
        """`RedisBroker.retry`, the entry's own fields kept and the attempt among them."""
        k = self.keys(delivery.queue)
        extra = [body, int(delay * 1000), os.urandom(10).hex(), attempt]
        done = await self._owned_call(
            self._retry_raw, [k.stream, k.delayed, k.payloads], [delivery], extra
        )
        if not done:
            raise LeaseLost(f"{delivery!r} is no longer held by this consumer")
