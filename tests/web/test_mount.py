"""The dashboard mounted under /jobs in a FastAPI app: every link, asset, form and
redirect stays under the mount path and works."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
from fastapi import FastAPI

from aioworkers import App
from aioworkers.store import JobRecord

from .conftest import ENTRY, PASSWORD, USER, board, bury, csrf_of

HREF = re.compile(r'(?:href|src|data-poll)="([^"]+)"')
ACTION = re.compile(r'(?:action|formaction)="([^"]+)"')


async def test_every_link_and_form_works_under_the_mount_path(app: App) -> None:
    await bury(app, 3)
    await app.store.put_job(JobRecord("job-9", "charge", "default", "queued"), ttl=60)
    api = FastAPI()

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    api.mount("/jobs", board(app))
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", auth=(USER, PASSWORD)
    ) as c:
        seen: set[str] = set()
        todo = ["/jobs/", "/jobs/job/job-9"]
        while todo:
            url = todo.pop()
            if url in seen:
                continue
            seen.add(url)
            reply = await c.get(url)
            assert reply.status_code == 200, url
            if "text/html" not in reply.headers["content-type"]:
                continue
            for action in ACTION.findall(reply.text):
                assert urlsplit(urljoin(url, action)).path.startswith("/jobs/"), (url, action)
            for link in HREF.findall(reply.text):
                target = urljoin(url, link.replace("&amp;", "&"))
                assert urlsplit(target).path.startswith("/jobs/"), (url, link)
                if target not in seen:
                    todo.append(target)
        assert {"/jobs/workers", "/jobs/queues/default/dead", "/jobs/static/dashboard.js"} <= seen
        assert "/jobs/api/stats" in seen

        page = (await c.get("/jobs/queues/default/dead")).text
        token, entries = csrf_of(page), ENTRY.findall(page)
        fields = {"csrf": token, "scope": "selected", "page": "1", "entry": entries[:2]}
        confirm = await c.post("/jobs/queues/default/dead/replay", data=fields)
        assert 'action="/jobs/queues/default/dead/replay"' in confirm.text
        done = await c.post("/jobs/queues/default/dead/replay", data=fields | {"confirmed": "yes"})
        assert done.status_code == 303
        assert done.headers["location"].startswith("/jobs/queues/default/dead?")
        assert "csrf" in {cookie.name.split("_")[-1] for cookie in c.cookies.jar}
        assert all(cookie.path == "/jobs/" for cookie in c.cookies.jar)
        cancel = await c.post("/jobs/job/job-9/cancel", data={"csrf": token})
        assert cancel.headers["location"] == "/jobs/job/job-9?done=cancelled"
        assert (await c.get("/health")).json() == {"ok": "yes"}
    depth = await app.stats()
    assert (depth.ready, depth.dead) == (2, 1)
