"""The operator's side: ``run --metrics-port`` scraped over HTTP, ``stats --json`` against
the broker's own counts, ``--fail-if`` exit codes, ``--log-format json``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

import aioworkers
from aioworkers.cli import main

from ..services import REDIS_URL
from .conftest import Backend

APPS = Path(__file__).parent / "apps"
SECRET_URL_USER = "default:hunter2"


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioworkers", *args],
        cwd=APPS,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIOWORKERS_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def seed(url: str, ok: int, boom: int) -> aioworkers.App:
    from telapp import app  # type: ignore[import-not-found]

    app.set_broker(url)

    async def go() -> None:
        calls = [app.tasks["ok"].call(i) for i in range(ok)]
        calls += [app.tasks["boom"].call(i) for i in range(boom)]
        await app.enqueue_many(calls)
        await app.aclose()

    asyncio.run(go())
    sys.modules.pop("telapp", None)  # the CLI in this process imports a fresh App
    return app


def run_main(*argv: str) -> int:
    sys.modules.pop("telapp", None)
    return main(list(argv))


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))
    monkeypatch.chdir(APPS)
    sys.modules.pop("telapp", None)


def test_prometheus_endpoint_and_health(redis_url: str) -> None:
    seed(redis_url, ok=7, boom=2)
    port = free_port()
    # A password in the URL: it must not appear in logs, metrics or health.
    secret_url = redis_url.replace("redis://", f"redis://{SECRET_URL_USER}@")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioworkers", "run", "telapp:app", "--broker", secret_url,
         "--metrics-port", str(port), "--log-format", "json", "--concurrency", "4"],
        cwd=APPS, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        metrics = ""
        while time.monotonic() < deadline:
            try:
                status, health = get(f"{base}/healthz")
                _, metrics = get(f"{base}/metrics")
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200 and 'aioworkers_job_outcome="ok"' in metrics and "} 7.0" in metrics:
                break
            time.sleep(0.2)
        assert status == 200, health
        assert orjson.loads(health)["broker"] == "connected"
        assert get(f"{base}/nope")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    lines = {
        line.split(" ")[0].split("{")[0] + line[line.index("{") :].split("}")[0]: line
        for line in metrics.splitlines()
        if line.startswith(("aioworkers_", "messaging_")) and "{" in line
    }
    ok = next(k for k in lines if k.startswith("aioworkers_jobs_total") and '"ok"' in k)
    dead = next(k for k in lines if k.startswith("aioworkers_jobs_total") and '"dead"' in k)
    assert lines[ok].endswith(" 7.0")
    assert lines[dead].endswith(" 2.0")
    assert 'messaging_system="redis"' in ok
    assert any(k.startswith("messaging_process_duration_seconds_count") for k in lines)
    assert any(k.startswith("messaging_client_consumed_messages_total") for k in lines)
    assert any(k.startswith("aioworkers_queue_lag_seconds{") for k in lines)
    assert any(k.startswith("aioworkers_jobs_in_flight") for k in lines)
    assert any(k.startswith("aioworkers_queue_depth") and 'state="dead"' in k for k in lines)
    # One JSON object per line, the failures with their fields; the password nowhere.
    records = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    failures = [r for r in records if r.get("outcome") == "dead"]
    assert len(failures) == 2
    assert {"job_id", "task", "attempt", "error", "duration"} <= failures[0].keys()
    assert failures[0]["task"] == "boom"
    assert failures[0]["error"] == "RuntimeError: boom"
    assert "hunter2" not in stderr + metrics + health
    assert any(":***@" in r["message"] for r in records)


def test_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("run", "telapp:app", "--metrics-port", str(port), "--burst")
    assert result.returncode == 2
    assert f"--metrics-port {port} on 127.0.0.1" in result.stderr


@pytest.mark.parametrize("backend", ["redis", "amqp", "sqs", "sqlite"], indirect=True)
def test_stats_json_equals_the_broker_counts(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # memory:// is left out: the CLI's process cannot see another process's memory.
    queue = backend.queue()
    monkeypatch.setenv("TELAPP_QUEUE", queue)
    url = backend.url
    app = backend.track(seed(url, ok=4, boom=3), close=False)  # closed below, in its loop

    async def work_some() -> aioworkers.QueueDepth:
        async with app:
            worker = app.worker(poll=0.1)
            await worker.run(burst=True)
            assert dict(worker.counts) == {"ok": 4, "dead": 3}
        await app.enqueue("ok", [1], delay=60)
        await app.enqueue("ok", [2])
        depth = await app.stats()
        await app.aclose()
        return depth

    truth = asyncio.run(work_some())
    sys.modules.pop("telapp", None)
    assert truth == aioworkers.QueueDepth(ready=1, in_flight=0, delayed=1, dead=3)
    # What a broker of another process counts. RabbitMQ has no per-message delay:
    # AmqpBroker.depth counts as delayed only the delay queues it published to itself
    # (its module docstring, "Limits"), so a process that published none sees 0 delayed.
    delayed = 0 if backend.name == "amqp" else 1
    fresh = asyncio.run(depth_from_another_broker(url, queue))
    assert fresh == aioworkers.QueueDepth(ready=1, in_flight=0, delayed=delayed, dead=3)
    assert run_main("stats", "telapp:app", "--broker", url, "--json") == 0
    doc = orjson.loads(capsys.readouterr().out)["queues"]
    depth = {"ready": 1, "in_flight": 0, "delayed": delayed, "dead": 3}
    assert doc == {
        queue: depth | {"rates": dict.fromkeys(("enqueued", "done", "failed", "backlog"))}
    }

    # --fail-if: exit 1 when any threshold holds on a queue, 0 when none does.
    assert run_main("stats", "telapp:app", "--broker", url, "--fail-if", "dead>0") == 1
    err = capsys.readouterr().err
    assert f"dead>0 holds on queue '{queue}' (dead=3)" in err
    args = ["--fail-if", "dead>3", "--fail-if", "ready >= 2", "--fail-if", "backlog>2"]
    assert run_main("stats", "telapp:app", "--broker", url, *args) == 0
    args = ["--fail-if", "dead>3", "--fail-if", f"backlog>={1 + delayed}"]
    assert run_main("stats", "telapp:app", "--broker", url, *args) == 1
    capsys.readouterr()

    # --watch: a JSON line a refresh, the second with rates.
    argv = ["stats", "telapp:app", "--broker", url, "--json", "--watch", "0.1"]
    assert run_main(*argv, "--count", "2") == 0
    first, second = (orjson.loads(x) for x in capsys.readouterr().out.splitlines())
    assert first["queues"][queue]["rates"]["enqueued"] is None
    rates = second["queues"][queue]["rates"]
    # Enqueued and done rates come from the broker's own counters: Redis and SQLite keep
    # them, RabbitMQ and SQS don't.
    counted = 0 if backend.name in ("redis", "sqlite") else None
    assert rates == {"enqueued": counted, "done": counted, "failed": 0, "backlog": 0}
    assert second["queues"][queue] | {"rates": None} == doc[queue] | {"rates": None}
    assert first["queues"] == doc  # --json has one shape, with or without --watch


async def depth_from_another_broker(url: str, queue: str) -> aioworkers.QueueDepth:
    async with aioworkers.App(url, queue=queue) as other:
        return await other.stats()


@pytest.mark.parametrize("expr", ["dead", "dead>", "deads>0", "dead=>1", "dead>x", ""])
def test_malformed_fail_if_is_a_usage_error(expr: str) -> None:
    result = cli("stats", "telapp:app", "--fail-if", expr)
    assert result.returncode == 2
    assert "--fail-if: expected NAME OP NUMBER" in result.stderr
    assert result.stderr.count("\n") == 1


def test_stats_watch_table_shows_rates(redis_url: str) -> None:
    seed(redis_url, ok=3, boom=0)
    result = cli("stats", "telapp:app", "--broker", redis_url, "--watch", "0.1", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert "enqueued/s" in result.stdout
    assert "backlog" in result.stdout
    last = result.stdout.strip().splitlines()[-1].split()
    assert last[:5] == ["default", "3", "0", "0", "0"]
    assert last[-2:] == ["flat", "+0.0/s"]


def test_redis_url_constant_is_plain() -> None:
    assert "@" not in REDIS_URL
