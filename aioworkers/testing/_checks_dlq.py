"""Conformance checks: dead letters, depth, and the optional capabilities."""

from __future__ import annotations

import re
from pathlib import Path

from ..brokers.base import (
    DeadLetterAdmin,
    DeadLetterPages,
    DeadLetterWriter,
    FileBacked,
    MessagingSystem,
    QueueDepth,
    Totals,
)
from ._exercise import EMPTY, Exercise, check, letter


@check()
async def check_dead_letter_stores_the_entry_and_removes_the_original(ex: Exercise) -> None:
    """``dead_letter`` keeps the entry with every field (read back with
    ``DeadLetterAdmin``) and removes the original for good."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"poison", b"fine"])
    got = await ex.fetch_n(queue, 2, within=ex.slack + 1)
    poison = next(d for d in got if d.body == b"poison")
    fine = next(d for d in got if d.body == b"fine")

    before = ex.wall_times()
    await broker.dead_letter(poison, letter())
    after = ex.wall_times()
    if isinstance(broker, DeadLetterAdmin):
        (entry,) = await broker.dead_letters(queue)
        assert (entry.id, entry.task, entry.reason, entry.attempts) == (
            "job-1",
            "send_email",
            "max_retries",
            4,
        )
        assert (entry.error, entry.error_type) == ("ValueError: boom", "ValueError")
        assert entry.traceback == "Traceback (most recent call last):\nValueError: boom\n"
        assert entry.body == b"poison"
        assert entry.queue == queue
        assert entry.entry_id
        windows = zip(before, after, strict=True)
        assert any(lo - 1 <= entry.dead_at <= hi + 1 for lo, hi in windows), entry.dead_at
    await ex.wait_depth(queue, QueueDepth(in_flight=1, dead=1))

    await broker.ack([fine])
    # The original is gone: its lease running out brings nothing back.
    assert await ex.drain(queue, duration=ex.lease + ex.slack) == []
    await ex.wait_depth(queue, QueueDepth(dead=1))


@check(DeadLetterAdmin)
async def check_dead_letters_list_with_limit_and_remove(ex: Exercise) -> None:
    """Dead letters list oldest first up to ``limit``, per queue; removal by entry id or
    all at once reports how many went."""
    broker, queue = ex.broker, ex.queue
    assert isinstance(broker, DeadLetterAdmin)
    await broker.publish(queue, [b"1", b"2", b"3"])
    got = await ex.fetch_n(queue, 3, within=ex.slack + 1)
    for job_id, d in zip(["a", "b", "c"], sorted(got, key=lambda d: d.body), strict=True):
        await broker.dead_letter(d, letter(job_id))

    everything = await broker.dead_letters(queue)
    assert [e.id for e in everything] == ["a", "b", "c"]
    assert [e.body for e in everything] == [b"1", b"2", b"3"]
    assert len({e.entry_id for e in everything}) == 3
    assert [e.id for e in await broker.dead_letters(queue, limit=2)] == ["a", "b"]
    assert [e.id for e in await broker.dead_letters(queue, limit=1)] == ["a"]
    await ex.wait_depth(queue, QueueDepth(dead=3))

    other = ex.case.queue()
    assert await broker.dead_letters(other) == []
    assert await broker.remove_dead_letters(other, None) == 0

    entry_b = everything[1].entry_id
    assert await broker.remove_dead_letters(queue, [entry_b, "no-such-entry"]) == 1
    assert await broker.remove_dead_letters(queue, [entry_b]) == 0
    assert [e.id for e in await broker.dead_letters(queue)] == ["a", "c"]
    await ex.wait_depth(queue, QueueDepth(dead=2))

    assert await broker.remove_dead_letters(queue, None) == 2
    assert await broker.dead_letters(queue) == []
    assert await broker.remove_dead_letters(queue, None) == 0
    await ex.wait_depth(queue, EMPTY)


@check(DeadLetterAdmin, DeadLetterPages)
async def check_dead_letter_pages_walk_both_ways_by_cursor(ex: Exercise) -> None:
    """``DeadLetterPages``: pages newest first, ``older`` / ``newer`` cursors that reach
    both ends and are None there, a cursor whose entry was removed still works, entries
    read back by id oldest first, and a malformed cursor is a ValueError."""
    broker, queue = ex.broker, ex.queue
    assert isinstance(broker, DeadLetterAdmin)
    assert isinstance(broker, DeadLetterPages)
    names = "abcdefg"
    await broker.publish(queue, [n.encode() for n in names])
    got = sorted(await ex.fetch_n(queue, len(names), within=ex.slack + 1), key=lambda d: d.body)
    for d in got:  # one at a time: entry ids follow the order of the writes
        await broker.dead_letter(d, letter(d.body.decode()))
    entry = {e.id: e.entry_id for e in await broker.dead_letters(queue)}

    async def page(**cursor: str | None) -> tuple[str, str | None, str | None]:
        found = await broker.dead_letter_page(queue, limit=3, **cursor)
        ids = "".join(e.id for e in found.entries)
        return ids, found.older, found.newer

    assert await page() == ("gfe", entry["e"], None)
    assert await page(before=entry["e"]) == ("dcb", entry["b"], entry["d"])
    assert await page(before=entry["b"]) == ("a", None, entry["a"])
    assert await page(after="") == ("cba", None, entry["c"])
    assert await page(after=entry["c"]) == ("fed", entry["d"], entry["f"])
    assert await page(after=entry["f"]) == ("g", entry["g"], None)

    assert await broker.remove_dead_letters(queue, [entry["d"]]) == 1
    assert await page(before=entry["e"]) == ("cba", None, entry["c"])
    assert await page(after=entry["c"]) == ("gfe", entry["e"], None)
    byid = await broker.dead_letters_by_id(queue, [entry["g"], entry["b"], entry["d"], "x"])
    assert [e.id for e in byid] == ["b", "g"]
    assert byid[0].body == b"b"
    for bad in ("x", "1; DROP", "-1"):
        try:
            await broker.dead_letter_page(queue, before=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"the cursor {bad!r} was taken")
    empty = await broker.dead_letter_page(ex.case.queue())
    assert (empty.entries, empty.older, empty.newer) == ([], None, None)


@check()
async def check_depth_counts_every_state(ex: Exercise) -> None:
    """``depth`` counts ready, in flight, delayed and dead apart."""
    broker, queue = ex.broker, ex.queue
    await ex.wait_depth(queue, EMPTY)
    await broker.publish(queue, [b"r1", b"r2", b"r3", b"r4"])
    # Long enough that they stay delayed for the whole check.
    later = max(60.0, 100 * ex.lease)
    await broker.publish(queue, [b"d1", b"d2"], delay=later)
    await ex.wait_depth(queue, QueueDepth(ready=4, delayed=2))

    # Leased for as long: a short lease running out under load would move them back to
    # ready while the depth is read (this check is about counting, not leases).
    got = await ex.fetch_n(queue, 2, within=ex.slack + 1, lease=later)
    assert all(d.body.startswith(b"r") for d in got)
    await ex.wait_depth(queue, QueueDepth(ready=2, in_flight=2, delayed=2))

    await broker.dead_letter(got[0], letter())
    await ex.wait_depth(queue, QueueDepth(ready=2, in_flight=1, delayed=2, dead=1))

    await broker.retry(got[1], body=b"r-retry", delay=later)
    await ex.wait_depth(queue, QueueDepth(ready=2, delayed=3, dead=1))


# -- optional capabilities --------------------------------------------------------------------


@check(Totals)
async def check_totals_count_what_was_added_and_what_left(ex: Exercise) -> None:
    """``Totals``: ``added`` counts published jobs and retries, ``left`` what was acked,
    retried or dead-lettered, ``dead`` the dead letters; a new queue starts at zero."""
    broker, queue = ex.broker, ex.queue
    assert isinstance(broker, Totals)
    assert await broker.totals(queue) == {"added": 0, "left": 0, "dead": 0}
    await broker.publish(queue, [b"acked", b"retried", b"dead"])
    got = {d.body: d for d in await ex.fetch_n(queue, 3, within=ex.slack + 1)}
    await broker.ack([got[b"acked"]])
    await broker.retry(got[b"retried"], body=b"retry", delay=0)
    await broker.dead_letter(got[b"dead"], letter())
    (retry,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    await broker.ack([retry])
    assert await broker.totals(queue) == {"added": 4, "left": 4, "dead": 1}


@check(MessagingSystem)
async def check_messaging_system_names_the_broker(ex: Exercise) -> None:
    """``MessagingSystem``: a lowercase name, as OpenTelemetry's ``messaging.system``."""
    broker = ex.broker
    assert isinstance(broker, MessagingSystem)
    name = broker.messaging_system
    assert isinstance(name, str)
    assert re.fullmatch(r"[a-z][a-z0-9_.]*", name), name


@check(FileBacked)
async def check_a_file_backed_broker_names_its_file(ex: Exercise) -> None:
    """``FileBacked``: ``path`` is the file the jobs are in, there once a job was published."""
    broker = ex.broker
    assert isinstance(broker, FileBacked)
    await broker.publish(ex.queue, [b"kept in the file"])
    assert isinstance(broker.path, Path)
    assert broker.path.is_file()


@check(DeadLetterWriter)
async def check_send_dead_letter_writes_an_entry_without_a_delivery(ex: Exercise) -> None:
    """``DeadLetterWriter``: a body dead-lettered directly (no delivery held) lands in the
    queue's DLQ with its letter."""
    broker, queue = ex.broker, ex.queue
    assert isinstance(broker, DeadLetterWriter)
    await broker.send_dead_letter(queue, b"from elsewhere", letter(reason="max_deliveries"))
    await ex.wait_depth(queue, QueueDepth(dead=1))
    if isinstance(broker, DeadLetterAdmin):
        (entry,) = await broker.dead_letters(queue)
        assert (entry.body, entry.id, entry.reason) == (
            b"from elsewhere",
            "job-1",
            "max_deliveries",
        )
