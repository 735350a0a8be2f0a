"""Store conformance checks: job records, waiting for a job to end, cancel marks."""

from __future__ import annotations

import asyncio
import time

from ..store import open_store
from ..store.base import JobFinish, JobRecord, JobUpdate
from ._store_exercise import StoreExercise, store_check

RESULT = b'{"ok": true, "raw": "\x00\xff"}'


@store_check()
async def check_job_records_round_trip(ex: StoreExercise) -> None:
    """Every field of a record comes back as written (binary result, unicode text);
    unknown ids are None; a batch writes every record."""
    s, job = ex.store, ex.name("job")
    full = JobRecord(
        job,
        "send_email",
        "emails",
        "failed",
        attempt=4,
        enqueued_at=1_700_000_000.125,
        started_at=1_700_000_001.5,
        finished_at=1_700_000_002.75,
        error_type="ValueError",
        error="bad address: ünïcode ✉",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad\n",
        result=RESULT,
        result_error="too large",
    )
    await s.put_job(full, ttl=60)
    assert await s.get_job(job) == full
    assert await s.get_job(ex.name("job")) is None
    batch = [ex.record(ex.name("job"), status="delayed") for _ in range(3)]
    await s.put_jobs(batch, ttl=60)
    assert [await s.get_job(r.id) for r in batch] == batch
    await s.put_jobs([], ttl=60)


@store_check()
async def check_a_put_replaces_a_record_whole(ex: StoreExercise) -> None:
    """A put replaces the record, an ended one too (a replayed dead letter is queued
    again): fields it does not give are gone."""
    s, job = ex.store, ex.name("job")
    await s.put_job(ex.record(job, "failed", error="boom", result=b"x", attempt=3), ttl=60)
    again = ex.record(job)
    await s.put_job(again, ttl=60)
    assert await s.get_job(job) == again


@store_check()
async def check_updates_change_jobs_that_have_not_ended(ex: StoreExercise) -> None:
    """An update sets the fields it gives on a record that has not ended (and is in
    ``expect``) and returns the status before; a missing or ended record is not
    changed, nor created."""
    s, job, missing = ex.store, ex.name("job"), ex.name("job")
    await s.put_job(ex.record(job), ttl=60)
    start = JobUpdate(job, ttl=60, status="running", attempt=1, started_at=1_700_000_003.0)
    assert await s.update_job(start) == "queued"
    assert await s.get_job(job) == ex.record(job, "running", started_at=1_700_000_003.0)
    waiting = JobUpdate(job, ttl=60, status="retrying", attempt=2, error="boom", error_type="E")
    assert await s.update_job(waiting) == "running"
    record = await s.get_job(job)
    assert record is not None
    assert (record.status, record.attempt, record.error, record.started_at) == (
        "retrying",
        2,
        "boom",
        1_700_000_003.0,
    )
    only_queued = JobUpdate(job, ttl=60, status="running", expect=frozenset({"queued"}))
    assert await s.update_job(only_queued) == "retrying"
    assert (await s.get_job(job)) == record
    assert await s.update_job(JobUpdate(missing, ttl=60, status="running")) is None
    assert await s.get_job(missing) is None
    await s.finish_jobs([JobFinish(job, "succeeded", ttl=60, finished_at=1.0)])
    assert await s.update_job(JobUpdate(job, ttl=60, status="running")) == "succeeded"
    ended = await s.get_job(job)
    assert ended is not None
    assert ended.status == "succeeded"
    assert await s.update_jobs([]) == []


@store_check()
async def check_a_finish_ends_a_job_once(ex: StoreExercise) -> None:
    """The first finish wins: it replaces the outcome (an earlier attempt's error is
    gone) and returns the status before; a later one changes nothing and returns the
    final status. A finish of a missing record creates it."""
    s, job, lost = ex.store, ex.name("job"), ex.name("job")
    await s.put_job(ex.record(job, "running", error="attempt 1 failed", error_type="E"), ttl=60)
    ok = JobFinish(job, "succeeded", ttl=60, finished_at=1_700_000_009.5, attempt=2, result=RESULT)
    failed = JobFinish(job, "failed", ttl=60, finished_at=2.0, error="late", error_type="E")
    assert await s.finish_jobs([ok]) == ["running"]
    assert await s.finish_jobs([failed]) == ["succeeded"]
    expected = ex.record(job, "succeeded", attempt=2, finished_at=1_700_000_009.5, result=RESULT)
    assert await s.get_job(job) == expected
    made = JobFinish(lost, "failed", ttl=60, finished_at=3.0, task="t", queue="q", error="x")
    assert await s.finish_jobs([made]) == [None]
    assert await s.get_job(lost) == JobRecord(lost, "t", "q", "failed", finished_at=3.0, error="x")
    assert await s.finish_jobs([]) == []


