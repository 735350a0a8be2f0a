"""A job as the dashboard shows it, from its record in the state store, and its cancel."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from ..app import App
from ..errors import AioworkersError, ConfigError, redact
from ..store import JobRecord

RESULT_LIMIT = 20_000  # characters of a result shown
_JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_id(job_id: str) -> bool:
    """Job ids are short and plain; anything else is no job (and never reaches a store)."""
    return _JOB_ID.fullmatch(job_id) is not None


@dataclass(frozen=True, slots=True)
class JobView:
    id: str
    record: JobRecord | None
    result: str | None = None
    error: str | None = None  # why the record could not be read
    times: tuple[tuple[str, str], ...] = ()


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")


def _times(r: JobRecord) -> tuple[tuple[str, str], ...]:
    rows = [("enqueued", _when(r.enqueued_at)), ("started", _when(r.started_at))]
    rows.append(("finished", _when(r.finished_at)))
    if r.enqueued_at is not None and r.started_at is not None:
        rows.append(("waited", f"{max(r.started_at - r.enqueued_at, 0):.3f} s"))
    if r.started_at is not None and r.finished_at is not None:
        rows.append(("ran", f"{max(r.finished_at - r.started_at, 0):.3f} s"))
    return tuple((name, value) for name, value in rows if value)


def _result(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = raw.decode(errors="replace")
    return redact(text, RESULT_LIMIT)


async def read_job(app: App, job_id: str) -> JobView:
    try:
        record = await app.store.get_job(job_id)
    except ConfigError as exc:
        return JobView(job_id, None, error=redact(str(exc), 500))
    except (AioworkersError, OSError) as exc:
        return JobView(job_id, None, error=redact(f"{type(exc).__name__}: {exc}", 300))
    if record is None:
        return JobView(job_id, None)
    return JobView(job_id, record, _result(record.result), times=_times(record))


async def cancel(app: App, job_id: str) -> bool:
    """`App.cancel`: True if the job had not finished (see `JobHandle.cancel`)."""
    return await app.cancel(job_id)
