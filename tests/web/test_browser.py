"""The dashboard in a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by
``.ci/run``; never a downloaded one), driven by Playwright, against ``aioworkers web`` and
a real worker on Redis running jobs. Screenshots land in the test's temporary directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..services import REDIS, REDIS_URL, ensure

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USER, PASSWORD = "ops", "browser-test-password"

SHOP = """
import asyncio, os, pathlib
import aioworkers

app = aioworkers.App(os.environ["SHOP_BROKER"])
RAN = pathlib.Path(os.environ["SHOP_RAN"])
FIXED = pathlib.Path(os.environ["SHOP_FIXED"])


def ran(what: str) -> None:
    with RAN.open("a") as f:
        f.write(what + "\\n")


@app.task(retries=0)
async def work(n: int) -> None:
    await asyncio.sleep(0.02)
    ran(f"work {n}")


@app.task(retries=0)
async def flaky(n: int) -> None:
    if not FIXED.exists():
        raise RuntimeError(f"not yet: {n}")
    ran(f"flaky {n}")


@app.task
async def later(n: int) -> None:
    ran(f"later {n}")


@app.task(rate_limit="50/s")  # a burst of these on 20 slots: some wait, counted throttled
async def limited(n: int) -> None:
    ran(f"limited {n}")
"""

ENQUEUE = """
import asyncio, sys
from shop import app