@store_check()
async def check_batches_of_records_keep_their_order(ex: StoreExercise) -> None:
    """Five hundred records put, started and finished in one call each: every answer
    in the order of the batch."""
    s = ex.store
    ids = [ex.name("job") for _ in range(500)]
    await s.put_jobs([ex.record(i) for i in ids], ttl=60)
    await s.finish_jobs([JobFinish(i, "cancelled", ttl=60, finished_at=1.0) for i in ids[::2]])
    before = await s.update_jobs([JobUpdate(i, ttl=60, status="running") for i in ids])
    assert before == [("cancelled" if n % 2 == 0 else "queued") for n in range(500)]
    ends = [JobFinish(i, "succeeded", ttl=60, finished_at=2.0, result=i.encode()) for i in ids]
    assert await s.finish_jobs(ends) == [
        ("cancelled" if n % 2 == 0 else "running") for n in range(500)
    ]
    last = await s.get_job(ids[-1])
    assert last is not None
    assert last.result == ids[-1].encode()


@store_check()
async def check_job_records_expire_after_their_ttl(ex: StoreExercise) -> None:
    """A record lives for the TTL of its last write (put, update or finish)."""
    s, put, updated, ended = ex.store, ex.name("job"), ex.name("job"), ex.name("job")
    await s.put_jobs([ex.record(j) for j in (put, updated, ended)], ttl=ex.ttl)
    await s.update_job(JobUpdate(updated, ttl=60, status="running"))
    await s.finish_jobs([JobFinish(ended, "succeeded", ttl=60, finished_at=1.0)])
    await ex.lapse()
    assert await s.get_job(put) is None
    assert await s.get_job(updated) is not None
    assert await s.get_job(ended) is not None
    assert await s.update_job(JobUpdate(put, ttl=60, status="running")) is None


@store_check()
async def check_waits_end_at_once_for_ended_and_unknown_jobs(ex: StoreExercise) -> None:
    """A wait returns an ended record at once, and None at once for an unknown id."""
    s, job = ex.store, ex.name("job")
    await s.put_job(ex.record(job, "succeeded", result=RESULT), ttl=60)
    record = await asyncio.wait_for(s.wait_job(job, timeout=30), 5)
    assert record is not None
    assert record.result == RESULT
    assert await asyncio.wait_for(s.wait_job(ex.name("job"), timeout=30), 5) is None


@store_check()
async def check_a_wait_wakes_every_waiter_when_the_job_ends(ex: StoreExercise) -> None:
    """Five waiters of a running job all get its record soon after it ends."""
    s, job = ex.store, ex.name("job")
    await s.put_job(ex.record(job, "running"), ttl=60)
    waiters = [asyncio.create_task(s.wait_job(job, timeout=30)) for _ in range(5)]
    await ex.started(job)
    assert not any(w.done() for w in waiters)
    await s.finish_jobs([JobFinish(job, "failed", ttl=60, finished_at=1.0, error="boom")])
    # Not a latency benchmark: a second is far more than a poll step of any store.
    _, late = await asyncio.wait(waiters, timeout=1.0)
    for waiter in late:
        waiter.cancel()
    assert not late, f"{len(late)} of 5 waiters still waiting a second after the job ended"
    records = [w.result() for w in waiters]
    assert {(r.status, r.error) for r in records if r is not None} == {("failed", "boom")}
    assert len(records) == 5


@store_check()
async def check_a_wait_times_out(ex: StoreExercise) -> None:
    """A job that does not end within the wait's timeout: `TimeoutError`."""
    s, job = ex.store, ex.name("job")
    await s.put_job(ex.record(job, "running"), ttl=60)
    waiter = asyncio.create_task(s.wait_job(job, timeout=ex.ttl))
    await ex.started(job)
    await ex.elapse(ex.ttl + ex.slack, sleepers=1)
    try:
        await asyncio.wait_for(waiter, 10)
    except TimeoutError:
        return
    raise AssertionError("the wait did not time out")


