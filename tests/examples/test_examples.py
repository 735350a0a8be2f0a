"""Every example runs end to end, as a user would run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run an example from ``cwd``, where the default broker keeps its file."""
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(COVERED)


def test_quickstart(tmp_path: Path) -> None:
    for run in (1, 2):  # the second run starts from the first one's file
        result = run_example("quickstart.py", tmp_path)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "enqueued 103 jobs" in out
        assert "sent 101 emails" in out
        assert "'ok': 102" in out
        assert "'dead': 1" in out
        assert "ready=0, in_flight=0, delayed=0, dead=1" in out
        assert "charge_card after 3 attempts: ValueError: card declined (attempt 3)" in out
        assert (run == 2) == ("purged 1 dead letter of an earlier run" in out), out
    assert (tmp_path / "aioworkers.db").exists()


def test_lambda_handler() -> None:
    from ..services import SQS_ENV, moto_endpoint

    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env |= SQS_ENV | {"SQS_ENDPOINT_URL": moto_endpoint()}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "lambda_handler.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resized cat.png to 200px" in out
    assert "resized dog.png to 400px" in out
    assert "batch of 4: {'batchItemFailures': []}" in out
    assert "dead letter: import_row rejected: Reject: not a CSV row: 'garbage'" in out


COVERED = {"quickstart.py": test_quickstart, "lambda_handler.py": test_lambda_handler}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(check: Callable[[], bool], what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def test_fastapi_app(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env |= {"PORT": str(port), "WORKER_GRACE": "10"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "fastapi_app.py")],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def up() -> bool:
                try:
                    return http.get("/sent").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(up, "the server")
            for i in range(20):
                response = http.post("/signup", params={"email": f"user{i}@example.com"})
                assert response.status_code == 200
                assert len(response.json()["job"]) > 10
            _wait_for(lambda: len(http.get("/sent").json()["sent"]) == 20, "20 jobs run")

            # Shutting the app down drains the embedded worker: the slow job finishes.
            http.post("/signup", params={"email": "slow@example.com", "seconds": 1.0})
            _wait_for(lambda: http.get("/stats").json()["in_flight"] == 1, "the slow job")
        server.send_signal(signal.SIGTERM)
        # After its graceful shutdown, uvicorn re-raises the signal it caught.
        assert server.wait(20) in (0, -signal.SIGTERM), log.read_text()
    finally:
        server.kill()
        server.wait()
    text = log.read_text()
    assert text.count("welcome sent to") == 21, text
    assert text.index("Shutting down") < text.index("welcome sent to slow@example.com"), text
    assert "ok=21 retried=0 dead=0" in text, text


COVERED["fastapi_app.py"] = test_fastapi_app
