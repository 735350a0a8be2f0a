"""Makes docs/dashboard-overview.png, the README's picture of the dashboard: two workers
on Redis (127.0.0.1:6379, keys under a prefix of their own, removed after), one a queue,
running a varying workload with a rate limit that throttles some jobs, for about 70 s
while Debian's Chromium (/usr/bin/chromium, through Playwright) watches the overview.

    python docs/shoot_dashboard.py
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

OUT = Path(__file__).with_name("dashboard-overview.png")
SECONDS = 70
SHOP = """
import asyncio, os, random
import aioworkers

app = aioworkers.App(os.environ["SHOP_BROKER"])


@app.task(retries=0)
async def work(n: int) -> None:
    await asyncio.sleep(0.05)


@app.task(retries=0, queue="emails")
async def send_email(n: int) -> None:
    await asyncio.sleep(0.1)
    if random.random() < 0.02:
        raise ConnectionError("smtp: connection reset")


@app.task(rate_limit="10/s")
async def call_partner(n: int) -> None: ...
"""
FEED = """
import asyncio, math, sys, time
from shop import app

async def main() -> None:
    start = time.monotonic()
    await app.enqueue_many([app.tasks["work"].options(delay=3600).call(-n) for n in range(8)])
    while (t := time.monotonic() - start) < float(sys.argv[1]):
        wave = int(40 + 35 * math.sin(t / 9))
        calls = [app.tasks["work"].call(n) for n in range(wave)]
        calls += [app.tasks["send_email"].call(n) for n in range(wave // 6)]
        calls += [app.tasks["call_partner"].call(n) for n in range(3)]
        await app.enqueue_many(calls)
        await asyncio.sleep(1.0)
    await app.aclose()

asyncio.run(main())
"""
CLEAN = """
import sys, redis
r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
keys = list(r.scan_iter(match=sys.argv[1] + "*", count=1000))
if keys:
    r.delete(*keys)
"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    prefix = f"shot-demo-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as directory, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        here = Path(directory)
        (here / "shop.py").write_text(SHOP)
        (here / "feed.py").write_text(FEED)
        env = os.environ | {
            "SHOP_BROKER": f"redis://127.0.0.1:6379/0?prefix={prefix}",
            "AIOWORKERS_WEB_USER": "ops",
            "AIOWORKERS_WEB_PASSWORD": "screenshot",
            "PYTHONPATH": os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")])),
        }
        argv = [
            ["aioworkers", "web", "shop:app", "--port", str(port)],
            ["aioworkers", "run", "shop:app", "--queues", "default", "--concurrency", "20"],
            ["aioworkers", "run", "shop:app", "--queues", "emails", "--concurrency", "10"],
            [sys.executable, "feed.py", str(SECONDS + 10)],
        ]
        procs = [subprocess.Popen(a, cwd=here, env=env) for a in argv]
        try:
            time.sleep(3)
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"]
                )
                page = browser.new_page(
                    viewport={"width": 1100, "height": 640},
                    http_credentials={"username": "ops", "password": "screenshot"},
                )
                page.goto(f"http://127.0.0.1:{port}/")
                deadline = time.monotonic() + SECONDS
                while time.monotonic() < deadline:
                    page.wait_for_timeout(1000)
                page.screenshot(path=str(OUT))
                browser.close()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
            subprocess.run([sys.executable, "-c", CLEAN, prefix], check=False, timeout=30)
    print(f"wrote {OUT} ({math.ceil(OUT.stat().st_size / 1024)} KiB)")


if __name__ == "__main__":
    main()
