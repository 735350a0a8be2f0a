"""Every page and action of the dashboard through its ASGI app, on memory:// and SQLite:
what it shows, what it changes, and what it refuses (no login, no CSRF token, read-only)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from aioworkers import App
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.store import JobRecord
from aioworkers.web import bearer_token, dashboard

from .conftest import ENTRY, board, bury, client, csrf_of, make_app


async def test_overview_shows_each_queue_as_the_broker_counts_it(app: App) -> None:
    await bury(app, 3)
    await app.enqueue("charge", ["x", 1], delay=60)
    await app.enqueue("charge", ["x", 2])
    async with client(board(app)) as c:
        page = await c.get("/")
        stats = (await c.get("/api/stats")).json()
    assert page.status_code == 200
    row = re.search(r'<tr data-queue="default">(.*?)</tr>', page.text, re.S)
    assert row is not None
    cells = dict(re.findall(r'data-field="(\w+)">(?:<a [^>]*>)?([^<]*)<', row[1]))
    depth = await app.stats()
    assert cells["ready"] == str(depth.ready) == "1"
    assert cells["delayed"] == str(depth.delayed) == "1"
    assert cells["dead"] == str(depth.dead) == "3"
    assert stats["queues"]["default"] | {"rates": None} == {
        "ready": 1,
        "in_flight": 0,
        "delayed": 1,
        "dead": 3,
        "rates": None,
        "error_rate": None,
        "error": None,
    }
    assert stats["series"]["default"][-1][1:5] == [1, 0, 1, 3]


async def test_rates_come_from_the_brokers_counters(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioworkers.web import _history

    monkeypatch.setattr(_history, "MIN_INTERVAL", 0.0)
    async with client(board(app)) as c:
        await c.get("/api/stats")
        await app.enqueue("charge", ["x", 1])
        await bury(app, 2)
        doc = (await c.get("/api/stats")).json()
    rates = doc["queues"]["default"]["rates"]
    assert rates["failed"] > 0
    if app.broker.__class__.__name__ == "SqliteBroker":  # keeps Totals: enqueued and done
        assert rates["enqueued"] > 0
        assert doc["queues"]["default"]["error_rate"] == 1.0
    assert len(doc["series"]["default"]) == 2


async def test_queue_page_shows_depth_chart_and_failures(app: App) -> None:
    await bury(app, 2, error="ValueError: <script>alert(1)</script>")
    async with client(board(app)) as c:
        page = await c.get("/queues/default")
        missing = await c.get("/queues/nope")
    assert page.status_code == 200
    assert 'id="chart"' in page.text
    assert "/api/stats?queue=default" in page.text
    assert "max_retries" in page.text
    assert "<script>alert(1)" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert missing.status_code == 404


async def test_dead_letters_show_reason_error_traceback_attempts_not_arguments(app: App) -> None:
    ids = await bury(app, 2)
    async with client(board(app)) as c:
        page = (await c.get("/queues/default/dead")).text
    for job_id in ids:
        assert job_id in page
    assert "max_retries" in page
    assert "card declined" in page
    assert "Traceback" in page
    assert "4111-1111-1111-1111" not in page  # arguments are hidden unless allowed
    async with client(board(app, show_args=True)) as c:
        shown = (await c.get("/queues/default/dead")).text
    assert "4111-1111-1111-1111" in shown


PREV = re.compile(r'rel="prev" href="\?([^"]*)"')
NEXT = re.compile(r'rel="next" href="\?([^"]*)"')
OLDEST = re.compile(r'id="page-last" href="\?([^"]*)"')


async def test_dead_letters_are_paged_by_cursor_newest_first(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await bury(app, 120)
    listed: list[int] = []
    asked: list[int] = []
    broker = app.broker
    real_list, real_page = broker.dead_letters, broker.dead_letter_page  # type: ignore[attr-defined]

    async def list_spy(queue: str, *, limit: int = 100) -> list[object]:
        listed.append(limit)
        return await real_list(queue, limit=limit)  # type: ignore[no-any-return]

    async def page_spy(queue: str, **cursor: object) -> object:
        asked.append(cursor["limit"])  # type: ignore[arg-type]
        return await real_page(queue, **cursor)

    monkeypatch.setattr(broker, "dead_letters", list_spy)
    monkeypatch.setattr(broker, "dead_letter_page", page_spy)

    def shown(html: str) -> list[str]:
        return [i for i in re.findall(r'href="/job/([0-9a-f]+)"', html)]

    async with client(board(app)) as c:
        first = (await c.get("/queues/default/dead")).text
        second = (await c.get(f"/queues/default/dead?{NEXT.findall(first)[0]}")).text
        third = (await c.get(f"/queues/default/dead?{NEXT.findall(second)[0]}")).text
        back = (await c.get(f"/queues/default/dead?{PREV.findall(third)[0]}")).text
        oldest = (await c.get(f"/queues/default/dead?{OLDEST.findall(first)[0]}")).text
        big = (await c.get("/queues/default/dead?size=200")).text
        bad = (await c.get("/queues/default/dead?before=zz%3Cb%3E")).text
    newest_first = ids[::-1]
    assert shown(first) == newest_first[:50]
    assert not PREV.findall(first)
    assert shown(second) == newest_first[50:100]
    assert shown(third) == newest_first[100:]
    assert not NEXT.findall(third)
    assert shown(back) == shown(second)
    assert shown(oldest) == newest_first[70:]
    assert shown(big) == newest_first
    assert "not a cursor" in bad
    assert "<b>" not in bad
    assert asked == [50] * 5 + [200, 50]
    assert listed == []  # never a listing from the front


class _FrontOnly:
    """A memory broker without cursors, as RabbitMQ and SQS are."""

    def __init__(self) -> None:
        self._inner = MemoryBroker()

    def __getattr__(self, name: str) -> object:
        if name in ("dead_letter_page", "dead_letters_by_id"):
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_without_cursors_pages_by_number_oldest_first_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aioworkers.web import _dead

    monkeypatch.setattr(_dead, "MAX_BROWSE", 100)
    app = make_app("memory", Path())
    app.set_broker(_FrontOnly())  # type: ignore[arg-type]
    ids = await bury(app, 160)
    asked: list[int] = []
    real = app.broker.dead_letters  # type: ignore[attr-defined]

    async def spy(queue: str, *, limit: int = 100) -> list[object]:
        asked.append(limit)
        return await real(queue, limit=limit)  # type: ignore[no-any-return]

    monkeypatch.setattr(app.broker, "dead_letters", spy)
    async with client(board(app)) as c:
        first = (await c.get("/queues/default/dead")).text
        second = (await c.get(f"/queues/default/dead?{NEXT.findall(first)[0]}")).text
        last = (await c.get("/queues/default/dead?page=99")).text
        token = csrf_of(second)
        entries = ENTRY.findall(second)[:2]
        replay = await c.post(
            "/queues/default/dead/replay",
            data={"csrf": token, "view": "page=2", "entry": entries, "confirmed": "yes"},
        )
    assert len(ENTRY.findall(first)) == 50
    assert ids[0] in first
    assert ids[50] not in first
    assert ids[50] in second
    assert ids[49] not in second
    assert "lists dead letters from the oldest only" in second
    assert ids[99] in last
    assert "Only the oldest 100 entries" in last
    assert 'rel="next"' not in last
    assert replay.headers["location"] == "/queues/default/dead?page=2&done=replayed&n=2"
    assert max(asked) <= 100 + 1  # never the 160
    await app.aclose()


async def _confirm_then_do(c: object, path: str, fields: dict[str, object]) -> tuple[str, str]:
    confirm = await c.post(path, data=fields)  # type: ignore[attr-defined]
    assert confirm.status_code == 200, confirm.text
    assert 'name="confirmed" value="yes"' in confirm.text
    done = await c.post(path, data=fields | {"confirmed": "yes"})  # type: ignore[attr-defined]
    assert done.status_code == 303, done.text
    return confirm.text, done.headers["location"]


async def test_replay_one_some_and_all_with_a_confirmation(app: App) -> None:
    await bury(app, 6)
    async with client(board(app)) as c:
        page = (await c.get("/queues/default/dead")).text
        token, entries = csrf_of(page), ENTRY.findall(page)
        fields = {"csrf": token, "scope": "selected", "view": ""}
        text, where = await _confirm_then_do(
            c, "/queues/default/dead/replay", fields | {"only": entries[0]}
        )
        assert "<strong>1</strong> selected" in text
        assert where == "/queues/default/dead?done=replayed&n=1"
        assert (await app.stats()).ready == 1
        await _confirm_then_do(c, "/queues/default/dead/replay", fields | {"entry": entries[1:3]})
        assert (await app.stats()).ready == 3
        assert (await app.stats()).dead == 3
        text, where = await _confirm_then_do(
            c, "/queues/default/dead/replay", fields | {"scope": "all"}
        )
        assert "all 3" in text
        assert where.endswith("n=3")
        shown = (await c.get(where)).text
    assert "Replayed 3 dead letter(s)" in shown
    depth = await app.stats()
    assert (depth.ready, depth.dead) == (6, 0)


async def test_purge_one_some_and_all_with_a_confirmation(app: App) -> None:
    await bury(app, 5)
    async with client(board(app)) as c:
        page = (await c.get("/queues/default/dead")).text
        fields = {"csrf": csrf_of(page), "scope": "selected", "view": "size=200"}
        entries = ENTRY.findall(page)
        await _confirm_then_do(c, "/queues/default/dead/purge", fields | {"only": entries[0]})
        await _confirm_then_do(c, "/queues/default/dead/purge", fields | {"entry": entries[1:3]})
        assert (await app.stats()).dead == 2
        await _confirm_then_do(c, "/queues/default/dead/purge", fields | {"scope": "all"})
    depth = await app.stats()
    assert (depth.ready, depth.dead) == (0, 0)


async def test_nothing_selected_changes_nothing(app: App) -> None:
    await bury(app, 1)
    async with client(board(app)) as c:
        token = csrf_of((await c.get("/queues/default/dead")).text)
        reply = await c.post(
            "/queues/default/dead/purge", data={"csrf": token, "scope": "selected"}
        )
    assert reply.status_code == 303
    assert "done=none" in reply.headers["location"]
    assert (await app.stats()).dead == 1


async def test_job_page_shows_the_record_escaped_and_cancels(app: App) -> None:
    store = app.store
    await store.put_job(
        JobRecord(
            "job-1",
            "charge",
            "default",
            "succeeded",
            attempt=2,
            enqueued_at=1.0,
            started_at=2.0,
            finished_at=3.5,
            result=b'{"html": "<b>bold</b>"}',
        ),
        ttl=60,
    )
    await store.put_job(JobRecord("job-2", "charge", "default", "queued", enqueued_at=1.0), ttl=60)
    async with client(board(app)) as c:
        done = (await c.get("/job/job-1")).text
        lookup = await c.get("/job?id=job-2")
        queued = (await c.get("/job/job-2")).text
        cancel = await c.post("/job/job-2/cancel", data={"csrf": csrf_of(queued)})
        after = (await c.get(cancel.headers["location"])).text
        unknown = (await c.get("/job/never-seen")).text
        bad = await c.get("/job/%3Cscript%3E")
    assert "succeeded" in done
    assert "ran</th><td>1.500 s" in done
    assert "&lt;b&gt;bold&lt;/b&gt;" in done
    assert "<b>bold</b>" not in done
    assert 'id="cancel"' not in done  # a finished job has nothing to cancel
    assert lookup.status_code == 303
    assert lookup.headers["location"] == "/job/job-2"
    assert cancel.status_code == 303
    assert "Cancel requested" in after
    assert 'id="status">cancelled' in after
    assert await store.cancelled(["job-2"]) == {"job-2"}
    assert "No record of this job" in unknown
    assert bad.status_code == 404


async def test_workers_page_lists_the_registry(app: App) -> None:
    from aioworkers._registry import WorkerInfo, registry_for

    registry = registry_for(app.store)
    assert registry is not None
    info = WorkerInfo("w1", "host-a", 123, ("default",), 50, 7, 100, 90, 3, 1.0, 2.0, "RUNNING")
    await registry.beat(info, ttl=30)
    async with client(board(app)) as c:
        page = (await c.get("/workers")).text
    assert "host-a" in page
    assert "<td>123</td>" in page
    assert "RUNNING" in page


async def test_throttled_counts_on_the_overview_and_workers_page(app: App) -> None:
    from aioworkers._registry import WorkerInfo, registry_for
    from aioworkers.monitor.stats_command import _live_workers, _workers_doc

    registry = registry_for(app.store)
    assert registry is not None

    def worker(worker_id: str, queues: tuple[str, ...], throttled: int) -> WorkerInfo:
        outcomes = {"ok": 3, "throttled": throttled}
        return WorkerInfo(
            worker_id, "h", 1, queues, 5, 0, 9, 3, 0, 1.0, 2.0, "RUNNING", throttled, outcomes
        )

    await registry.beat(worker("w1", ("default",), 5), ttl=30)
    await registry.beat(worker("w2", ("default", "other"), 2), ttl=30)
    async with client(board(app)) as c:
        overview = (await c.get("/")).text
        doc = (await c.get("/api/stats")).json()
        workers = (await c.get("/workers")).text
    cli = _workers_doc(await _live_workers(app), app.queues())  # what `stats --json` prints
    assert doc["workers"] == cli
    assert cli["live"] == 2
    assert cli["throttled"] == 7
    assert cli["by_queue"] == {"default": 5}  # w2 is on two queues: only in the total
    assert 'data-field="throttled">5<' in overview
    assert '<span data-workers="throttled">7</span>' in overview
    assert re.findall(r'class="throttled">(\d+)<', workers) == ["5", "2"]


async def test_static_assets_ship_in_the_package(app: App) -> None:
    async with client(board(app)) as c:
        js = await c.get("/static/dashboard.js")
        css = await c.get("/static/dashboard.css")
    assert js.status_code == css.status_code == 200
    assert "setInterval" in js.text


# -- refusals ------------------------------------------------------------------------------


async def test_every_page_and_action_needs_the_login(app: App) -> None:
    await bury(app, 1)
    gets = [
        "/",
        "/api/stats",
        "/queues/default",
        "/queues/default/dead",
        "/workers",
        "/job",
        "/job/x",
        "/static/dashboard.js",
    ]
    posts = ["/queues/default/dead/replay", "/queues/default/dead/purge", "/job/x/cancel"]
    for auth in (None, ("admin", "wrong")):
        async with client(board(app), auth=auth) as c:
            for path in gets:
                reply = await c.get(path)
                assert reply.status_code == 401, path
                assert reply.headers["www-authenticate"].startswith("Basic ")
            for path in posts:
                reply = await c.post(path, data={"scope": "all", "confirmed": "yes"})
                assert reply.status_code == 401, path
    assert (await app.stats()).dead == 1


async def test_actions_without_a_valid_csrf_token_are_refused(app: App) -> None:
    await bury(app, 2)
    async with client(board(app)) as c:
        token = csrf_of((await c.get("/queues/default/dead")).text)
        attempts = [
            {"scope": "all", "confirmed": "yes"},
            {"csrf": "0" * 64, "scope": "all", "confirmed": "yes"},
        ]
        for fields in attempts:
            for path in (
                "/queues/default/dead/replay",
                "/queues/default/dead/purge",
                "/job/x/cancel",
            ):
                reply = await c.post(path, data=fields)
                assert reply.status_code == 403, (path, fields)
        # The right token from another site, or without its cookie, is refused too.
        cross = await c.post(
            "/queues/default/dead/purge",
            data={"csrf": token, "scope": "all", "confirmed": "yes"},
            headers={"origin": "https://evil.example"},
        )
        c.cookies.clear()
        cookieless = await c.post(
            "/queues/default/dead/purge", data={"csrf": token, "scope": "all", "confirmed": "yes"}
        )
        as_json = await c.post("/queues/default/dead/purge", json={"csrf": token})
    assert cross.status_code == cookieless.status_code == 403
    assert as_json.status_code == 415
    assert (await app.stats()).dead == 2
    assert await app.store.cancelled(["x"]) == set()


async def test_read_only_shows_no_forms_and_refuses_posts(app: App) -> None:
    await bury(app, 1)
    async with client(board(app, read_only=True)) as c:
        page = (await c.get("/queues/default/dead")).text
        reply = await c.post("/queues/default/dead/purge", data={"scope": "all"})
    assert 'method="post"' not in page
    assert reply.status_code == 403
    assert (await app.stats()).dead == 1


async def test_no_auth_only_read_only_and_only_on_loopback(app: App) -> None:
    from aioworkers.errors import ConfigError

    with pytest.raises(ConfigError, match="auth="):
        dashboard(app, auth=None)
    open_board = dashboard(app, auth=None, read_only=True)
    async with client(open_board, auth=None) as c:
        assert (await c.get("/")).status_code == 200
        proxied = await c.get("/", headers={"x-forwarded-for": "203.0.113.9"})
    async with client(open_board, auth=None, base="http://dashboard.example") as c:
        remote = await c.get("/")
    assert proxied.status_code == remote.status_code == 403


async def test_bearer_token_and_a_callable_of_ones_own(app: App) -> None:
    token = "t" * 32
    async with client(board(app, auth=bearer_token(token)), auth=None) as c:
        assert (await c.get("/")).status_code == 401
        ok = await c.get("/", headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200

    async def by_header(request: object) -> bool:
        return request.headers.get("x-user") == "ops"  # type: ignore[attr-defined]

    async with client(board(app, auth=by_header), auth=None) as c:
        assert (await c.get("/", headers={"x-user": "ops"})).status_code == 200
        assert (await c.get("/", headers={"x-user": "guest"})).status_code == 401


async def test_no_secret_in_any_page(tmp_path: object) -> None:
    app = App("memory://")
    app.set_broker("redis://:hunter2-secret@127.0.0.1:1/0?password=other-secret")
    async with client(board(app)) as c:
        page = await c.get("/")
    assert "hunter2-secret" not in page.text
    assert "other-secret" not in page.text
    assert "127.0.0.1:1" in page.text  # the broker is still named, credentials hidden
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


async def test_a_page_load_shows_the_numbers_of_now(app: App) -> None:
    async with client(board(app)) as c:
        before = (await c.get("/")).text
        await app.enqueue("charge", ["x", 1])
        after = (await c.get("/")).text  # within the second: polled again all the same
    assert 'data-field="ready">0<' in before
    assert 'data-field="ready">1<' in after


async def test_schedules_page_and_its_nav_entry_only_with_schedules(app: App) -> None:
    async with client(board(app)) as c:
        page = (await c.get("/")).text
    assert "/schedules" not in page

    @app.periodic(every=3600, name="hourly-report")
    async def report() -> None: ...

    async with client(board(app)) as c:
        page = (await c.get("/")).text
        schedules = (await c.get("/schedules")).text
    assert 'href="/schedules"' in page
    assert "hourly-report" in schedules
    assert re.search(r"<td>\d{4}-\d\d-\d\dT\d\d:00:00\+00:00</td>", schedules)  # next slot


async def test_a_running_worker_is_listed_and_forgotten_when_it_stops(app: App) -> None:
    async with client(board(app)) as c:
        async with app.worker(concurrency=7):
            for _ in range(200):  # its first beat is written as it starts
                page = (await c.get("/workers")).text
                if 'class="worker"' in page:
                    break
                await asyncio.sleep(0.01)
        gone = (await c.get("/workers")).text
    assert page.count('class="worker"') == 1
    assert "<td>7</td>" in page  # its concurrency
    assert 'class="worker"' not in gone


async def test_the_schedules_page_shows_the_last_slot_once_it_fired(app: App) -> None:
    fired = asyncio.Event()

    # A real timer: the schedule fires on the wall clock's next whole second.
    @app.periodic(every=1, name="tick")
    async def tick() -> None:
        fired.set()

    async with client(board(app)) as c:
        before = (await c.get("/schedules")).text
        async with app.worker(concurrency=2):
            await asyncio.wait_for(fired.wait(), 10)
            for _ in range(200):  # the slot's outcome is written as the job ends
                after = (await c.get("/schedules")).text
                if 'href="/job/' in after:
                    break
                await asyncio.sleep(0.01)
    slot = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    row = re.compile(rf"<td>({slot})</td><td>({slot}|-)</td><td>([a-z-]+)</td>")
    (_, last_before, outcome_before) = row.findall(before)[0]
    (next_after, last_after, outcome_after) = row.findall(after)[0]
    assert (last_before, outcome_before) == ("-", "-")
    assert last_after != "-"
    assert last_after < next_after  # the slot that fired, then the one to come
    assert outcome_after != "-"
    assert 'href="/job/' in after
