"""The SQLite store's tables and statements. Every row has the wall-clock time it expires;
a lapsed row counts as absent, and is swept later in bounded batches."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS aioworkers_idempotency (
    key TEXT PRIMARY KEY,
    owner TEXT,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aioworkers_idempotency_expires ON aioworkers_idempotency (expires);
CREATE TABLE IF NOT EXISTS aioworkers_jobs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    enqueued_at REAL,
    started_at REAL,
    finished_at REAL,
    error_type TEXT,
    error TEXT,
    traceback TEXT,
    result BLOB,
    result_error TEXT,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aioworkers_jobs_expires ON aioworkers_jobs (expires);
CREATE TABLE IF NOT EXISTS aioworkers_state (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    value TEXT,
    tokens REAL,
    at REAL,
    expires REAL NOT NULL,
    PRIMARY KEY (kind, key, member)
);
CREATE INDEX IF NOT EXISTS aioworkers_state_expires ON aioworkers_state (expires);
"""
# aioworkers_state rows by kind: 'cancel' (key: job id), 'slot' (key: name and slot),
# 'unique' (value: the holder's job id), 'lease' (member: its owner), 'bucket' (tokens, at),
# 'worker' (key: the worker id; value: its info; at: when first put).

TABLES = ("aioworkers_idempotency", "aioworkers_jobs", "aioworkers_state")
SWEEP = {
    table: f"DELETE FROM {table} WHERE rowid IN "
    f"(SELECT rowid FROM {table} WHERE expires <= ? LIMIT ?)"
    for table in TABLES
}

# -- idempotency claims ----------------------------------------------------------------------
HELD = "key = ? AND owner = ? AND expires > ?"
CLAIM_READ = "SELECT owner FROM aioworkers_idempotency WHERE key = ? AND expires > ?"
CLAIM_WRITE = "INSERT OR REPLACE INTO aioworkers_idempotency (key, owner, expires) VALUES (?, ?, ?)"
CLAIM_EXTEND = f"UPDATE aioworkers_idempotency SET expires = ? WHERE {HELD}"
CLAIM_RELEASE = f"DELETE FROM aioworkers_idempotency WHERE {HELD}"
CLAIM_COMPLETE = f"UPDATE aioworkers_idempotency SET owner = NULL, expires = ? WHERE {HELD}"

# -- job records -------------------------------------------------------------------------------
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
JOB_GET = f"SELECT {', '.join(JOB_COLUMNS)} FROM aioworkers_jobs WHERE id = ? AND expires > ?"
JOB_PUT = (
    f"INSERT OR REPLACE INTO aioworkers_jobs ({', '.join(JOB_COLUMNS)}, expires) "
    f"VALUES ({', '.join('?' * (len(JOB_COLUMNS) + 1))})"
)
JOB_STATUS = "SELECT status FROM aioworkers_jobs WHERE id = ? AND expires > ?"
JOB_END = (
    "UPDATE aioworkers_jobs SET status = ?, finished_at = ?, attempt = coalesce(?, attempt), "
    "error_type = ?, error = ?, traceback = ?, result = ?, result_error = ?, expires = ? "
    "WHERE id = ?"
)
JOB_CANCEL = (
    "UPDATE aioworkers_jobs SET status = 'cancelled', finished_at = ?, error_type = NULL, "
    "error = NULL, traceback = NULL, result = NULL, result_error = NULL WHERE id = ?"
)
# The fields a JobUpdate may set (names of its attributes and of the columns).
UPDATABLE = ("status", "attempt", "started_at", "error_type", "error", "traceback")

# -- marks, slots, unique keys, leases, buckets -------------------------------------------------
LIVE = "kind = ? AND key = ? AND member = ? AND expires > ?"
STATE_GET = f"SELECT value FROM aioworkers_state WHERE {LIVE}"
STATE_PUT = (
    "INSERT OR REPLACE INTO aioworkers_state (kind, key, member, value, tokens, at, expires) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
STATE_DELETE = f"DELETE FROM aioworkers_state WHERE {LIVE}"
STATE_EXTEND = f"UPDATE aioworkers_state SET expires = ? WHERE {LIVE}"
UNIQUE_FREE = f"{STATE_DELETE} AND value = ?"
CANCELLED = "SELECT key FROM aioworkers_state WHERE kind = 'cancel' AND expires > ? AND key IN ({})"
LEASES_DROP_LAPSED = (
    "DELETE FROM aioworkers_state WHERE kind = 'lease' AND key = ? AND expires <= ?"
)
LEASES_HELD = "SELECT member FROM aioworkers_state WHERE kind = 'lease' AND key = ?"
BUCKET_GET = f"SELECT tokens, at FROM aioworkers_state WHERE {LIVE}"

# -- the worker registry -------------------------------------------------------------------------
# ? id, info, now, expires. A lapsed row (not swept yet) is replaced whole: back, it is new.
WORKER_PUT = """
INSERT INTO aioworkers_state AS w (kind, key, member, value, at, expires)
VALUES ('worker', ?1, '', ?2, ?3, ?4)
ON CONFLICT (kind, key, member) DO UPDATE SET
    value = excluded.value,
    expires = excluded.expires,
    at = CASE WHEN w.expires > ?3 THEN w.at ELSE excluded.at END
"""
WORKERS_LIVE = (
    "SELECT value FROM aioworkers_state WHERE kind = 'worker' AND expires > ? "
    "ORDER BY at, key LIMIT ?"
)
WORKER_FORGET = "DELETE FROM aioworkers_state WHERE kind = 'worker' AND key = ? AND expires > ?"
