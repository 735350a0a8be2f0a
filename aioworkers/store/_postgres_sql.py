"""The PostgreSQL store's statements (its tables come from the broker's migration 2, see
`aioworkers.brokers._postgres_sql`). Every row has the epoch second it expires, on the
server's clock; a lapsed row counts as absent, and is swept later in bounded batches.
``$n`` are asyncpg parameters."""

from __future__ import annotations

from ..brokers._postgres_sql import check_schema

# The server's clock, epoch seconds. ``now()`` is the start of the transaction: stable
# within a statement, so comparisons with it can use the indexes.
NOW = "extract(epoch FROM now())::float8"
# The wall clock at the moment it is read: for `complete_in`, which runs inside the
# application's transaction, begun maybe long before.
CLOCK = "extract(epoch FROM clock_timestamp())::float8"

CHANNEL = "aioworkers_store"  # notifications of ended jobs; the payload is the job id

JOB_COLUMNS = (
    "id",
    "task",
    "queue",
    "status",
    "attempt",
    "enqueued_at",
    "started_at",
    "finished_at",
    "error_type",
    "error",
    "traceback",
    "result",
    "result_error",
)
_OUTCOME = ("error_type", "error", "traceback", "result", "result_error")


class StoreStatements:
    """The store's statements, with the schema filled in."""

    def __init__(self, schema: str) -> None:
        s = check_schema(schema)
        keys, records, state = (
            f"{s}.aioworkers_keys",
            f"{s}.aioworkers_records",
            f"{s}.aioworkers_state",
        )
        self.tables = (keys, records, state)
        held = f"key = $1 AND owner = $2 AND expires > {NOW}"
        # -- idempotency claims -------------------------------------------------------------
        # $1 key, $2 owner, $3 lease -> a row if claimed. A conflicting row is locked by the
        # statement even when it is not updated, so the read after it sees its latest state.
        self.claim = f"""
INSERT INTO {keys} AS k (key, owner, expires) VALUES ($1, $2, {NOW} + $3)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE k.expires <= {NOW}
RETURNING true
"""
        # $1 key -> (owner,) of a live row (owner NULL: done), or no row.
        self.claim_read = f"SELECT owner FROM {keys} WHERE key = $1 AND expires > {NOW}"
        # $1 keys, $2 owners, $3 lease -> (key, owner) of those still held (extended).
        self.extend = f"""
UPDATE {keys} AS k SET expires = {NOW} + $3
FROM unnest($1::text[], $2::text[]) AS t(key, owner)
WHERE k.key = t.key AND k.owner = t.owner AND k.expires > {NOW}
RETURNING k.key, k.owner
"""
        self.complete = (
            f"UPDATE {keys} SET owner = NULL, expires = {NOW} + $3 WHERE {held} RETURNING true"
        )
        self.complete_in = (
            f"UPDATE {keys} SET owner = NULL, expires = {CLOCK} + $3 "
            f"WHERE key = $1 AND owner = $2 AND expires > {CLOCK} RETURNING true"
        )
        self.release = f"DELETE FROM {keys} WHERE {held} RETURNING true"
        # -- job records --------------------------------------------------------------------
        n = len(JOB_COLUMNS)
        columns = ", ".join(JOB_COLUMNS)
        values = ", ".join(f"${i}" for i in range(1, n + 1))
        replace = ", ".join(f"{c} = excluded.{c}" for c in (*JOB_COLUMNS[1:], "expires"))
        # $1..$13 the record, $14 ttl: written whole.
        self.put = f"""
INSERT INTO {records} AS r ({columns}, expires) VALUES ({values}, {NOW} + ${n + 1})
ON CONFLICT (id) DO UPDATE SET {replace}
"""
        # The same, only over a lapsed row: a finish creating a missing record.
        self.create = f"{self.put} WHERE r.expires <= {NOW} RETURNING true"
        self.get = f"SELECT {columns} FROM {records} WHERE id = $1 AND expires > {NOW}"
        # $1 ids -> (id, status) of the live ones, locked, in one order (no deadlocks).
        self.lock = (
            f"SELECT id, status FROM {records} WHERE id = ANY($1::text[]) "
            f"AND expires > {NOW} ORDER BY id FOR UPDATE"
        )
        # $1 id, $2 status, $3 attempt, $4 started_at, $5 error_type, $6 error,
        # $7 traceback, $8 ttl: each field given (not NULL) is set.
        self.update = f"""
UPDATE {records} SET status = coalesce($2, status), attempt = coalesce($3, attempt),
    started_at = coalesce($4, started_at), error_type = coalesce($5, error_type),
    error = coalesce($6, error), traceback = coalesce($7, traceback),
    expires = {NOW} + $8
WHERE id = $1
"""
        outcome = ", ".join(f"{c} = ${i}" for i, c in enumerate(_OUTCOME, start=5))
        # $1 id, $2 status, $3 finished_at, $4 attempt or NULL, $5..$9 outcome, $10 ttl.
        self.end = f"""
UPDATE {records} SET status = $2, finished_at = $3, attempt = coalesce($4, attempt),
    {outcome}, expires = {NOW} + $10
WHERE id = $1
"""
        cleared = ", ".join(f"{c} = NULL" for c in _OUTCOME)
        self.cancel_record = (
            f"UPDATE {records} SET status = 'cancelled', finished_at = {NOW}, {cleared} "
            "WHERE id = $1"
        )
        self.notify = f"SELECT pg_notify('{CHANNEL}', id) FROM unnest($1::text[]) AS id"
        # -- marks, slots, unique keys, leases, buckets ------------------------------------
        live = f"kind = $1 AND key = $2 AND member = $3 AND expires > {NOW}"
        # $1 kind, $2 key, $3 member, $4 value, $5 tokens, $6 at, $7 ttl.
        self.state_put = f"""
INSERT INTO {state} AS s (kind, key, member, value, tokens, at, expires)
VALUES ($1, $2, $3, $4, $5, $6, {NOW} + $7)
ON CONFLICT (kind, key, member) DO UPDATE SET
    value = excluded.value, tokens = excluded.tokens, at = excluded.at,
    expires = excluded.expires
"""
        # Only over a lapsed row (a slot, a unique key), or one of the same value (a
        # unique key held again by its job): a row if written.
        self.state_take = (
            f"{self.state_put} WHERE s.expires <= {NOW} OR s.value = excluded.value RETURNING true"
        )
        self.state_get = f"SELECT value, tokens, at FROM {state} WHERE {live}"
        self.state_delete = f"DELETE FROM {state} WHERE {live} RETURNING true"
        self.unique_free = f"DELETE FROM {state} WHERE {live} AND value = $4 RETURNING true"
        self.cancelled = (
            f"SELECT key FROM {state} WHERE kind = 'cancel' AND member = '' "
            f"AND key = ANY($1::text[]) AND expires > {NOW}"
        )
        # $1 keys, $2 owners, $3 lease -> (key, owner) of those still held (extended).
        self.extend_leases = f"""
UPDATE {state} AS s SET expires = {NOW} + $3
FROM unnest($1::text[], $2::text[]) AS t(key, member)
WHERE s.kind = 'lease' AND s.key = t.key AND s.member = t.member AND s.expires > {NOW}
RETURNING s.key, s.member
"""
        # $1 key, $2 owner, $3 limit, $4 lease -> whether $2 holds a lease now.
        self.acquire_lease = f"SELECT {s}.aioworkers_acquire_lease($1, $2, $3, $4)"
        # Serializes the read-compute-write of one key's bucket across processes.
        self.lock_key = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        self.now = f"SELECT {NOW}"
        # -- the worker registry: rows of kind 'worker' (key: the id, value: the info, at:
        # when first put). $1 id, $2 info, $3 ttl; a lapsed row is replaced whole.
        self.worker_put = f"""
INSERT INTO {state} AS w (kind, key, member, value, at, expires)
VALUES ('worker', $1, '', $2, {NOW}, {NOW} + $3)
ON CONFLICT (kind, key, member) DO UPDATE SET
    value = excluded.value,
    expires = excluded.expires,
    at = CASE WHEN w.expires > {NOW} THEN w.at ELSE excluded.at END
"""
        self.workers_live = (
            f"SELECT value FROM {state} WHERE kind = 'worker' AND expires > {NOW} "
            "ORDER BY at, key LIMIT $1"
        )
        self.worker_forget = (
            f"DELETE FROM {state} WHERE kind = 'worker' AND key = $1 AND member = '' "
            f"AND expires > {NOW} RETURNING true"
        )
        # -- the sweep: $1 rows at most per statement; rows locked by others are left --------
        self.sweep = tuple(
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {table} WHERE expires <= {NOW} LIMIT $1 FOR UPDATE SKIP LOCKED))"
            for table in self.tables
        )
