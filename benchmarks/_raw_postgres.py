"""The raw side on PostgreSQL: a plain asyncpg SKIP LOCKED loop doing the same work as
aioworkers.

While slots are free, one statement leases up to 100 ready rows of the queue (``UPDATE ...
FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)`` with a random token, visible again
after 30 s: a killed worker's jobs come back, as in aioworkers); an empty fetch waits for
a NOTIFY (the parent's inserts send one) or 1 s. One asyncio task per row (decode the
envelope, call the handler it names); finished rows deleted by id and token, one
statement per batch, while the next rows run (the loop is `_rawloop.py`'s); the lease and
the delete committed without waiting for the WAL flush, as aioworkers'. No retries,
delivery counts, dead letters, counters or lease extension. Imports no part of aioworkers.

    python benchmarks/_raw_postgres.py '<spec json>'    (started by run.py --broker postgres)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import asyncpg
from _child import Spec, Work, main
from _rawloop import RawLoop

# The parent creates the table and inserts the rows the raw side reads.
SCHEMA = """
CREATE TABLE raw_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    body bytea NOT NULL,
    visible_at timestamptz NOT NULL DEFAULT now(),
    lease bigint
);
CREATE INDEX raw_jobs_ready ON raw_jobs (queue, visible_at, id);
"""
CHANNEL = "raw_jobs"
# $1 queue, $2 bodies.
INSERT = f"""
WITH added AS (
    INSERT INTO raw_jobs (queue, body) SELECT $1, b FROM unnest($2::bytea[]) AS b RETURNING 1
)
SELECT pg_notify('{CHANNEL}', $1) FROM (SELECT count(*) FROM added) AS n
"""
TAKE = """
WITH next AS MATERIALIZED (
    SELECT id FROM raw_jobs WHERE queue = $1 AND visible_at <= now()
    ORDER BY visible_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE raw_jobs AS j SET lease = $3, visible_at = now() + interval '30 seconds'
FROM next WHERE j.id = next.id
RETURNING j.id, j.body
"""
DELETE = """
DELETE FROM raw_jobs AS j USING unnest($1::bigint[], $2::bigint[]) AS t(id, lease)
WHERE j.id = t.id AND j.lease = t.lease
"""
# The lease and the delete of a finished row are committed asynchronously, as aioworkers'
# are (a server crash may forget the last of them: those jobs run again); the parent's
# inserts are durable commits, as aioworkers' enqueues.
ASYNC_COMMIT = {"synchronous_commit": "off"}
FETCH_MAX = 100
IDLE_WAIT = 1.0


class RawPostgres(RawLoop[tuple[int, int]]):
    def __init__(self, spec: Spec, work: Work) -> None:
        super().__init__(spec, work, ack_batch=1000)
        self.url = spec.raw_url
        self.queue = spec.queue
        # A connection per role, no pool: nothing is reset between calls.
        self.fetcher: asyncpg.Connection | None = None
        self.settler: asyncpg.Connection | None = None
        self.listener: asyncpg.Connection | None = None
        self.wake = asyncio.Event()

    async def start(self) -> asyncio.Task[None]:
        # As aioworkers' take and ack: committed without waiting for the WAL flush.
        self.fetcher = await asyncpg.connect(self.url, server_settings=ASYNC_COMMIT)
        self.settler = await asyncpg.connect(self.url, server_settings=ASYNC_COMMIT)
        self.listener = await asyncpg.connect(self.url)
        await self.listener.add_listener(CHANNEL, lambda *_: self.wake.set())
        return await super().start()

    async def _fetch(self, free: int) -> list[tuple[tuple[int, int], bytes]]:
        assert self.fetcher is not None
        self.wake.clear()  # before the look: a NOTIFY during it is not missed
        token = secrets.randbits(62)
        rows = await self.fetcher.fetch(TAKE, self.queue, min(FETCH_MAX, free), token)
        if not rows:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), IDLE_WAIT)
        return [((row[0], token), row[1]) for row in rows]

    async def _settle(self, batch: list[tuple[int, int]]) -> None:
        assert self.settler is not None
        await self.settler.execute(DELETE, [i for i, _ in batch], [t for _, t in batch])

    async def stop(self) -> None:
        await super().stop()
        for conn in (self.listener, self.fetcher, self.settler):
            if conn is not None:
                await conn.close()


if __name__ == "__main__":
    main(RawPostgres)