async def main() -> None:
    calls = [app.tasks["work"].call(n) for n in range(int(sys.argv[1]))]
    calls += [app.tasks["flaky"].call(n) for n in range(int(sys.argv[2]))]
    calls += [app.tasks["work"].options(delay=3600).call(-n) for n in range(int(sys.argv[3]))]
    calls += [app.tasks["limited"].call(n) for n in range(int(sys.argv[4]))]
    await app.enqueue_many(calls)
    await app.aclose()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Shop:
    dir: Path
    env: dict[str, str]
    url: str  # the dashboard's
    ran: Path
    fixed: Path

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            ["aioworkers", *args],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    def enqueue(self, work: int, flaky: int, delayed: int, limited: int = 0) -> None:
        subprocess.run(
            [sys.executable, "enqueue.py", str(work), str(flaky), str(delayed), str(limited)],
            cwd=self.dir,
            env=self.env,
            check=True,
            timeout=30,
        )

    def stats(self) -> dict[str, Any]:
        return self.stats_doc()["queues"]["default"]

    def stats_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("stats", "shop:app", "--json"))
        return doc

    def cancel_marks(self, job_ids: list[str]) -> list[str]:
        """The ids among ``job_ids`` with a cancel mark in the app's store."""
        done = subprocess.run(
            [sys.executable, "-c", _MARKS, *job_ids],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        marks: list[str] = json.loads(done.stdout)
        return marks

    def runs(self) -> list[str]:
        return self.ran.read_text().splitlines() if self.ran.exists() else []


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    ensure(REDIS)
    prefix = f"webtest-{uuid.uuid4().hex[:8]}"
    (tmp_path / "shop.py").write_text(SHOP)
    (tmp_path / "enqueue.py").write_text(ENQUEUE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOWORKERS_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env |= {
        "SHOP_BROKER": f"{REDIS_URL}?prefix={prefix}",
        "SHOP_RAN": str(tmp_path / "ran.txt"),
        "SHOP_FIXED": str(tmp_path / "fixed"),
        "AIOWORKERS_WEB_USER": USER,
        "AIOWORKERS_WEB_PASSWORD": PASSWORD,
        # The shop first, then whatever this run imports aioworkers from.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
    }
    port = _free_port()
    commands = {
        "web": ["aioworkers", "web", "shop:app", "--port", str(port)],
        "worker": ["aioworkers", "run", "shop:app", "--concurrency", "20"],
    }
    with ExitStack() as stack:
        procs = []
        for name, argv in commands.items():
            log = stack.enter_context((tmp_path / f"{name}.log").open("wb"))
            procs.append(
                subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        try:
            wait_for(lambda: _listening(port), "the dashboard to listen")
            url = f"http://127.0.0.1:{port}"
            yield Shop(tmp_path, env, url, tmp_path / "ran.txt", tmp_path / "fixed")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
            subprocess.run([sys.executable, "-c", _CLEAN, prefix], env=env, check=False, timeout=30)


_MARKS = """
import asyncio, json, sys
from shop import app

async def main() -> None:
    print(json.dumps(sorted(await app.store.cancelled(sys.argv[1:]))))
    await app.aclose()

asyncio.run(main())
"""

_CLEAN = """
import sys, redis
r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
keys = list(r.scan_iter(match=sys.argv[1] + "*", count=1000))
if keys:
    r.delete(*keys)
"""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def chromium(profile: Path, *, login: bool = True) -> Iterator[Any]:
    """A page in a fresh profile of the OS's Chromium, logged in (HTTP Basic) or not."""
    from playwright.sync_api import sync_playwright

    credentials = {"username": USER, "password": PASSWORD} if login else None
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            http_credentials=credentials,  # type: ignore[arg-type]
            viewport={"width": 1200, "height": 800},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def cells(page: Any) -> dict[str, str]:
    row = page.locator('tr[data-queue="default"]')
    return {
        field: row.locator(f'[data-field="{field}"]').inner_text().replace(",", "")
        for field in ("ready", "in_flight", "delayed", "dead")
    }


def test_login_is_enforced(shop: Shop, tmp_path: Path) -> None:
    from playwright.sync_api import Error

    with chromium(tmp_path / "anonymous", login=False) as page:
        for path in ("/", "/queues/default/dead", "/workers", "/api/stats"):
            # Headless Chromium gives up on the login prompt: the page never shows.
            with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(shop.url + path)
            assert page.request.get(shop.url + path).status == 401
    with chromium(tmp_path / "ops") as page:
        assert page.goto(shop.url + "/").status == 200
        assert page.locator("h1").inner_text() == "Overview"


def test_overview_chart_replay_and_workers(shop: Shop, tmp_path: Path) -> None:
    shop.enqueue(work=300, flaky=3, delayed=4, limited=20)
    settled = {"ready": 0, "in_flight": 0, "delayed": 4, "dead": 3}
    # The throttled ones come back in waves (a retried job waits for the broker's next
    # look at its delayed jobs): allow them time.
    wait_for(
        lambda: {k: shop.stats()[k] for k in settled} == settled,
        "the worker to run the jobs",
        timeout=60,
    )
    if _registry_hooked():  # the worker's record once it counts every job: final figures
        ok = 300 + 20
        wait_for(lambda: shop.stats_doc()["workers"]["outcomes"].get("ok") == ok, "a beat")
    with chromium(tmp_path / "ops") as page:
        page.goto(shop.url + "/")
        # The overview shows what `aioworkers stats --json` shows: depths and throttled.
        doc = shop.stats_doc()
        stats = doc["queues"]["default"]
        assert cells(page) == {k: str(stats[k]) for k in settled}
        workers = doc["workers"]
        if _registry_hooked():
            assert workers["live"] == 1
            assert workers["throttled"] > 0  # 20 starts at 50/s at once on 20 slots
            throttled = page.locator('tr[data-queue="default"] [data-field="throttled"]')
            assert throttled.inner_text() == f"{workers['by_queue']['default']:,}"
            total = page.locator('[data-workers="throttled"]').inner_text()
            assert total == f"{workers['throttled']:,}"
        # The chart updates itself (a poll every 2 s), and so do the numbers.
        # (Read from here: the page's CSP allows no eval, so no wait_for_function.)
        chart = page.locator("#chart")
        wait_for(lambda: int(chart.get_attribute("data-samples") or 0) >= 1, "a chart")
        first = chart.get_attribute("data-updated")
        shop.enqueue(work=200, flaky=0, delayed=0)
        wait_for(
            lambda: (
                chart.get_attribute("data-updated") != first
                and int(chart.get_attribute("data-samples") or 0) >= 3
            ),
            "the chart to update",
        )
        wait_for(lambda: shop.stats()["ready"] == 0, "the second batch to run")
        page.wait_for_timeout(2500)  # one more poll of the page after the batch
        assert cells(page) == {k: str(v) for k, v in shop.stats().items() if k in settled}
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

        # A dead letter replayed from the page runs (the bug it hit is fixed now).
        shop.fixed.touch()
        page.goto(shop.url + "/queues/default/dead")
        assert page.locator("tr.letter").count() == 3
        assert "RuntimeError: not yet" in page.locator("table.letters").inner_text()
        page.screenshot(path=str(tmp_path / "dead.png"), full_page=True)
        page.locator('input[name="entry"]').first.check()
        page.locator("#replay-selected").click()
        assert "1</strong> selected" in page.content()
        page.screenshot(path=str(tmp_path / "confirm.png"))
        page.locator("#confirm").click()
        assert "Replayed 1 dead letter" in page.locator(".message").inner_text()
        wait_for(lambda: sum(r.startswith("flaky") for r in shop.runs()) == 1, "the replay to run")
        # All the rest, through the confirmation step.
        page.locator("#replay-all").click()
        assert "all 2" in page.locator(".confirm-question").inner_text()
        page.locator("#confirm").click()
        wait_for(lambda: sum(r.startswith("flaky") for r in shop.runs()) == 3, "all to run")
        assert sorted(r for r in shop.runs() if r.startswith("flaky")) == [
            "flaky 0",
            "flaky 1",
            "flaky 2",
        ]
        assert shop.stats()["dead"] == 0

        page.goto(shop.url + "/workers")
        page.screenshot(path=str(tmp_path / "workers.png"), full_page=True)
        if _registry_hooked():
            assert page.locator("tr.worker").count() == 1
            throttled = page.locator("tr.worker td.throttled").inner_text()
            assert throttled == f"{shop.stats_doc()['workers']['throttled']:,}"


def _registry_hooked() -> bool:
    import aioworkers.worker

    return "keep_registered" in Path(aioworkers.worker.__file__).read_text()


def test_a_job_cancelled_from_the_page_does_not_run(shop: Shop, tmp_path: Path) -> None:
    # Due in 8 s: time enough to open the page and cancel one before either is due.
    kept = shop.cli("enqueue", "shop:app", "later", "--args", "[1]", "--delay", "8").strip()
    doomed = shop.cli("enqueue", "shop:app", "later", "--args", "[2]", "--delay", "8").strip()
    with chromium(tmp_path / "ops") as page:
        page.goto(f"{shop.url}/job?id={doomed}")
        page.locator("#cancel").click()
        assert "Cancel requested" in page.locator(".message").inner_text()
        page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
    assert shop.runs() == []  # cancelled before it was due
    wait_for(lambda: "later 1" in shop.runs(), "the job that was not cancelled to run")
    time.sleep(1.0)  # the two were due together: the cancelled one had its chance
    assert "later 2" not in shop.runs()
    assert kept != doomed


def test_purge_from_the_page_and_refused_posts_change_nothing(shop: Shop, tmp_path: Path) -> None:
    import httpx

    shop.enqueue(work=0, flaky=4, delayed=0)
    wait_for(lambda: shop.stats()["dead"] == 4, "four dead letters")
    later = shop.cli("enqueue", "shop:app", "later", "--args", "[9]", "--delay", "3600").strip()
    actions = [
        "/queues/default/dead/replay",
        "/queues/default/dead/purge",
        f"/job/{later}/cancel",
    ]
    everything = {"scope": "all", "confirmed": "yes"}
    with httpx.Client(base_url=shop.url, timeout=10) as anonymous:
        for path in actions:
            assert anonymous.post(path, data=everything).status_code == 401, path
    with httpx.Client(base_url=shop.url, timeout=10, auth=(USER, PASSWORD)) as ops:
        page = ops.get("/queues/default/dead")  # sets the CSRF cookie; its token unused
        assert page.status_code == 200
        for path in actions:
            assert ops.post(path, data=everything).status_code == 403, path
            forged = everything | {"csrf": "0" * 64}
            assert ops.post(path, data=forged).status_code == 403, path
    # Nothing changed: the letters are there, nothing was replayed, the job not cancelled.
    assert shop.stats()["dead"] == 4
    assert shop.runs() == []
    assert shop.cancel_marks([later]) == []

    with chromium(tmp_path / "ops") as page:
        page.goto(shop.url + "/queues/default/dead")
        assert page.locator("tr.letter").count() == 4
        page.locator("tr.letter").first.locator("button.danger").click()  # its Purge…
        assert "1</strong> selected" in page.content()
        page.locator("#confirm").click()
        assert "Deleted 1 dead letter" in page.locator(".message").inner_text()
        assert page.locator("tr.letter").count() == 3
        page.locator("#purge-all").click()
        assert "all 3" in page.locator(".confirm-question").inner_text()
        page.locator("#confirm").click()
        assert "Deleted 3 dead letter" in page.locator(".message").inner_text()
    assert shop.stats()["dead"] == 0
    assert shop.runs() == []  # purged, not run