@store_check()
async def check_a_wait_ends_when_the_record_expires(ex: StoreExercise) -> None:
    """A record that expires while waited on ends the wait with None (result expired)."""
    s, job = ex.store, ex.name("job")
    await s.put_job(ex.record(job, "running"), ttl=ex.ttl)
    waiter = asyncio.create_task(s.wait_job(job, timeout=None))
    await ex.started(job)
    await ex.elapse(ex.ttl + ex.slack, sleepers=1)
    # On a real clock, the waiter notices at its next look (a few seconds at most).
    assert await asyncio.wait_for(waiter, 10) is None


@store_check(needs_url=True)
async def check_a_wait_wakes_when_another_client_ends_the_job(ex: StoreExercise) -> None:
    """A waiter on a second client (as in another process) wakes when the job ends."""
    assert ex.url is not None
    s, job = ex.store, ex.name("job")
    other = open_store(ex.url)
    try:
        await s.put_job(ex.record(job, "running"), ttl=60)
        waiter = asyncio.create_task(other.wait_job(job, timeout=30))
        await ex.started(job)
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await s.finish_jobs([JobFinish(job, "succeeded", ttl=60, finished_at=1.0)])
        ended = time.monotonic()
        record = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - ended < 1.0
        assert record is not None
        assert record.status == "succeeded"
    finally:
        await other.aclose()


@store_check()
async def check_cancel_marks(ex: StoreExercise) -> None:
    """A job not started yet is cancelled at once (its waiters wake, a start finds it
    cancelled); a running one is only marked; an ended one is not marked (False); an id
    without a record is marked, unless ``known_only``; marks are read in one call and
    expire."""
    s = ex.store
    queued, running, ended, bare = (ex.name("job") for _ in range(4))
    await s.put_jobs([ex.record(queued), ex.record(running, "running")], ttl=60)
    await s.put_job(ex.record(ended, "succeeded", result=RESULT), ttl=60)
    waiter = asyncio.create_task(s.wait_job(queued, timeout=30))
    await ex.started(queued)
    assert await s.mark_cancelled(queued, ttl=ex.ttl) is True
    record = await asyncio.wait_for(waiter, 5)
    assert record is not None
    assert (record.status, record.result, record.finished_at is not None) == (
        "cancelled",
        None,
        True,
    )
    assert await s.update_job(JobUpdate(queued, ttl=60, status="running")) == "cancelled"
    assert await s.mark_cancelled(running, ttl=ex.ttl) is True
    still = await s.get_job(running)
    assert still is not None
    assert still.status == "running"
    assert await s.mark_cancelled(ended, ttl=ex.ttl) is False
    assert await s.mark_cancelled(ended, ttl=ex.ttl, known_only=True) is False
    unknown = ex.name("job")
    assert await s.mark_cancelled(unknown, ttl=60, known_only=True) is False
    assert await s.mark_cancelled(running, ttl=ex.ttl, known_only=True) is True
    assert await s.mark_cancelled(bare, ttl=ex.ttl) is True
    assert await s.get_job(bare) is None
    watched = [queued, running, ended, bare, unknown]
    assert await s.cancelled(watched) == {queued, running, bare}
    assert await s.cancelled([]) == set()
    await ex.lapse()
    assert await s.cancelled(watched) == set()
    # The record that ended by the cancel outlives the mark.
    assert (await s.get_job(queued)) == record


@store_check()
async def check_a_cancel_racing_the_end_of_a_job_has_one_winner(ex: StoreExercise) -> None:
    """A job's success and its cancel at once: the record ends as exactly the one that
    came first, and the other learns it lost."""
    s = ex.store
    for _ in range(20):
        job = ex.name("job")
        await s.put_job(ex.record(job, "retrying"), ttl=60)
        ok = JobFinish(job, "succeeded", ttl=60, finished_at=1.0, result=RESULT)
        finished, marked = await asyncio.gather(s.finish_jobs([ok]), s.mark_cancelled(job, ttl=60))
        record = await s.get_job(job)
        assert record is not None
        if record.status == "succeeded":
            assert (finished, marked) == (["retrying"], False)
        else:
            assert record.status == "cancelled"
            assert (finished, marked) == (["cancelled"], True)


@store_check()
async def check_many_cancel_marks_read_in_one_call(ex: StoreExercise) -> None:
    """Two thousand jobs in flight, one call: exactly the marked ones."""
    s = ex.store
    ids = [ex.name("job") for _ in range(2000)]
    for job in ids[::7]:
        await s.mark_cancelled(job, ttl=60)
    assert await s.cancelled(ids) == set(ids[::7])
