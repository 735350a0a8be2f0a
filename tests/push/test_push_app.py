"""The push app through ASGI (httpx's ASGITransport) on a SQLite app: every platform's
request format, what each status code promises (2xx: done or dead-lettered, 503: the
platform redelivers), malformed pushes, auth, the concurrency bound and the run cap."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import aioworkers
from aioworkers import push
from aioworkers.errors import ConfigError

TOKEN = "s3cret-push-token"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cloud_run" / "main.py"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class World:
    def __init__(self, app: aioworkers.App, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.effects: Counter[str] = Counter()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.started = 0

    async def until_started(self, n: int) -> None:
        while self.started < n:
            await self.entered.wait()
            self.entered.clear()

    def request(self, call: aioworkers.Call | bytes, **kw: Any) -> httpx.Request:
        return push.publish_request(self.app, call, url="http://push", token=TOKEN, **kw)

    async def send(self, call: aioworkers.Call | bytes, **kw: Any) -> httpx.Response:
        return await self.client.send(self.request(call, **kw))

    async def dead(self, queue: str = "default") -> list[aioworkers.DeadLetter]:
        return await self.app.broker.dead_letters(queue)  # type: ignore[attr-defined, no-any-return]


def build(path: Path, **options: Any) -> tuple[aioworkers.App, World]:
    app = aioworkers.App(f"sqlite:///{path / 'jobs.db'}")
    pushed = aioworkers.push_app(app, auth=push.bearer_token(TOKEN), **options)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=pushed), base_url="http://push")
    world = World(app, client)

    @app.task
    async def record(tag: str) -> None:
        world.effects[tag] += 1

    @app.task(retries=2, backoff=0.5)
    async def fails(tag: str) -> None:
        world.effects[tag] += 1
        raise RuntimeError(f"boom {tag}")

    @app.task(retries=0)
    async def waits(tag: str) -> None:
        world.started += 1
        world.entered.set()
        await world.gate.wait()
        world.effects[tag] += 1

    return app, world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    app, w = build(tmp_path)
    async with w.client:
        yield w
    await app.aclose()


def call(task: str, tag: str) -> aioworkers.Call:
    return aioworkers.Call(task, (tag,))


async def test_pubsub_push_runs_once_and_answers_204(world: World) -> None:
    reply = await world.send(call("record", "a"))
    assert reply.status_code == 204
    assert world.effects == {"a": 1}


async def test_cloud_tasks_push_runs_once(world: World) -> None:
    reply = await world.send(call("record", "b"), platform="cloudtasks")
    assert reply.status_code == 204
    assert world.effects == {"b": 1}


async def test_cloudevents_binary_and_structured(world: World) -> None:
    body = world.request(call("record", "bin"), platform="cloudtasks").content
    headers = {**AUTH, "content-type": "application/json", "ce-id": "ev-1", "ce-type": "t"}
    reply = await world.client.post("/job", content=body, headers=headers)
    assert reply.status_code == 204
    event = {
        "specversion": "1.0",
        "id": "ev-2",
        "data_base64": base64.b64encode(
            world.request(call("record", "structured"), platform="cloudtasks").content
        ).decode(),
    }
    headers = {**AUTH, "content-type": "application/cloudevents+json"}
    reply = await world.client.post("/job", content=orjson.dumps(event), headers=headers)
    assert reply.status_code == 204
    assert world.effects == {"bin": 1, "structured": 1}


@pytest.mark.parametrize("platform", ["pubsub", "cloudtasks"])
async def test_failure_is_503_until_the_attempt_limit_then_one_dead_letter(
    world: World, platform: str
) -> None:
    body, _ = push.envelope(world.app, call("fails", "f"))  # one message, pushed again
    for attempt in (1, 2):
        reply = await world.send(body, platform=platform, attempt=attempt)
        assert reply.status_code == 503
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.json()["outcome"] == "retry"
        assert await world.dead() == []
    reply = await world.send(body, platform=platform, attempt=3)
    assert reply.status_code == 200
    assert reply.json()["outcome"] == "dead"
    assert reply.json()["reason"] == "max_retries"
    (letter,) = await world.dead()
    assert letter.reason == "max_retries"
    assert letter.error is not None
    assert "boom f" in letter.error
    assert world.effects == {"f": 3}


async def test_duplicate_push_runs_once(world: World) -> None:
    request = world.request(call("record", "dup"))
    first = await world.client.send(request)
    again = await world.client.send(world.request(call("record", "other")))
    second = await world.client.send(request)  # the platform pushes the same message again
    assert (first.status_code, second.status_code) == (204, 200)
    assert second.json()["outcome"] == "duplicate"
    assert world.effects == {"dup": 1, "other": 1}
    assert again.status_code == 204


async def test_a_push_delivered_twice_at_once_runs_once(world: World) -> None:
    request = world.request(call("waits", "w"))
    first = asyncio.ensure_future(world.client.send(request))
    await world.until_started(1)
    # The key is claimed by the run in progress: the second is told to come back later.
    second = await world.client.send(request)
    assert second.status_code == 503
    world.gate.set()
    assert (await first).status_code == 204
    third = await world.client.send(request)
    assert third.status_code == 200
    assert third.json()["outcome"] == "duplicate"
    assert world.effects == {"w": 1}


@pytest.mark.parametrize(
    ("path", "content", "content_type", "reason"),
    [
        ("/pubsub", b"not json at all", "application/json", "decode_error"),
        ("/pubsub", b'{"nomessage": 1}', "application/json", "schema_error"),
        ("/pubsub", b'{"message": {"data": "%%%"}}', "application/json", "decode_error"),
        ("/pubsub", b'{"message": {"data": "e30="}}', "application/json", "schema_error"),
        ("/pubsub", b'{"message": {"data": "e30="}}', "text/html", "decode_error"),
        ("/job", b"\xff\xfegarbage", "application/octet-stream", "decode_error"),
        ("/job", b'{"v": 1}', "application/json", "schema_error"),
        ("/job", b"task=record", "application/x-www-form-urlencoded", "decode_error"),
    ],
)
async def test_malformed_push_is_dead_lettered_and_acked(
    world: World, path: str, content: bytes, content_type: str, reason: str
) -> None:
    headers = {**AUTH, "content-type": content_type}
    reply = await world.client.post(path, content=content, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"outcome": "dead", "reason": reason}
    (letter,) = await world.dead()
    assert letter.reason == reason
    assert world.effects == {}


async def test_unknown_task_and_bad_arguments_are_dead_lettered(world: World) -> None:
    unknown = await world.send(call("no_such_task", "x"))
    # Built by a producer that does not know the task (it checks no arguments).
    producer = aioworkers.App("memory://")
    bad_call = aioworkers.Call("record", ("a", "b", "c"))
    request = push.publish_request(producer, bad_call, url="http://push", token=TOKEN)
    bad = await world.client.send(request)
    assert (unknown.status_code, bad.status_code) == (200, 200)
    reasons = sorted(letter.reason for letter in await world.dead())
    assert reasons == ["bad_arguments", "unknown_task"]


async def test_oversized_push_is_dead_lettered(tmp_path: Path) -> None:
    app, world = build(tmp_path)
    app.max_message_size = 1000
    async with world.client:
        huge = b"x" * 10_000
        headers = {**AUTH, "content-type": "application/json"}
        reply = await world.client.post("/job", content=huge, headers=headers)
    assert reply.status_code == 200
    (letter,) = await world.dead()
    assert letter.reason == "payload_too_large"
    await app.aclose()


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}]
)
async def test_no_or_a_wrong_token_is_401_and_nothing_runs(
    world: World, headers: dict[str, str]
) -> None:
    request = world.request(call("record", "t"))
    del request.headers["authorization"]
    request.headers.update(headers)
    reply = await world.client.send(request)
    assert reply.status_code == 401
    assert world.effects == {}
    assert await world.dead() == []


async def test_token_in_the_query_string(world: World) -> None:
    request = world.request(call("record", "q"))
    del request.headers["authorization"]
    url = request.url.copy_add_param("token", TOKEN)
    reply = await world.client.post(url, content=request.content, headers=dict(request.headers))
    assert reply.status_code == 204
    assert world.effects == {"q": 1}


async def test_max_concurrency_answers_429_when_full(tmp_path: Path) -> None:
    app, world = build(tmp_path, max_concurrency=2)
    async with world.client:
        running = [asyncio.ensure_future(world.send(call("waits", f"c{i}"))) for i in range(2)]
        await world.until_started(2)
        busy = await world.send(call("record", "late"))
        assert busy.status_code == 429
        world.gate.set()
        assert [(await r).status_code for r in running] == [204, 204]
        assert (await world.send(call("record", "late"))).status_code == 204
    assert world.effects == {"c0": 1, "c1": 1, "late": 1}
    await app.aclose()


async def test_a_job_slower_than_the_cap_times_out_as_a_failure(tmp_path: Path) -> None:
    # A real timer is under test: the cap is the loop's timeout on the handler.
    app, world = build(tmp_path, timeout=0.2)
    async with world.client:
        reply = await world.send(call("waits", "slow"))
    assert reply.status_code == 200
    (letter,) = await world.dead()
    assert letter.reason == "max_retries"
    assert letter.error is not None
    assert "timed out after 0.2s" in letter.error
    assert world.effects == {}
    await app.aclose()


async def test_healthz_and_unknown_routes(world: World) -> None:
    assert (await world.client.get("/healthz")).json()["status"] == "ok"
    assert (await world.client.get("/pubsub", headers=AUTH)).status_code == 405
    assert (await world.client.post("/nope", headers=AUTH)).status_code == 404


async def test_auth_is_required_unless_disabled(tmp_path: Path) -> None:
    app = aioworkers.App(f"sqlite:///{tmp_path / 'jobs.db'}")
    with pytest.raises(ConfigError, match="auth="):
        aioworkers.push_app(app)
    assert isinstance(aioworkers.push_app(app, auth=push.no_auth()), push.PushApp)
    await app.aclose()


async def test_mounted_under_a_prefix_in_starlette(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app, world = build(tmp_path)
    pushed = aioworkers.push_app(app, auth=push.bearer_token(TOKEN))
    api = Starlette(routes=[Mount("/push", app=pushed)])
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        request = push.publish_request(app, call("record", "m"), url="http://api/push", token=TOKEN)
        assert (await client.send(request)).status_code == 204
    assert world.effects == {"m": 1}
    await app.aclose()


async def test_the_cloud_run_example_serves_pushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    monkeypatch.delenv("PUSH_AUDIENCE", raising=False)
    monkeypatch.setenv("AIOWORKERS_BROKER_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    spec = importlib.util.spec_from_file_location("cloud_run_main", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    transport = httpx.ASGITransport(app=module.push)
    async with httpx.AsyncClient(transport=transport) as client:
        job = module.resize.call("a.png", 200)
        for platform in ("pubsub", "cloudtasks"):
            request = push.publish_request(
                module.app, job, platform=platform, url="http://run", token=TOKEN
            )
            assert (await client.send(request)).status_code == 204
    await module.app.aclose()


async def test_queue_in_the_push_url_names_the_dlq(world: World) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    reply = await world.client.post("/pubsub?queue=images", content=b"{oops", headers=headers)
    assert reply.status_code == 200
    assert await world.dead() == []
    (letter,) = await world.dead("images")
    assert letter.reason == "decode_error"


@pytest.mark.parametrize(
    ("own", "cap", "limit"),
    [(None, 0.2, "0.2s"), (100.0, 0.2, "0.2s"), (0.1, 30.0, "0.1s")],
)
async def test_the_shorter_of_the_task_timeout_and_the_cap_bounds_a_run(
    tmp_path: Path, own: float | None, cap: float, limit: str
) -> None:
    # A real timer is under test: the loop's timeout on the handler.
    app = aioworkers.App(f"sqlite:///{tmp_path / 'jobs.db'}")
    never = asyncio.Event()

    @app.task(timeout=own, retries=1)
    async def stuck() -> None:
        await never.wait()

    pushed = aioworkers.push_app(app, auth=push.bearer_token(TOKEN), timeout=cap)
    transport = httpx.ASGITransport(app=pushed)
    async with httpx.AsyncClient(transport=transport) as client:
        job, _ = push.envelope(app, aioworkers.Call("stuck"))
        first = push.publish_request(app, job, url="http://p", token=TOKEN)
        reply = await client.send(first)
        assert reply.status_code == 503  # a retry is left: the platform redelivers
        last = push.publish_request(app, job, url="http://p", token=TOKEN, attempt=2)
        reply = await client.send(last)
        assert reply.json()["reason"] == "max_retries"
    (letter,) = await app.broker.dead_letters("default")  # type: ignore[attr-defined]
    assert f"timed out after {limit}" in (letter.error or "")
    await app.aclose()
