"""The SQL of the PostgreSQL broker: its versioned migrations and its statements.

Every name is qualified with the schema the broker was given (``?schema=``, default
``public``), so a connection of the application with another ``search_path`` still
writes where the workers read.

The tables (migration 1):

- ``aioworkers_jobs``: one row per message. ``visible_at <= now()``: ready (a lapsed
  lease included: its worker died); ``visible_at > now()`` with ``lease`` set: in flight
  until ``visible_at``; without ``lease``: delayed until ``visible_at``. A fetch writes a
  fresh random ``lease`` token, and every settle names it, so a worker whose lease lapsed
  never acts over the next holder. Finished rows are deleted, never kept with a status.
- ``aioworkers_dead``: the dead-letter queue, with the letter's facts as ``jsonb``.
- ``aioworkers_counts``: counter deltas, appended by publish, ack, retry and dead letter
  (an append takes no lock another transaction waits on: a producer's open transaction
  never holds up a worker), folded now and then into ``aioworkers_totals``.
- ``aioworkers_schema``: the migrations applied, one row each.

Migration 2 adds the state store's tables (``aioworkers.store.postgres``):
``aioworkers_keys`` (idempotency claims), ``aioworkers_records`` (job records) and
``aioworkers_state`` (cancel marks, slots, unique keys, limit leases, token buckets).

Times are the database server's (``now()``): every process shares one clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    sql: str


# Autovacuum for a queue table: its rows are short-lived, so what matters is how many dead
# rows there are, not which fraction of a (tiny) live table they are. Vacuum after ~1000 dead
# rows and without cost-based sleeps; analyze as often, since the number of ready rows swings
# from none to millions and back.
_JOBS_STORAGE = """
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 1000
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, dead letters and counters",
        f"""
CREATE TABLE {{s}}.aioworkers_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    body bytea NOT NULL,
    visible_at timestamptz NOT NULL DEFAULT now(),
    count integer NOT NULL DEFAULT 0,
    lease bigint
) WITH ({_JOBS_STORAGE});
CREATE INDEX aioworkers_jobs_visible ON {{s}}.aioworkers_jobs (queue, visible_at, id);
CREATE INDEX aioworkers_jobs_leased ON {{s}}.aioworkers_jobs (queue, visible_at)
    WHERE lease IS NOT NULL;
CREATE TABLE {{s}}.aioworkers_dead (
    entry bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    body bytea NOT NULL,
    facts jsonb NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX aioworkers_dead_queue ON {{s}}.aioworkers_dead (queue, entry);
CREATE TABLE {{s}}.aioworkers_counts (
    queue text NOT NULL,
    added bigint NOT NULL DEFAULT 0,
    removed bigint NOT NULL DEFAULT 0,
    dead bigint NOT NULL DEFAULT 0
) WITH (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000);
CREATE TABLE {{s}}.aioworkers_totals (
    queue text PRIMARY KEY,
    added bigint NOT NULL DEFAULT 0,
    removed bigint NOT NULL DEFAULT 0,
    dead bigint NOT NULL DEFAULT 0
);
""",
    ),
    Migration(
        2,
        "the state store: idempotency keys, job records, marks, leases",
        f"""
CREATE TABLE {{s}}.aioworkers_keys (
    key text PRIMARY KEY,
    owner text,
    expires float8 NOT NULL
) WITH ({_JOBS_STORAGE});
CREATE INDEX aioworkers_keys_expires ON {{s}}.aioworkers_keys (expires);
CREATE TABLE {{s}}.aioworkers_records (
    id text PRIMARY KEY,
    task text NOT NULL,
    queue text NOT NULL,
    status text NOT NULL,
    attempt integer NOT NULL,
    enqueued_at float8,
    started_at float8,
    finished_at float8,
    error_type text,
    error text,
    traceback text,
    result bytea,
    result_error text,
    expires float8 NOT NULL
) WITH ({_JOBS_STORAGE});
CREATE INDEX aioworkers_records_expires ON {{s}}.aioworkers_records (expires);
CREATE TABLE {{s}}.aioworkers_state (
    kind text NOT NULL,
    key text NOT NULL,
    member text NOT NULL,
    value text,
    tokens float8,
    at float8,
    expires float8 NOT NULL,
    PRIMARY KEY (kind, key, member)
) WITH ({_JOBS_STORAGE});
CREATE INDEX aioworkers_state_expires ON {{s}}.aioworkers_state (expires);
-- A lease of key k for owner o if fewer than lim others hold one: the count and the write
-- under one lock of the key, in one round trip (each statement here sees the last commit).
CREATE FUNCTION {{s}}.aioworkers_acquire_lease(k text, o text, lim integer, secs float8)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('lease:' || k, 0));
    IF (SELECT count(*) FROM {{s}}.aioworkers_state AS t WHERE t.kind = 'lease'
        AND t.key = k AND t.member <> o AND t.expires > extract(epoch FROM now())) >= lim
    THEN
        RETURN false;
    END IF;
    INSERT INTO {{s}}.aioworkers_state AS t (kind, key, member, expires)
    VALUES ('lease', k, o, extract(epoch FROM now()) + secs)
    ON CONFLICT (kind, key, member) DO UPDATE SET expires = excluded.expires;
    RETURN true;
END $$;
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]{0,62}")

# One key for every migrating process of every schema: migrations are rare and short.
_MIGRATION_LOCK = 0x6169_6F77_6B72  # "aiowkr"

# The notification channel; its payload is the queue name (or "" for "look at every queue").
CHANNEL = "aioworkers_jobs"
MAX_PAYLOAD = 1000


# With ``?async_commit=on``: a condition that makes the statement's own transaction commit
# without waiting for its WAL to reach the disk (asynchronous commit). Only in the
# statements that move leases (take, extend, ack, release): if the server crashes, the last
# ~0.6 s of them (3x wal_writer_delay) may be forgotten, and those jobs are delivered
# again, finished ones too. Off by default: a job acknowledged stays acknowledged through
# a server crash. An uncorrelated subquery: evaluated once, before the first row,
# whatever the statement writes.
ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
DURABLE = "TRUE"


def _payload(column: str) -> str:
    """SQL for the notification payload of a queue: its name, or "" (any queue) if long."""
    return f"CASE WHEN octet_length({column}) <= {MAX_PAYLOAD} THEN {column} ELSE '' END"


def check_schema(name: str) -> str:
    """A schema name that needs no quoting (lowercase letters, digits, ``_``), or a
    `ConfigError`."""
    if not _IDENTIFIER.fullmatch(name):
        raise ConfigError(
            f"postgresql:// ?schema= must be a lowercase SQL name (letters, digits, _), got "
            f"{name!r}"
        )
    return name


class Statements:
    """The broker's statements, with the schema filled in. ``$n`` are asyncpg parameters."""

    def __init__(self, schema: str, *, async_commit: bool = False) -> None:
        s = check_schema(schema)
        commit = ASYNC_COMMIT if async_commit else DURABLE
        self.schema = s
        jobs, dead = f"{s}.aioworkers_jobs", f"{s}.aioworkers_dead"
        counts = f"{s}.aioworkers_counts"
        self.jobs = jobs
        self.version_table = f"{s}.aioworkers_schema"
        self.version = f"SELECT coalesce(max(version), 0) FROM {s}.aioworkers_schema"
        # $1 queue, $2 bodies, $3 delay seconds, $4 notification payload or NULL for none.
        self.publish = f"""
WITH added AS (
    INSERT INTO {jobs} (queue, body, visible_at)
    SELECT $1, body, now() + make_interval(secs => $3) FROM unnest($2::bytea[]) AS body
    RETURNING 1
), counted AS (
    INSERT INTO {counts} (queue, added) SELECT $1, count(*) FROM added
)
SELECT pg_notify('{CHANNEL}', $4) WHERE $4::text IS NOT NULL
"""
        # $1 queue, $2 max rows, $3 lease token, $4 lease seconds, $5 look ahead -> the
        # rows leased (id, body, count, NULL), and if fewer than $2 and $5, one more row
        # (NULL, NULL, NULL, seconds until the queue's next row becomes visible, or NULL).
        # The subquery leases the oldest ready rows that no other fetch holds a lock on right
        # now (SKIP LOCKED): fetches never wait for each other, and the row locks end with
        # this statement. The look ahead runs only when the ready rows ran out.
        self.take = f"""
WITH next AS MATERIALIZED (
    SELECT id FROM {jobs} WHERE queue = $1 AND visible_at <= now()
    ORDER BY visible_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE {jobs} AS j
    SET lease = $3, count = j.count + 1, visible_at = now() + make_interval(secs => $4)
    FROM next WHERE j.id = next.id
    RETURNING j.id, j.body, j.count
)
SELECT id, body, count, NULL::float8 FROM taken WHERE {commit}
UNION ALL
SELECT NULL, NULL, NULL, (
    SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM {jobs}
    WHERE queue = $1 AND visible_at > now()
) WHERE $5 AND (SELECT count(*) FROM taken) < $2
"""
        # $1 ids, $2 tokens -> the ids deleted.
        self.ack = f"""
WITH gone AS (
    DELETE FROM {jobs} AS j USING unnest($1::bigint[], $2::bigint[]) AS t(id, lease)
    WHERE j.id = t.id AND j.lease = t.lease
    RETURNING j.id, j.queue
), counted AS (
    INSERT INTO {counts} (queue, removed) SELECT queue, count(*) FROM gone GROUP BY queue
)
SELECT id FROM gone WHERE {commit}
"""
        # $1 ids -> those still there (under another lease: lost; the rest were acked).
        self.still_there = f"SELECT id FROM {jobs} WHERE id = ANY($1::bigint[])"
        # $1 ids, $2 tokens, $3 lease seconds -> (id, token) of those still ours (extended).
        self.extend = f"""
UPDATE {jobs} AS j SET visible_at = now() + make_interval(secs => $3)
FROM unnest($1::bigint[], $2::bigint[]) AS t(id, lease)
WHERE j.id = t.id AND j.lease = t.lease AND {commit}
RETURNING j.id, j.lease
"""
        # $1 ids, $2 tokens. Ready at once, first in line, and the delivery not counted;
        # the workers waiting on those queues are told.
        self.release = f"""
WITH back AS (
    UPDATE {jobs} AS j
    SET lease = NULL, visible_at = '-infinity', count = greatest(j.count - 1, 0)
    FROM unnest($1::bigint[], $2::bigint[]) AS t(id, lease)
    WHERE j.id = t.id AND j.lease = t.lease
    RETURNING j.queue
)
SELECT queue, pg_notify('{CHANNEL}', {_payload("queue")}) IS NULL
FROM (SELECT DISTINCT queue FROM back) AS q WHERE {commit}
"""
        # $1 id, $2 token, $3 new body, $4 delay seconds -> the new id, or no row if the
        # delivery is no longer ours.
        self.retry = f"""
WITH gone AS (
    DELETE FROM {jobs} WHERE id = $1 AND lease = $2 RETURNING queue
), added AS (
    INSERT INTO {jobs} (queue, body, visible_at)
    SELECT queue, $3, now() + make_interval(secs => $4) FROM gone
    RETURNING id, queue
), counted AS (
    INSERT INTO {counts} (queue, added, removed) SELECT queue, 1, 1 FROM gone
), woken AS (
    SELECT pg_notify('{CHANNEL}', {_payload("queue")}) FROM added WHERE $4 <= 0
)
SELECT id, queue, (SELECT count(*) FROM woken) FROM added
"""
        # $1 id, $2 token, $3 facts -> the dead entry, or no row if the delivery is no
        # longer ours. One statement: the letter exists exactly when the original is gone.
        self.dead_letter = f"""
WITH gone AS (
    DELETE FROM {jobs} WHERE id = $1 AND lease = $2 RETURNING queue, body
), kept AS (
    INSERT INTO {dead} (queue, body, facts) SELECT queue, body, $3::jsonb FROM gone
    RETURNING entry, queue
), counted AS (
    INSERT INTO {counts} (queue, removed, dead) SELECT queue, 1, 1 FROM gone
)
SELECT entry FROM kept
"""
        # $1 queue, $2 body, $3 facts.
        self.send_dead_letter = f"""
WITH kept AS (
    INSERT INTO {dead} (queue, body, facts) VALUES ($1, $2, $3::jsonb) RETURNING queue
)
INSERT INTO {counts} (queue, dead) SELECT queue, 1 FROM kept
"""
        # $1 queue. Range counts on the indexes.
        self.depth = f"""
SELECT
    (SELECT count(*) FROM {jobs} WHERE queue = $1 AND visible_at <= now()),
    (SELECT count(*) FROM {jobs} WHERE queue = $1 AND visible_at > now()),
    (SELECT count(*) FROM {jobs} WHERE queue = $1 AND visible_at > now() AND lease IS NOT NULL),
    (SELECT count(*) FROM {dead} WHERE queue = $1)
"""
        # Moves every committed delta into the totals, in one statement.
        self.fold = f"""
WITH moved AS (
    DELETE FROM {counts} RETURNING queue, added, removed, dead
), summed AS (
    SELECT queue, sum(added) AS added, sum(removed) AS removed, sum(dead) AS dead
    FROM moved GROUP BY queue
)
INSERT INTO {s}.aioworkers_totals AS t (queue, added, removed, dead)
SELECT queue, added, removed, dead FROM summed
ON CONFLICT (queue) DO UPDATE SET
    added = t.added + excluded.added,
    removed = t.removed + excluded.removed,
    dead = t.dead + excluded.dead
"""
        self.totals = f"SELECT added, removed, dead FROM {s}.aioworkers_totals WHERE queue = $1"
        self.dead_letters = (
            f"SELECT entry, body, facts::text FROM {dead} WHERE queue = $1 ORDER BY entry LIMIT $2"
        )
        # Dead-letter pages: keyset on (queue, entry); $2 the cursor, $3 the rows read.
        letters = f"SELECT entry, body, facts::text FROM {dead} WHERE queue = $1"
        self.dead_page_older = f"{letters} AND entry < $2 ORDER BY entry DESC LIMIT $3"
        self.dead_page_newer = f"{letters} AND entry > $2 ORDER BY entry LIMIT $3"
        self.dead_newer_exists = (
            f"SELECT EXISTS (SELECT 1 FROM {dead} WHERE queue = $1 AND entry >= $2)"
        )
        self.dead_older_exists = (
            f"SELECT EXISTS (SELECT 1 FROM {dead} WHERE queue = $1 AND entry <= $2)"
        )
        self.dead_by_id = f"{letters} AND entry = ANY($2::bigint[]) ORDER BY entry"
        self.remove_dead = f"DELETE FROM {dead} WHERE queue = $1 AND entry = ANY($2::bigint[])"
        self.purge_dead = f"DELETE FROM {dead} WHERE queue = $1"
        self.vacuum = f"VACUUM (SKIP_LOCKED) {jobs}, {counts}"

    def migration(self, m: Migration) -> str:
        return m.sql.format(s=self.schema)

    def create_version_table(self) -> str:
        return f"""
CREATE SCHEMA IF NOT EXISTS {self.schema};
CREATE TABLE IF NOT EXISTS {self.version_table} (
    version integer PRIMARY KEY,
    what text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

    def record_migration(self) -> str:
        return f"INSERT INTO {self.version_table} (version, what) VALUES ($1, $2)"


def migration_lock() -> int:
    return _MIGRATION_LOCK
