"""The ledger the end-to-end jobs write and the tests read: one place for its key names.

Every job that completes records its *effect* at the end, in one script: its id in a set
(``done``), one more in a per-id counter (``effects``) and the pid of the worker that did
it (``by``). A duplicate delivery that runs to the end therefore shows up as a counter of 2,
a lost job as an id missing from the set. A random token per handler run makes a write
retried after a dropped connection count once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# KEYS: runs, done, effects, by. ARGV: token, job id, pid -> 1 if recorded, 0 if a repeat
RECORD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class LedgerKeys:
    """Key names under ``<prefix>:ledger:`` (so deleting the test's prefix removes them)."""

    prefix: str

    def _key(self, name: str) -> str:
        return f"{self.prefix}:ledger:{name}"

    @property
    def runs(self) -> str:
        return self._key("runs")

    @property
    def done(self) -> str:
        return self._key("done")

    @property
    def effects(self) -> str:
        return self._key("effects")

    @property
    def by(self) -> str:
        return self._key("by")

    @property
    def runs_started(self) -> str:
        """A hash: how many runs of each tracked job have started."""
        return self._key("runs-started")

    @property
    def starts(self) -> str:
        """A list of ``"<job id> <pid>"``, one per handler start of a tracked job."""
        return self._key("starts")

    def record_args(self) -> list[str]:
        return [self.runs, self.done, self.effects, self.by]


@dataclass(frozen=True)
class Snapshot:
    """The ledger at one moment."""

    done: set[str]
    effects: dict[str, int]
    by: dict[str, int]
    starts: list[tuple[str, int]]

    @property
    def duplicates(self) -> dict[str, int]:
        """Ids whose effect was recorded more than once, with how many times."""
        return {job_id: n for job_id, n in self.effects.items() if n > 1}

    def started_by(self, pid: int) -> list[str]:
        return [job_id for job_id, p in self.starts if p == pid]

    def finished_by(self, pid: int) -> set[str]:
        return {job_id for job_id, p in self.by.items() if p == pid}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read(client: Any, keys: LedgerKeys) -> Snapshot:
    """Read the whole ledger in one round trip (``client``: a redis.asyncio client)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.smembers(keys.done)
        pipe.hgetall(keys.effects)
        pipe.hgetall(keys.by)
        pipe.lrange(keys.starts, 0, -1)
        done, effects, by, starts = await pipe.execute()
    pairs = [_s(entry).split() for entry in starts]
    return Snapshot(
        done={_s(x) for x in done},
        effects={_s(k): int(v) for k, v in effects.items()},
        by={_s(k): int(v) for k, v in by.items()},
        starts=[(job_id, int(pid)) for job_id, pid in pairs],
    )


async def count_done(client: Any, keys: LedgerKeys) -> int:
    return int(await client.scard(keys.done))
