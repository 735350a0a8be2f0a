"""``aioworkers stats`` shows what the live workers throttled: real worker processes on
Redis run a rate-limited task while ``stats --json`` reads their registry records. A worker
beats its record every `BEAT_EVERY` (5 s): the count shows at the second beat, so this test
waits on the real timer of the worker processes (up to a few beats)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from .test_limits_processes import APP, ROOT, wait_for, world


async def _stats(env: dict[str, str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioworkers",
        "stats",
        APP,
        "--json",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc: dict[str, Any] = orjson.loads(out)
    return doc


async def test_stats_json_reports_the_throttled_jobs_of_live_workers(tmp_path: Path) -> None:
    async with world("redis", tmp_path) as w:
        from . import flow_app

        # 20/s for 240 jobs: about 12 s of work, far more slots (2 x 20) than tokens.
        await w.app.enqueue_many([flow_app.paced.call(n) for n in range(240)])
        await w.start(2, concurrency=20)
        seen: dict[str, Any] = {}

        async def throttled() -> bool:
            seen.update(await _stats(w.env))
            return bool(seen["workers"]["throttled"])

        await wait_for(throttled, within=30, every=0.5, what="stats to show throttled", world=w)
        workers = seen["workers"]
        assert workers["live"] == 2
        assert workers["throttled"] > 0
        # Both workers consume "default" alone: their counts are that queue's.
        assert workers["by_queue"] == {"default": workers["throttled"]}
        assert workers["outcomes"]["throttled"] == workers["throttled"]
        assert seen["queues"]["default"].keys() == {
            "ready",
            "in_flight",
            "delayed",
            "dead",
            "rates",
        }
